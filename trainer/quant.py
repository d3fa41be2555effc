"""Mixed int6/int5/int8 quantisation of a model state_dict (reference-stack §6.2, PR #940 decisions).

Every tensor gets one *encoding*, chosen by name and size exactly as upstream's ``mixed_quantize_int6``:

1. float tensors with at most 65,536 elements are stored as fp16 ("fp16"), whatever their name — the size check
   comes first, so small control tensors such as ``attn_gate`` and ``vr_lambda`` end up fp16 (gotcha 12);
2. larger float tensors whose name matches a control pattern are stored as fp32 ("fp32");
3. block matrices (category "mlp" or "attn") are quantised per row to int6 ("int6_row"), or to int5 ("int5_row")
   for the blocks the fit-to-budget ladder downgrades;
4. every other float tensor (``tok_emb``, ``bigram.embed``) is quantised per row to int8 ("int8_row");
5. non-float tensors are stored bit-exactly ("raw").

Row quantisation stores ``q`` as int8 and one fp16 scale per row; dequantisation is exactly
``w = q * scale[row]`` (computed in fp32) cast back to the dtype the tensor had at export.

The clip search for block matrices (GPTQ-lite) tries the row-clip percentiles {0.999, 0.9995, 0.9999, 0.99999, 1.0}
and keeps, **for each row**, the candidate with the lowest reconstruction error. Upstream keeps one percentile per
matrix (gotcha 2); choosing per row can only lower every row's error, and costs nothing in the format.

Two schemes compute the rows (``scheme``), both in the same encodings and format:

* ``pgolf`` (the default): the per-row clip search above, scales floored only at the smallest fp16;
* ``seed``: PR #940's export as it ran, for an honest reproduction of the seed: block matrices by row abs-max
  (no clip search) with scales floored at 1/qmax (1/31 for int6), the int8 tables with the 99.99984th-percentile
  row clip and scales floored at 1/127, ``q`` computed with the unrounded int8 scale as upstream does. Its
  reconstruction error is larger, and it compresses differently (see docs/artifact-format.md), so the
  fit-to-budget ladder may settle on another rung than with ``pgolf``.

This module chooses and computes the stored form (writing only); the encodings themselves and their decoding
live in ``trainer/encodings.py``, the byte layout in ``trainer/artifact.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from trainer.encodings import (
    FP16,
    FP32,
    INT5_ROW,
    INT6_ROW,
    INT8_ROW,
    RAW,
    RAW_NUMPY_DTYPES,
    ROW_QMAX,
    SCALE_DTYPE,
    STORAGE_DTYPE,
    TORCH_DTYPES,
    QuantizedTensor,
    num_rows,
)

PASSTHROUGH_MAX_NUMEL = 65_536
_BLOCK_NAME = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
CONTROL_PATTERNS = (
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "q_gain",
    "skip_weight",
    "smear",
    "ve_layer_scales",
    "ve_shared.scale",
    "attn_gate",
    "vr_lambda",
    "dtg_gate",
)
BLOCK_CLIP_PERCENTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
EMBED_CLIP_PERCENTILE = 0.9999984

PGOLF_SCHEME = "pgolf"
SEED_SCHEME = "seed"
EXPORT_SCHEMES = (PGOLF_SCHEME, SEED_SCHEME)

# The smallest positive fp16 (a subnormal). Scales are floored here only so that an all-zero row still has a
# positive scale; upstream floors the int8 scale at 1/127, which would flatten a small-valued embedding.
_MIN_SCALE = 2.0**-24


class QuantError(ValueError):
    """A tensor cannot be encoded (non-finite values, or values outside fp16 range where fp16 is required)."""


def block_index(name: str) -> int | None:
    """The layer a parameter belongs to (``blocks.{i}.…``), or None outside the blocks."""
    match = _BLOCK_NAME.search(name)
    return int(match.group(1)) if match else None


def classify(name: str) -> str:
    """Upstream ``_classify_param``: "embed", "mlp", "attn" (also any ``.proj.`` outside an MLP) or "other"."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name or ".proj." in name:
        return "attn"
    return "other"


def dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in TORCH_DTYPES.items():
        if candidate == dtype:
            return name
    raise QuantError(f"dtype {dtype} cannot be stored in an artifact")


def choose_encoding(name: str, tensor: torch.Tensor, *, block_encoding: str = INT6_ROW) -> str:
    if not tensor.is_floating_point():
        return RAW
    if tensor.numel() <= PASSTHROUGH_MAX_NUMEL:
        return FP16
    if any(pattern in name for pattern in CONTROL_PATTERNS):
        return FP32
    if classify(name) in ("mlp", "attn"):
        return block_encoding
    return INT8_ROW


def quantize_tensor(name: str, tensor: torch.Tensor, *, block_encoding: str = INT6_ROW,
                    scheme: str = PGOLF_SCHEME) -> QuantizedTensor:
    """Encode one tensor. ``block_encoding`` (int6 or int5) applies to block matrices only."""
    if block_encoding not in (INT6_ROW, INT5_ROW):
        raise ValueError(f"block_encoding must be {INT6_ROW!r} or {INT5_ROW!r}, not {block_encoding!r}")
    if scheme not in EXPORT_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(EXPORT_SCHEMES)}, not {scheme!r}")
    tensor = tensor.detach().cpu()
    encoding = choose_encoding(name, tensor, block_encoding=block_encoding)
    shape = tuple(int(d) for d in tensor.shape)
    template = dtype_name(tensor.dtype)
    if encoding == RAW:
        values = tensor.contiguous().numpy().astype(RAW_NUMPY_DTYPES[template], copy=False).reshape(-1)
        return QuantizedTensor(name, RAW, template, shape, values)

    as_float = tensor.float()
    if not torch.isfinite(as_float).all():
        raise QuantError(f"{name}: tensor has non-finite values; refusing to export it")
    if encoding in (FP16, FP32):
        largest = as_float.abs().max().item() if as_float.numel() else 0.0
        if encoding == FP16 and largest > torch.finfo(torch.float16).max:
            raise QuantError(f"{name}: values exceed the fp16 range (max |w| = {largest:g})")
        stored = as_float.numpy().astype(STORAGE_DTYPE[encoding]).reshape(-1)
        return QuantizedTensor(name, encoding, template, shape, stored)

    block = encoding in (INT6_ROW, INT5_ROW)
    rows = as_float.reshape(num_rows(shape), -1)
    if scheme == SEED_SCHEME:
        q, scales = seed_quantize_rows(rows, ROW_QMAX[encoding], None if block else EMBED_CLIP_PERCENTILE, name=name)
    else:
        percentiles = BLOCK_CLIP_PERCENTILES if block else (EMBED_CLIP_PERCENTILE,)
        q, scales = quantize_rows(rows, ROW_QMAX[encoding], percentiles, name=name)
    return QuantizedTensor(name, encoding, template, shape, q.reshape(-1), scales)


def quantize_rows(
    rows: torch.Tensor, qmax: int, clip_percentiles: Sequence[float], *, name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantisation of a 2-D fp32 tensor with a clip search over row percentiles of |w|.

    For each candidate the scale is ``fp16(clip / qmax)`` and ``q = clamp(round(w / scale), -qmax, qmax)``; the
    quantisation uses the fp16-rounded scale itself, so every element inside the clip range is reconstructed
    within half a step. Each row keeps the candidate with the lowest squared error.
    Returns (q as int8 array of the same shape, scales as fp16 array of length rows).
    """
    clips = _row_percentiles(rows.abs(), clip_percentiles)  # (candidates, rows)
    best_q = best_scale = best_err = None
    for clip in clips:
        scale_fp16 = (clip / qmax).to(torch.float16)
        if not torch.isfinite(scale_fp16).all():
            raise QuantError(f"{name}: a row scale exceeds the fp16 range (max clip {clip.max().item():g})")
        scale = scale_fp16.clamp_min(_MIN_SCALE).float()
        q = torch.clamp(torch.round(rows / scale[:, None]), -qmax, qmax)
        err = (q * scale[:, None] - rows).square().sum(dim=1)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
            continue
        better = err < best_err
        best_q = torch.where(better[:, None], q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    assert best_q is not None and best_scale is not None
    return best_q.to(torch.int8).numpy(), best_scale.numpy().astype(SCALE_DTYPE)


def seed_quantize_rows(rows: torch.Tensor, qmax: int, clip_percentile: float | None, *, name: str = "tensor"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """PR #940's row quantisers, as its code computes them.

    ``clip_percentile`` None is ``quantize_int6_per_row``: ``scale = fp16(max(rowmax / qmax, 1 / qmax))``,
    ``q = round(w / scale)``. A percentile is ``quantize_float_tensor``: ``clip`` = that row percentile of |w|,
    ``s = max(clip / qmax, 1 / qmax)``, ``q = round(clamp(w, ±clip) / s)`` with the fp32 ``s``, stored ``fp16(s)``.
    Upstream clamps the int6 values to [-(qmax+1), qmax]; with a row abs-max scale no value rounds below -qmax
    (|w / scale| exceeds qmax by at most fp16's rounding of the scale), so clamping to ±qmax stores the same q.
    """
    floor = 1.0 / qmax
    if clip_percentile is None:
        scale_fp16 = (rows.abs().amax(dim=1) / qmax).clamp_min(floor).to(torch.float16)
        q = torch.round(rows / scale_fp16.float()[:, None])
    else:
        clip = _row_percentiles(rows.abs(), (clip_percentile,))[0]
        scale32 = (clip / qmax).clamp_min(floor)
        q = torch.round(torch.maximum(torch.minimum(rows, clip[:, None]), -clip[:, None]) / scale32[:, None])
        scale_fp16 = scale32.to(torch.float16)
    if not torch.isfinite(scale_fp16).all():
        raise QuantError(f"{name}: a row scale exceeds the fp16 range")
    q = torch.clamp(q, -qmax, qmax)
    return q.to(torch.int8).numpy(), scale_fp16.numpy().astype(SCALE_DTYPE)


def _row_percentiles(abs_rows: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """Per-row percentiles with linear interpolation (as torch.quantile), sorting each row once.

    torch.quantile refuses inputs above 2**24 elements; sorting ourselves has no such limit.
    """
    ordered = abs_rows.sort(dim=1).values
    last = ordered.shape[1] - 1
    out = []
    for p in percentiles:
        position = p * last
        lo = int(np.floor(position))
        hi = min(lo + 1, last)
        frac = position - lo
        out.append(ordered[:, lo] + (ordered[:, hi] - ordered[:, lo]) * frac)
    return torch.stack(out)


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, int5_blocks: Iterable[int] = (), scheme: str = PGOLF_SCHEME
) -> list[QuantizedTensor]:
    """Encode a whole state_dict, in its own order; block matrices of ``int5_blocks`` get int5, others int6."""
    int5 = frozenset(int5_blocks)
    return [
        quantize_tensor(name, t, block_encoding=INT5_ROW if block_index(name) in int5 else INT6_ROW, scheme=scheme)
        for name, t in state_dict.items()
    ]
