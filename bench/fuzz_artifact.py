"""Fuzz the .pgolf reader: mutate a valid artifact N times and count what `parse_submission` does with each.

`parse_submission` is the upload path: the evaluation's reader (`parse_artifact`) with the checks of the metadata
sections it skips hooked in, so it runs every line of the reader and those checks too.

    .venv/bin/python bench/fuzz_artifact.py                      # 100,000 inputs, 2 worker processes
    .venv/bin/python bench/fuzz_artifact.py --inputs 2000 --workers 1 --json out.json

Every input is one mutation of a small valid artifact (every encoding present), chosen and parametrised by its
seed, so any finding replays with `--replay SEED`:

    bit flips (anywhere / in the manifest), truncation, trailing bytes, header edits (version, manifest length),
    manifest edits (huge, negative and wrong-typed numbers in every field, huge and negative shapes, offsets past
    the end, duplicate names, wrong dtypes and encodings, deep JSON, NaN/Infinity literals, huge integer
    literals, huge declared sizes, missing and unknown keys, huge strings), payload edits re-hashed so the deep
    checks run (NaN/inf scales, out-of-range int6 values, fp16 NaN/inf, dtype changes that overflow on restore,
    random raw bytes), zstd bombs with honest hashes, and hash mismatches.

Outcomes: `accepted`, `refused:<code>` (an ArtifactError), `foreign:<ExceptionType>` (anything else: a reader
bug), and `hang` (no answer within --hang-seconds; the worker is killed and restarted). The figures printed: counts
by outcome and by mutation, every foreign exception with its seed (up to 20), hangs, inputs/s, the slowest
input, and the peak RSS of the worker processes. A second part times the named attacks of issue 12 (bomb
manifest, deep JSON, zstd bomb) one by one with their RSS growth.

Workers run under RLIMIT_AS (--worker-address-space, default 3 GiB) so a blow-up cannot take the machine; an
allocation failure then shows up as `foreign:MemoryError`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pickle
import random
import resource
import selectors
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

HEADER_NBYTES = 16
MiB = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# The base artifact and its parts


def build_base_artifact() -> bytes:
    """A valid artifact of a small GPT with fp16, int6_row and int8_row tensors (deterministic)."""
    import torch

    from trainer.code_bytes import CodeBytes
    from trainer.export import encode_artifact
    from trainer.model import GPT, ModelConfig
    from trainer.quant import quantize_state_dict

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=640, num_layers=2, model_dim=128, num_heads=2, num_kv_heads=1, mlp_mult=5,
                         rope_dims=16, xsa_last_n=2, bigram_buckets=64, bigram_dim=16)
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in GPT(config).state_dict().items()}
    training = {"seed": 0, "steps": 1, "world_size": 1, "device": "cpu", "train_time_ms": 1.0, "code_version": "fz"}
    return encode_artifact(quantize_state_dict(state), model_config=config, tokenizer_sha256="0" * 64,
                           vocab_size=config.vocab_size, training=training,
                           code_bytes=CodeBytes(100, {"train_gpt.py": 100}), level=3)


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[HEADER_NBYTES:HEADER_NBYTES + length]), data[HEADER_NBYTES + length:]


def join(template: bytes, manifest: Any, payload: bytes, *, raw_json: bytes | None = None) -> bytes:
    body = raw_json if raw_json is not None else json.dumps(manifest, separators=(",", ":")).encode()
    return template[:12] + struct.pack("<I", len(body)) + body + payload


# ----------------------------------------------------------------------------------------------------------------
# Mutations: each takes (base bytes, parsed parts, rng) and returns the hostile bytes


class Base:
    def __init__(self, data: bytes) -> None:
        import zstandard

        self.data = data
        self.manifest, self.payload = split(data)
        self.raw = zstandard.ZstdDecompressor().decompress(self.payload)
        self.manifest_end = HEADER_NBYTES + struct.unpack_from("<I", data, 12)[0]
        self._pickled = pickle.dumps(self.manifest)  # our own object, never an input

    def fresh_manifest(self) -> dict[str, Any]:
        return pickle.loads(self._pickled)  # a deep copy, several times faster than through JSON

    def with_raw(self, raw: bytes, manifest: dict[str, Any] | None = None, *, level: int = 1) -> bytes:
        """Re-compress `raw` and fix both hashes and sizes, so only the deeper checks can object."""
        import zstandard

        manifest = manifest or self.fresh_manifest()
        compressed = zstandard.ZstdCompressor(level=level).compress(raw)
        manifest["payload"].update(compressed_nbytes=len(compressed), raw_nbytes=len(raw),
                                   compressed_sha256=hashlib.sha256(compressed).hexdigest(),
                                   raw_sha256=hashlib.sha256(raw).hexdigest())
        return join(self.data, manifest, compressed)


HOSTILE_NUMBERS = (-1, 0, 1, 2, 3, 7, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**18,
                   10**19, 10**30, 10**100, 1.5, -0.0, 1e308, 1e-308, 3.4e38, 65504.0, 65520.0)
HOSTILE_VALUES = (None, True, False, "", "x" * 1000, [], {}, [1, 2], {"a": 1}, "1024", [[[]]])


def _leaf_paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _leaf_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _leaf_paths(v, (*path, i))
    return out


def _set(root: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def _get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def _tensor(manifest: dict[str, Any], rng: random.Random, encoding: str | None = None) -> dict[str, Any]:
    tensors = [t for t in manifest["tensors"] if encoding is None or t["encoding"] == encoding]
    return rng.choice(tensors)


def m_bit_flips(b: Base, rng: random.Random) -> bytes:
    data = bytearray(b.data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def m_manifest_bit_flips(b: Base, rng: random.Random) -> bytes:
    data = bytearray(b.data)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(HEADER_NBYTES, b.manifest_end)] ^= 1 << rng.randrange(8)
    return bytes(data)


def m_truncate(b: Base, rng: random.Random) -> bytes:
    return b.data[: rng.randrange(len(b.data))]


def m_trailing(b: Base, rng: random.Random) -> bytes:
    return b.data + rng.randbytes(rng.randint(1, 64))


def m_header(b: Base, rng: random.Random) -> bytes:
    data = bytearray(b.data)
    field = rng.choice((8, 12))
    value = rng.choice((0, 2, 2**32 - 1, rng.randrange(2**32), len(b.data), b.manifest_end - HEADER_NBYTES + 1))
    struct.pack_into("<I", data, field, value)
    return bytes(data)


def m_any_field(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    path = rng.choice([p for p in _leaf_paths(manifest) if p])
    _set(manifest, path, rng.choice(HOSTILE_NUMBERS + HOSTILE_VALUES))
    return join(b.data, manifest, b.payload)


def m_numeric_field(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    paths = [p for p in _leaf_paths(manifest) if p and isinstance(_get(manifest, p), (int, float))
             and not isinstance(_get(manifest, p), bool)]
    path = rng.choice(paths)
    old = _get(manifest, path)
    _set(manifest, path, rng.choice((old + 1, old - 1, -old, old * 2, old * 10**6, *HOSTILE_NUMBERS)))
    return join(b.data, manifest, b.payload)


def m_model_config(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    key = rng.choice(sorted(manifest["model_config"]))
    manifest["model_config"][key] = rng.choice(HOSTILE_NUMBERS + (10**30, 10**18, 4, 8, 64, 65, 4096, 8193))
    return join(b.data, manifest, b.payload)


def m_shape(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    record = _tensor(manifest, rng)
    choice = rng.randrange(5)
    if choice == 0:
        record["shape"] = [rng.choice(HOSTILE_NUMBERS) for _ in range(rng.randint(0, 10))]
    elif choice == 1:
        record["shape"] = [2**62, 2**62, 2**62]
    elif choice == 2:
        record["shape"] = [-s for s in record["shape"]] or [-1]
    elif choice == 3:
        record["shape"] = record["shape"] + [1] * rng.randint(1, 9)
    else:  # a consistent, larger shape: nbytes follows
        record["shape"] = [d * rng.choice((2, 1000, 10**6)) for d in record["shape"]] or [10**9]
        record["nbytes"] = record["nbytes"] * 4
    return join(b.data, manifest, b.payload)


def m_offsets(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    record = _tensor(manifest, rng)
    key = rng.choice([k for k in ("offset", "nbytes", "scale_offset", "scale_nbytes") if k in record])
    raw_nbytes = manifest["payload"]["raw_nbytes"]
    record[key] = rng.choice((raw_nbytes, raw_nbytes + 1, raw_nbytes * 2, 2**63, -record[key] - 1,
                              record[key] + rng.randint(-3, 3)))
    if rng.random() < 0.5:  # declare a payload that covers the bogus region too
        manifest["payload"]["raw_nbytes"] = max(raw_nbytes, record[key] + 1) if isinstance(record[key], int) else 0
    return join(b.data, manifest, b.payload)


def m_duplicate_name(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    tensors = manifest["tensors"]
    i, j = rng.sample(range(len(tensors)), 2)
    if rng.random() < 0.5:
        tensors[j]["name"] = tensors[i]["name"]
    else:
        tensors.append(json.loads(json.dumps(tensors[i])))
    return join(b.data, manifest, b.payload)


def m_dtype(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    record = _tensor(manifest, rng)
    key = rng.choice(("dtype", "encoding"))
    record[key] = rng.choice(("float32", "float16", "bfloat16", "int64", "int8", "bool", "uint8", "float64",
                              "complex64", "object", "fp16", "fp32", "raw", "int8_row", "int6_row", "int5_row",
                              "int4_row", 7, None, ["float32"], {"dtype": "float32"}))
    return join(b.data, manifest, b.payload)


def m_deep_json(b: Base, rng: random.Random) -> bytes:
    depth = rng.choice((9, 50, 900, 1100, 5000, 100_000, 400_000))
    where = rng.choice(("training", "model_config", "top"))
    nested = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
    text = json.dumps(b.fresh_manifest(), separators=(",", ":"))
    if where == "top":
        raw_json = nested.encode()
    else:
        raw_json = text.replace(f'"{where}":{{', f'"{where}":{{"deep":{nested},', 1).encode()
    return join(b.data, None, b.payload, raw_json=raw_json)


def m_json_literals(b: Base, rng: random.Random) -> bytes:
    text = json.dumps(b.fresh_manifest(), separators=(",", ":"))
    literal = rng.choice(("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "1" * 25, "-" + "9" * 30,
                          "1.0e400", "0e0", '"\\ud800"', '"\\u0000"'))
    number_positions = [i for i in range(1, len(text)) if text[i].isdigit() and text[i - 1] in ":,["]
    i = rng.choice(number_positions)
    j = i
    while j < len(text) and (text[j].isdigit() or text[j] in ".eE-+"):
        j += 1
    return join(b.data, None, b.payload, raw_json=(text[:i] + literal + text[j:]).encode())


def m_declared_sizes(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    key = rng.choice(("raw_nbytes", "compressed_nbytes", "level"))
    manifest["payload"][key] = rng.choice((0, 1, 2**28, 2**28 + 1, 2**40, 2**63, 10**30, -1, 23))
    if key == "raw_nbytes" and rng.random() < 0.5:  # a consistent table for the huge size: one giant tensor
        record = _tensor(manifest, rng, "fp16")
        record["shape"] = [manifest["payload"][key] // 2]
        record["nbytes"] = manifest["payload"][key]
    return join(b.data, manifest, b.payload)


def m_keys(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    target = rng.choice((manifest, manifest["payload"], manifest["model_config"], manifest["tokenizer"],
                         manifest["code_bytes"], manifest["training"], _tensor(manifest, rng)))
    if target and rng.random() < 0.5:
        del target[rng.choice(sorted(target))]
    else:
        target[rng.choice(("evil", "__class__", "x" * 300, "", "exec"))] = rng.choice(HOSTILE_VALUES)
    return join(b.data, manifest, b.payload)


def m_huge_strings(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    path = rng.choice([p for p in _leaf_paths(manifest) if p and isinstance(_get(manifest, p), str)])
    _set(manifest, path, rng.choice(("A" * 500_000, "\u00e9" * 200_000, "\x00" * 1000, "../../etc/passwd")))
    if rng.random() < 0.3:
        manifest["code_bytes"]["files"] = {f"f{i}.py": 1 for i in range(rng.choice((10_001, 40_000)))}
        manifest["code_bytes"]["total"] = len(manifest["code_bytes"]["files"])
    return join(b.data, manifest, b.payload)


def m_many_tensors(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    count = rng.choice((4097, 12_000))
    manifest["tensors"] += [{"name": f"t{i}", "encoding": "fp16", "dtype": "float16", "shape": [0],
                             "offset": manifest["payload"]["raw_nbytes"], "nbytes": 0} for i in range(count)]
    return join(b.data, manifest, b.payload)


def m_scales(b: Base, rng: random.Random) -> bytes:
    import numpy as np

    manifest = b.fresh_manifest()
    record = _tensor(manifest, rng, rng.choice(("int6_row", "int8_row")))
    raw = bytearray(b.raw)
    value = rng.choice((0x7E00, 0x7C00, 0xFC00, 0x0000, 0x8001, 0x7BFF))  # NaN, +inf, -inf, 0, -tiny, 65504
    scales = np.frombuffer(raw, dtype="<u2", count=record["scale_nbytes"] // 2, offset=record["scale_offset"]).copy()
    scales[rng.randrange(len(scales)) if rng.random() < 0.7 else slice(None)] = value
    raw[record["scale_offset"]: record["scale_offset"] + record["scale_nbytes"]] = scales.tobytes()
    if value == 0x7BFF and rng.random() < 0.7:  # 65504 · 31 overflows float16 once restored as float16
        record["dtype"] = "float16"
        position = record["offset"]
        raw[position: position + 4] = bytes([31, 31, 225, 225])
    return b.with_raw(bytes(raw), manifest)


def m_values(b: Base, rng: random.Random) -> bytes:
    import numpy as np

    manifest = b.fresh_manifest()
    raw = bytearray(b.raw)
    choice = rng.randrange(3)
    if choice == 0:  # int6 value out of range
        record = _tensor(manifest, rng, "int6_row")
        raw[record["offset"] + rng.randrange(record["nbytes"])] = rng.choice((32, 40, 127, 128, 200))
    elif choice == 1:  # fp16 NaN / inf / max in a passthrough tensor
        record = _tensor(manifest, rng, "fp16")
        if record["nbytes"]:
            word = rng.choice((0x7E00, 0x7C00, 0xFC00, 0x7BFF))
            position = record["offset"] + 2 * rng.randrange(record["nbytes"] // 2)
            raw[position: position + 2] = struct.pack("<H", word)
    else:  # a float16 passthrough tensor relabelled bfloat16 / float32 (a finite value in each)
        record = _tensor(manifest, rng, "fp16")
        record["dtype"] = rng.choice(("bfloat16", "float32", "float16"))
        values = np.frombuffer(raw, dtype="<f2", count=record["nbytes"] // 2, offset=record["offset"])
        assert np.isfinite(values).all()
    return b.with_raw(bytes(raw), manifest)


def m_raw_bytes(b: Base, rng: random.Random) -> bytes:
    raw = bytearray(b.raw)
    for _ in range(rng.randint(1, 16)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    if rng.random() < 0.3:
        raw = raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else raw + rng.randbytes(rng.randint(1, 99))
    return b.with_raw(bytes(raw))


def m_zstd_bomb(b: Base, rng: random.Random) -> bytes:
    import zstandard

    manifest = b.fresh_manifest()
    extra = rng.choice((1, 1 << 20, 64 << 20, 300 << 20, 1 << 30))
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=rng.random() < 0.5).compressobj()
    zeros = bytes(1 << 20)
    body = compressor.compress(b.raw)
    for _ in range(extra >> 20):
        body += compressor.compress(zeros)
    body += compressor.compress(bytes(extra & ((1 << 20) - 1))) + compressor.flush()
    manifest["payload"].update(compressed_nbytes=len(body), compressed_sha256=hashlib.sha256(body).hexdigest())
    if rng.random() < 0.3:  # also declare the inflated size (the table then disagrees, or the bound refuses it)
        manifest["payload"]["raw_nbytes"] = len(b.raw) + extra
    return join(b.data, manifest, body)


def m_hashes(b: Base, rng: random.Random) -> bytes:
    manifest = b.fresh_manifest()
    key = rng.choice(("compressed_sha256", "raw_sha256", "tokenizer"))
    value = rng.choice(("0" * 64, "f" * 64, hashlib.sha256(rng.randbytes(8)).hexdigest(), "A" * 64, "0" * 63))
    if key == "tokenizer":
        manifest["tokenizer"]["sha256"] = value
    else:
        manifest["payload"][key] = value
    return join(b.data, manifest, b.payload)


def m_garbage(b: Base, rng: random.Random) -> bytes:
    head = rng.choice((b"", b.data[:8], b.data[:12], b.data[:16]))
    return head + rng.randbytes(rng.randint(0, 4096))


MUTATIONS = {f.__name__.removeprefix("m_"): f for f in (
    m_bit_flips, m_manifest_bit_flips, m_truncate, m_trailing, m_header, m_any_field, m_numeric_field,
    m_model_config, m_shape, m_offsets, m_duplicate_name, m_dtype, m_deep_json, m_json_literals, m_declared_sizes,
    m_keys, m_huge_strings, m_many_tensors, m_scales, m_values, m_raw_bytes, m_zstd_bomb, m_hashes, m_garbage)}
# Expensive mutations (large allocations to build the input) are drawn less often.
WEIGHTS = {name: 1.0 for name in MUTATIONS} | {"zstd_bomb": 0.25, "many_tensors": 0.1, "huge_strings": 0.5}


def mutation_for(seed: int) -> tuple[str, random.Random]:
    rng = random.Random(seed)
    names = list(MUTATIONS)
    return rng.choices(names, weights=[WEIGHTS[n] for n in names])[0], rng


# ----------------------------------------------------------------------------------------------------------------
# Worker: parse one mutated input per seed, one JSON line out per seed


def classify(data: bytes) -> tuple[str, str]:
    from trainer.artifact import ArtifactError
    from trainer.artifact_metadata import parse_submission

    try:
        parse_submission(data)
    except ArtifactError as error:
        return f"refused:{error.code}", ""
    except BaseException as error:  # noqa: BLE001  (the point: anything that is not the reader's own)
        if isinstance(error, KeyboardInterrupt):
            raise
        return f"foreign:{type(error).__name__}", str(error)[:300]
    return "accepted", ""


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(base_path: Path, first: int, last: int) -> int:
    import torch

    torch.set_num_threads(1)
    base = Base(base_path.read_bytes())
    classify(base.data)  # first-call costs (torch's meta kernels: seconds) belong to start-up, not to an input
    out = sys.stdout
    out.write(json.dumps({"ready": True, "baseline_rss": vm_hwm_bytes()}) + "\n")
    out.flush()
    for seed in range(first, last):
        name, rng = mutation_for(seed)
        data = MUTATIONS[name](base, rng)
        started = time.perf_counter()
        outcome, detail = classify(data)
        seconds = time.perf_counter() - started
        del data
        out.write(json.dumps({"seed": seed, "mutation": name, "outcome": outcome, "detail": detail,
                              "seconds": round(seconds, 5), "hwm": vm_hwm_bytes()}) + "\n")
        out.flush()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Driver: workers as subprocesses, a watchdog per input, the figures


class Tally:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.by_mutation: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.foreign: list[dict[str, Any]] = []
        self.hangs: list[int] = []
        self.slowest: tuple[float, int, str] = (0.0, -1, "")
        self.peak_rss = 0
        self.baseline_rss = 0
        self.done = 0

    def add(self, record: dict[str, Any]) -> None:
        self.done += 1
        outcome = record["outcome"]
        self.outcomes[outcome] += 1
        self.by_mutation[record["mutation"]][outcome.split(":")[0]] += 1
        if outcome.startswith("foreign:"):
            self.foreign.append(record)
        if record["seconds"] > self.slowest[0]:
            self.slowest = (record["seconds"], record["seed"], record["mutation"])
        self.peak_rss = max(self.peak_rss, record["hwm"])


def _spawn(base_path: Path, first: int, last: int, address_space: int) -> subprocess.Popen[bytes]:
    def limit() -> None:
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.Popen([sys.executable, __file__, "--worker", str(base_path), str(first), str(last)],
                            stdout=subprocess.PIPE, preexec_fn=limit, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_range(base_path: Path, first: int, last: int, tally: Tally, *, hang_seconds: float,
              address_space: int, progress: bool) -> None:
    """Process seeds [first, last) in one worker, restarting it after a hang or a crash."""
    next_seed = first
    while next_seed < last:
        process = _spawn(base_path, next_seed, last, address_space)
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        buffer = b""
        ready = False
        deadline = time.monotonic() + 120.0  # imports
        while True:
            remaining = deadline - time.monotonic()
            events = selector.select(timeout=max(0.0, remaining))
            if not events:
                tally.hangs.append(next_seed)
                tally.done += 1
                process.kill()
                process.wait()
                next_seed += 1
                break
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            if not chunk:  # the worker died (e.g. a segfault): charge the input it was on
                process.wait()
                if next_seed < last:
                    tally.add({"seed": next_seed, "mutation": mutation_for(next_seed)[0], "seconds": 0.0, "hwm": 0,
                               "outcome": f"foreign:crash(exit {process.returncode})", "detail": ""})
                    next_seed += 1
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                record = json.loads(line)
                if "ready" in record:
                    ready = True
                    tally.baseline_rss = max(tally.baseline_rss, record["baseline_rss"])
                else:
                    tally.add(record)
                    next_seed = record["seed"] + 1
                    if progress and tally.done % 5000 == 0:
                        print(f"  {tally.done} inputs, {dict(tally.outcomes.most_common(4))}", file=sys.stderr)
            deadline = time.monotonic() + (hang_seconds if ready else 120.0)
        selector.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        if next_seed >= last:
            return


def fuzz(inputs: int, workers: int, *, seed: int, hang_seconds: float, address_space: int,
         progress: bool) -> tuple[Tally, float]:
    import threading

    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / "base.pgolf"
        base_path.write_bytes(build_base_artifact())
        started = time.perf_counter()
        bounds = [seed + inputs * i // workers for i in range(workers + 1)]
        threads = [threading.Thread(target=run_range, args=(base_path, lo, hi, tally),
                                    kwargs={"hang_seconds": hang_seconds, "address_space": address_space,
                                            "progress": progress})
                   for lo, hi in zip(bounds, bounds[1:], strict=False)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return tally, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------------------
# Named attacks of issue 12, one by one: time and RSS growth of each refusal


def named_attacks() -> list[dict[str, Any]]:
    from trainer.artifact import ArtifactError
    from trainer.artifact_metadata import parse_submission

    base = Base(build_base_artifact())
    cases: dict[str, bytes] = {}
    for layers in (10**30, 10**18):
        manifest = base.fresh_manifest()
        manifest["model_config"]["num_layers"] = layers
        cases[f"num_layers={layers:.0e}"] = join(base.data, manifest, base.payload)
    text = json.dumps(base.fresh_manifest(), separators=(",", ":"))
    deep = text.replace('"training":{', '"training":{"deep":' + "[" * 400_000 + "]" * 400_000 + ",", 1)
    cases["deep JSON (400k levels)"] = join(base.data, None, base.payload, raw_json=deep.encode())
    cases["zstd bomb (+1 GiB)"] = m_zstd_bomb(base, _FixedChoice(1 << 30))
    manifest = base.fresh_manifest()
    manifest["payload"]["raw_nbytes"] = 2**63
    cases["declared raw size 2**63"] = join(base.data, manifest, base.payload)
    results = []
    for name, data in cases.items():
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
        rss_before = vm_hwm_bytes()
        started = time.perf_counter()
        try:
            parse_submission(data)
            outcome = "accepted"
        except ArtifactError as error:
            outcome = f"refused:{error.code}"
        seconds = time.perf_counter() - started
        results.append({"attack": name, "outcome": outcome, "seconds": round(seconds, 4),
                        "rss_growth_bytes": vm_hwm_bytes() - rss_before, "rss_peak_bytes": vm_hwm_bytes()})
    return results


class _FixedChoice(random.Random):
    """An rng whose choice() returns a fixed value first (to pick the bomb size), then behaves normally."""

    def __init__(self, first: Any) -> None:
        super().__init__(0)
        self._first: list[Any] = [first]

    def choice(self, seq: Any) -> Any:
        return self._first.pop() if self._first else super().choice(seq)

    def random(self) -> float:
        return 0.9


# ----------------------------------------------------------------------------------------------------------------


def report(tally: Tally, seconds: float, attacks: list[dict[str, Any]] | None) -> dict[str, Any]:
    foreign = sum(n for k, n in tally.outcomes.items() if k.startswith("foreign:"))
    figures = {
        "inputs": tally.done, "seconds": round(seconds, 1), "inputs_per_second": round(tally.done / seconds, 1),
        "outcomes": dict(tally.outcomes.most_common()), "foreign_exceptions": foreign, "hangs": len(tally.hangs),
        "hang_seeds": tally.hangs[:20], "foreign_examples": tally.foreign[:20],
        "by_mutation": {k: dict(v) for k, v in sorted(tally.by_mutation.items())},
        "slowest": {"seconds": tally.slowest[0], "seed": tally.slowest[1], "mutation": tally.slowest[2]},
        "peak_rss_bytes": tally.peak_rss, "worker_baseline_rss_bytes": tally.baseline_rss,
        "named_attacks": attacks,
    }
    print(f"inputs {tally.done} in {seconds:.1f} s ({figures['inputs_per_second']}/s)")
    print("outcomes:")
    for outcome, count in tally.outcomes.most_common():
        print(f"  {count:8d}  {outcome}")
    print(f"foreign exceptions: {foreign}    hangs: {len(tally.hangs)}")
    for record in tally.foreign[:20]:
        print(f"  seed {record['seed']} ({record['mutation']}): {record['outcome']}: {record['detail']}")
    print("by mutation (accepted / refused / foreign):")
    for name, counts in sorted(tally.by_mutation.items()):
        print(f"  {name:18s} {counts['accepted']:7d} {counts['refused']:7d} {counts['foreign']:5d}")
    print(f"slowest input: {tally.slowest[0]:.3f} s (seed {tally.slowest[1]}, {tally.slowest[2]})")
    print(f"peak RSS of a worker: {tally.peak_rss / MiB:.0f} MiB (after imports: {tally.baseline_rss / MiB:.0f} MiB)")
    if attacks:
        print("named attacks (one parse each, in this process):")
        for attack in attacks:
            print(f"  {attack['attack']:28s} {attack['outcome']:28s} {attack['seconds'] * 1000:8.1f} ms  "
                  f"RSS +{attack['rss_growth_bytes'] / MiB:.1f} MiB (peak {attack['rss_peak_bytes'] / MiB:.0f} MiB)")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="first seed (inputs use seeds seed .. seed+inputs-1)")
    parser.add_argument("--hang-seconds", type=float, default=20.0, help="no answer this long on one input: a hang")
    parser.add_argument("--worker-address-space", type=int, default=3 << 30, help="RLIMIT_AS of each worker; 0: none")
    parser.add_argument("--no-attacks", action="store_true", help="skip the named attacks")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--replay", type=int, help="run one seed in this process and print its outcome")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker[0]), int(args.worker[1]), int(args.worker[2]))
    if args.replay is not None:
        name, rng = mutation_for(args.replay)
        print(name, *classify(MUTATIONS[name](Base(build_base_artifact()), rng)))
        return 0
    tally, seconds = fuzz(args.inputs, args.workers, seed=args.seed, hang_seconds=args.hang_seconds,
                          address_space=args.worker_address_space, progress=args.inputs >= 10_000)
    figures = report(tally, seconds, None if args.no_attacks else named_attacks())
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["foreign_exceptions"] or figures["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
