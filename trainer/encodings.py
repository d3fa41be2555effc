"""The tensor encodings of artifact format v1 and their decoding (docs/artifact-format.md §3): fp16/fp32
passthrough, "raw" (non-float, bit-exact) and per-row int8/int6/int5 with one fp16 scale per row, decoded as
``q * scale[row]`` in fp32 and cast back. Choosing an encoding and computing ``q`` (writing) is trainer/quant.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Encodings (the strings are part of artifact format v1).
FP16 = "fp16"
FP32 = "fp32"
RAW = "raw"
INT8_ROW = "int8_row"
INT6_ROW = "int6_row"
INT5_ROW = "int5_row"
# Largest |q| per row-quantised encoding; q lies in [-qmax, qmax] (symmetric, so -32/-16 are never used).
ROW_QMAX = {INT8_ROW: 127, INT6_ROW: 31, INT5_ROW: 15}
ENCODINGS = (FP16, FP32, RAW, *ROW_QMAX)

# Little-endian storage of each encoding's values; RAW uses the tensor's own dtype.
STORAGE_DTYPE = {FP16: np.dtype("<f2"), FP32: np.dtype("<f4"), **{e: np.dtype("i1") for e in ROW_QMAX}}
SCALE_DTYPE = np.dtype("<f2")

# Template dtypes an artifact may restore, by their names in the manifest.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
RAW_NUMPY_DTYPES: dict[str, np.dtype] = {
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")

@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor in its stored form. ``values`` and ``scales`` are little-endian numpy arrays."""

    name: str
    encoding: str
    dtype: str  # name (a key of TORCH_DTYPES) of the dtype restored on dequantisation
    shape: tuple[int, ...]
    values: np.ndarray  # flat; STORAGE_DTYPE[encoding], or RAW_NUMPY_DTYPES[dtype] for RAW
    scales: np.ndarray | None = None  # one fp16 scale per row, only for row-quantised encodings


def num_rows(shape: Sequence[int]) -> int:
    """Rows of a row-quantised tensor: the first dimension, or a single row for 0-d and 1-d tensors."""
    return int(shape[0]) if len(shape) >= 2 else 1


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    """Rebuild the tensor: passthrough values cast back, row-quantised ``q * scale[row]`` cast back."""
    target = TORCH_DTYPES[qt.dtype]
    if qt.encoding == RAW:
        return torch.from_numpy(np.array(qt.values, dtype=RAW_NUMPY_DTYPES[qt.dtype])).reshape(qt.shape)
    if qt.encoding in (FP16, FP32):
        values = torch.from_numpy(np.array(qt.values, dtype=STORAGE_DTYPE[qt.encoding]))
        return values.reshape(qt.shape).to(target)
    if qt.encoding in ROW_QMAX:
        assert qt.scales is not None
        q = torch.from_numpy(np.array(qt.values, dtype=np.int8)).float().reshape(num_rows(qt.shape), -1)
        scales = torch.from_numpy(np.array(qt.scales, dtype=SCALE_DTYPE)).float()
        return (q * scales[:, None]).reshape(qt.shape).to(target)
    raise ValueError(f"{qt.name}: unknown encoding {qt.encoding!r}")
