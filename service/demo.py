"""`python -m service demo`: the whole pipeline on the offline embedded corpus, end to end.

build corpus → train the `demo` preset (its own process) → start the evaluation service (its own process) →
upload the artifact over HTTP with the service's default options (the measured default: score-first TTT + n-gram)
→ print the streamed per-chunk report → upload it again as the seed's method claims (hashed-940, for the
comparison) → stop the service. Everything lands under the work directory: the training run (model.pgolf,
train.log, summary.json), the service's storage, and both evaluation reports as NDJSON (eval.ndjson, the
compliant one for `python -m verifier check`; claimed.ndjson for `python -m verifier compare`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from trainer.limits import SUBMISSION_LIMIT_BYTES


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on the embedded corpus (make demo)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where every output lands")
    parser.add_argument("--data", type=Path, default=Path("data/embedded"),
                        help="embedded corpus directory (built there if missing)")
    parser.set_defaults(handler=run_demo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the service exited with status {server.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the service did not answer {base}/healthz within {timeout:.0f} s")


def upload_and_stream(base: str, artifact: Path, *, token: str, force: bool = False,
                      fields: dict[str, object] | None = None) -> Iterator[dict]:
    """POST the artifact (and the option ``fields``) as multipart/form-data with the bearer `token` and yield the
    NDJSON events as they arrive.

    Standard library only, so the same client serves `make demo` and the compose demo (whose images carry no curl).
    """
    boundary = uuid.uuid4().hex
    head = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                   f"{str(value).lower() if isinstance(value, bool) else value}\r\n"
                   for name, value in (fields or {}).items()).encode()
    head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"artifact\"; filename=\"{artifact.name}\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + artifact.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    query = "?force=true" if force else ""
    request = urllib.request.Request(f"{base.rstrip('/')}/evaluate{query}", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=900) as response:
        for line in response:
            if line.strip():
                yield json.loads(line)


def describe(event: dict) -> str:
    kind = event.get("type")
    if kind == "queued":
        return f"queued: job {event.get('job_id') or event.get('id')}"
    if kind == "start":
        return (f"start: {event.get('targets')} targets, {event.get('bytes')} bytes, {event.get('chunks')} chunks, "
                f"artifact {str(event.get('artifact_sha256', ''))[:12]}")
    if kind == "chunk":
        return (f"chunk {event.get('index')}: targets {event.get('targets')} chunk_bpb {event.get('chunk_bpb'):.4f} "
                f"running_bpb {event.get('running_bpb'):.4f} elapsed {event.get('elapsed_s'):.1f}s")
    if kind == "end":
        compliance = event.get("compliance", {})
        return (f"end: val_loss {event.get('val_loss'):.6f} val_bpb {event.get('val_bpb'):.6f} "
                f"targets {event.get('targets_scored')} elapsed {event.get('elapsed_s'):.1f}s "
                f"compliant {compliance.get('compliant')}")
    return f"{kind}: {event.get('reason', '')}"


def run_demo(args: argparse.Namespace) -> int:
    from service.compare import CLAIMED_OPTIONS
    from trainer.data.embedded import build_embedded
    from trainer.data.val_manifest import recorded_val_sha256

    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    data: Path = args.data
    started = time.monotonic()

    def phase(name: str) -> None:
        print(f"\n== demo: {name} ({time.monotonic() - started:.0f}s)", flush=True)

    if recorded_val_sha256(data) is None:  # absent, or built before manifests recorded the val digest
        phase(f"building the embedded corpus in {data}")
        build_embedded(data)
    phase("training the demo preset")
    run_dir = workdir / "train"
    train = subprocess.run([sys.executable, "-m", "trainer", "train", "--preset", "demo", "--data", str(data),
                            "--out", str(run_dir)])
    if train.returncode != 0:
        print(f"demo: training failed with status {train.returncode}", file=sys.stderr)
        return train.returncode
    artifact = run_dir / "model.pgolf"

    phase("starting the evaluation service")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # No engine arguments: the engine evaluates at the artifact's training sequence length (seq 256 for the demo
    # preset), stride 64, in the default TTT recipe's reference chunks, exactly as for any upload. Auth is on, as
    # everywhere: the demo gives its service a fresh admin token and uploads with it.
    token = "pgolf_demo_" + secrets.token_urlsafe(24)
    env = dict(os.environ, PGOLF_DATA_DIR=str(data), PGOLF_TOKENIZER=str(data / "tokenizer.model"),
               PGOLF_STORAGE_DIR=str(workdir / "service"), PGOLF_HOST="127.0.0.1", PGOLF_PORT=str(port),
               PGOLF_API_TOKEN=token)
    server_log = (workdir / "service.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=server_log,
                              stderr=subprocess.STDOUT)
    report = workdir / "eval.ndjson"
    claimed_report = workdir / "claimed.ndjson"
    try:
        _wait_healthy(base, server)
        phase(f"uploading {artifact} to {base}/evaluate with the default options (streamed report)")
        final = stream_to(report, upload_and_stream(base, artifact, token=token, force=True))
        phase(f"uploading it again as the seed's method claims ({CLAIMED_OPTIONS}), for the comparison")
        claimed = stream_to(claimed_report, upload_and_stream(base, artifact, token=token, force=True,
                                                              fields=CLAIMED_OPTIONS))
        jobs = [next((e.get("job_id") for e in events if e.get("type") == "queued"), None)
                for events in (final, claimed)]
        print(f"the page shows this pair at {base}/?compare={jobs[0]},{jobs[1]} while the service runs", flush=True)
        final = final[-1] if final else {}
    except (OSError, urllib.error.URLError, RuntimeError) as exc:
        print(f"demo: evaluation over HTTP failed: {exc} (service log: {workdir / 'service.log'})", file=sys.stderr)
        return 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()

    summary = json.loads((run_dir / "summary.json").read_text())
    phase("done")
    print(f"train: {summary['steps']} steps in {summary['train_time_ms'] / 1000:.1f}s "
          f"(limit {summary['train_time_limit_ms'] / 1000:.0f}s), artifact {summary['artifact']['total_bytes']:,} "
          f"bytes incl. code (limit {SUBMISSION_LIMIT_BYTES:,})")
    if final.get("type") != "end":
        print(f"demo: the evaluation ended with {final.get('type')!r}: {final.get('reason', '')}", file=sys.stderr)
        return 1
    print(f"eval:  val_bpb {final['val_bpb']:.6f} over {final['targets_scored']:,} targets "
          f"in {final['elapsed_s']:.1f}s -> {report} (claimed method: {claimed_report})")
    print(f"demo: {time.monotonic() - started:.0f}s so far; `make demo` goes on with `verifier check` and "
          "`verifier compare`", flush=True)
    return 0


def stream_to(report: Path, events: Iterator[dict]) -> list[dict]:
    """Write the events to ``report`` as they arrive, print a line for each; returns them."""
    seen = []
    with report.open("w") as out:
        for event in events:
            out.write(json.dumps(event, allow_nan=False) + "\n")
            out.flush()
            print(describe(event), flush=True)
            seen.append(event)
    return seen
