"""The tensor encodings of artifact format v1 and their decoding (docs/artifact-format.md §3). Choosing an
encoding and computing ``q`` (writing) is trainer/quant.py.
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

# The dtypes an artifact may restore, by their names in the manifest (torch's and numpy's names for them).
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
RAW_NUMPY_DTYPES = {name: np.dtype(name).newbyteorder("<")
                    for name in ("int64", "int32", "int16", "int8", "uint8", "bool")}
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (*FLOAT_DTYPE_NAMES, *RAW_NUMPY_DTYPES)}


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor in its stored form."""

    name: str
    encoding: str
    dtype: str  # a key of TORCH_DTYPES: restored on dequantisation
    shape: tuple[int, ...]
    values: np.ndarray  # flat; STORAGE_DTYPE[encoding], or RAW_NUMPY_DTYPES[dtype] for RAW
    scales: np.ndarray | None = None  # one fp16 scale per row, only for row-quantised encodings


def num_rows(shape: Sequence[int]) -> int:
    """The first dimension, or a single row for 0-d and 1-d tensors."""
    return int(shape[0]) if len(shape) >= 2 else 1


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    """Passthrough values cast back; row-quantised ``q * scale[row]`` in fp32, cast back."""
    values = torch.from_numpy(np.array(qt.values))  # a copy, in its storage dtype
    if qt.encoding in ROW_QMAX:
        assert qt.scales is not None
        scales = torch.from_numpy(np.array(qt.scales)).float()
        values = values.float().reshape(num_rows(qt.shape), -1) * scales[:, None]
    return values.reshape(qt.shape).to(TORCH_DTYPES[qt.dtype])
