"""Test-side transcription of upstream's artifact export and round-trip, written from the format (reference §6).

Independent of trainer/upstream_artifact.py on purpose: tests build real upstream-format files with these
functions and compare what the reader decodes against what upstream's own dequantisation gives.

* ``int8_clean_export``: the root train_gpt.py's ``quantize_state_dict_int8`` (per-row int8 with a 99.99984th
  percentile clip and fp16 scales floored at 1/127, scalar-scale int8 for non-matrices, fp16/fp32 passthrough of
  tensors up to 65,536 elements, the dtype of each tensor recorded);
* ``mixed_int6_export``: PR #549/#940's ``mixed_quantize_int6`` (row abs-max int6 or int5 with fp16 scales
  floored at 1/qmax for mlp/attn matrices, the int8 scheme for the rest, fp16 passthrough, fp32 control tensors);
* ``upstream_dequantize``: the matching ``dequantize_*`` of each, against a template state dict;
* ``upstream_state_dict``: pgolf weights in the dtypes upstream's model holds them (embedding tables bf16).
"""

from __future__ import annotations

import io
import lzma
import zlib
from pathlib import Path

import torch
import zstandard

KEEP_FLOAT_MAX_NUMEL = 65_536
INT8_CLIP_Q = 99.99984 / 100.0
BASELINE_CONTROL = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
                    "skip_weight", "skip_weights")
PR940_CONTROL = BASELINE_CONTROL + ("smear", "vr_lambda", "attn_gate", "canon_a", "canon_c", "delta_gate")


def upstream_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream casts the model to bf16 and restores linears and control/low-dim tensors to fp32."""
    return {name: t.detach().to(torch.bfloat16 if name in ("tok_emb.weight", "bigram.embed.weight")
                                else torch.float32)
            for name, t in state_dict.items()}


def _int8_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t32 = t.float()
    if t32.ndim == 2:
        clip = torch.quantile(t32.abs(), INT8_CLIP_Q, dim=1)
        clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
        scale = (clip / 127.0).clamp_min(1.0 / 127.0)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
        return q.contiguous(), scale.to(torch.float16).contiguous()
    clip = float(torch.quantile(t32.abs().flatten(), INT8_CLIP_Q).item())
    scale = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip, clip) / scale), -127, 127).to(torch.int8)
    return q.contiguous(), scale


def int8_clean_export(state_dict: dict[str, torch.Tensor]) -> dict[str, object]:
    quantized, scales, dtypes, passthrough, orig, qmeta = {}, {}, {}, {}, {}, {}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        if not t.is_floating_point():
            passthrough[name] = t
            continue
        if t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            if any(p in name for p in BASELINE_CONTROL):
                passthrough[name] = t.float().contiguous()
            else:
                orig[name] = str(t.dtype).removeprefix("torch.")
                passthrough[name] = t.to(torch.float16).contiguous()
            continue
        q, s = _int8_tensor(t)
        if s.ndim > 0:
            qmeta[name] = {"scheme": "per_row", "axis": 0}
        quantized[name], scales[name] = q, s
        dtypes[name] = str(t.dtype).removeprefix("torch.")
    obj: dict[str, object] = {"__quant_format__": "int8_clean_per_row_v1", "quantized": quantized, "scales": scales,
                              "dtypes": dtypes, "passthrough": passthrough}
    if qmeta:
        obj["qmeta"] = qmeta
    if orig:
        obj["passthrough_orig_dtypes"] = orig
    return obj


def _category(name: str) -> str:
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name or (".proj." in name and ".mlp." not in name):
        return "attn"
    return "other"


def _int6_rows(t: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    t32 = t.float()
    if t32.ndim == 2:
        scale = (t32.abs().amax(dim=1) / qmax).clamp_min(1.0 / qmax).to(torch.float16)
        q = torch.clamp(torch.round(t32 / scale.float()[:, None]), -qmax - 1, qmax).to(torch.int8)
        return q, scale
    amax = t32.abs().max().item()
    scale = torch.tensor(amax / qmax if amax > 0 else 1.0, dtype=torch.float16)
    return torch.clamp(torch.round(t32 / scale.float()), -qmax - 1, qmax).to(torch.int8), scale


def mixed_int6_export(state_dict: dict[str, torch.Tensor], int5_layers: frozenset[int] = frozenset()
                      ) -> dict[str, object]:
    result: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        if not t.is_floating_point() or t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            result[name] = t.to(torch.float16) if t.is_floating_point() else t
            meta[name] = "passthrough"
            continue
        if any(p in name for p in PR940_CONTROL):
            result[name] = t.float()
            meta[name] = "passthrough_ctrl"
            continue
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1
        if _category(name) in ("mlp", "attn"):
            qmax = 15 if layer in int5_layers else 31
            q, s = _int6_rows(t, qmax)
            meta[name] = {"type": "int5" if qmax == 15 else "int6"}
        else:
            q, s = _int8_tensor(t)
            meta[name] = {"type": "int8"}
        result[name + ".q"], result[name + ".scale"] = q, s
    return {"w": result, "m": meta}


def _rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if s.ndim > 0:
        return q.float() * s.float().view(q.shape[0], *([1] * (q.ndim - 1)))
    return q.float() * float(s.item())


def upstream_dequantize(obj: dict, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What upstream's eval model holds after the round trip (load_state_dict casts into the template dtypes)."""
    out: dict[str, torch.Tensor] = {}
    if "w" in obj:
        for name, orig in template.items():
            info = obj["m"][name]
            if isinstance(info, str):
                t = obj["w"][name]
                out[name] = t.to(orig.dtype) if t.dtype == torch.float16 else t
            else:
                out[name] = _rows(obj["w"][name + ".q"], obj["w"][name + ".scale"]).to(orig.dtype)
    else:
        for name, q in obj["quantized"].items():
            out[name] = _rows(q, obj["scales"][name]).to(getattr(torch, obj["dtypes"][name]))
        for name, t in obj["passthrough"].items():
            dtype = obj.get("passthrough_orig_dtypes", {}).get(name)
            out[name] = t.to(getattr(torch, dtype)) if dtype else t
    return {name: out[name].to(template[name].dtype) for name in template}


def torch_zip(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "zlib":
        return zlib.compress(raw, 9)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=16).compress(raw)
    if compression == "lzma":
        return lzma.compress(raw, preset=6)
    if compression == "brotli":
        import brotli

        return brotli.compress(raw, quality=5)
    raise ValueError(compression)


def write_ptz(path: Path, obj: object, compression: str) -> Path:
    path.write_bytes(compress(torch_zip(obj), compression))
    return path
