"""Load on the evaluation service: read latency while evaluations run, jobs per minute, API memory during uploads.

    .venv/bin/python bench/service_load.py                       # FineWeb sample if present, else embedded corpus
    .venv/bin/python bench/service_load.py --clients 32 --seconds 20 --uploads 1,8,32
    .venv/bin/python bench/service_load.py --database-url postgresql://pgolf@db-host/pgolf_bench   # a cluster

Without `--database-url`: one `python -m service serve` (SQLite) running `--workers` evaluations itself. With it:
a cluster on this machine sharing that PostgreSQL database (use a scratch database: the bench adds its jobs to
it): two API nodes (`PGOLF_WORKERS=0`) and `--workers` `python -m service worker` processes, each with a storage
directory of its own. Either way a real engine evaluates a tiny random-weight artifact (a preview of the
validation data in small chunks), and then:

1. `--jobs` uploads are queued (the same artifact, force=true), and while they run `--clients` concurrent clients
   hammer GET /healthz, /limits, /evaluations and /evaluations/{id} for `--seconds`, spread over the API nodes;
   prints p50/p99 latency per endpoint;
2. once every job has ended: jobs per minute, from the first upload stored to the last job finished, and how
   many jobs each worker ran;
3. upload phase: for each N in `--uploads`, N concurrent uploads of a 16,000,000-byte file (at the cap, refused
   by the reader afterwards) plus N of 16,000,001 bytes (cut off with 413); prints the (first) API process's peak
   RSS while they run. The API streams uploads to disk, so the peak should stay flat as N grows; the reader and
   the evaluator run in their own processes and are not part of this figure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import httpx

from trainer.limits import SUBMISSION_LIMIT_BYTES

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_ARGS = "--device cpu --seq-len 256 --stride 128 --chunk-tokens 2048 --max-tokens 65537"
TINY_MODEL = {"num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1, "mlp_mult": 2,
              "bigram_buckets": 64, "bigram_dim": 16, "xsa_last_n": 2}
CAP = SUBMISSION_LIMIT_BYTES
BENCH_TOKEN = "pgolf-bench-token-0123456789"  # the service's admin token for this run
AUTH = {"Authorization": f"Bearer {BENCH_TOKEN}"}


def locate_data(scratch: Path) -> tuple[Path, Path]:
    sample = Path(os.environ.get("PGOLF_SHARED_DATA") or REPO_ROOT.parent / "shared/data/fineweb_sample")
    tokenizer = sample / "tokenizers" / "fineweb_1024_bpe.model"
    if tokenizer.is_file():
        return sample / "datasets" / "fineweb10B_sp1024", tokenizer
    from trainer.data.embedded import build_embedded

    build_embedded(scratch / "embedded", log=lambda _message: None)
    return scratch / "embedded", scratch / "embedded" / "tokenizer.model"


def write_tiny_artifact(path: Path, tokenizer: Path) -> Path:
    import sentencepiece
    import torch

    from trainer.code_bytes import counted_code_bytes
    from trainer.export import write_artifact
    from trainer.model import GPT, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(**TINY_MODEL)
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    training = {"seed": 0, "steps": 0, "world_size": 1, "device": "cpu", "train_time_ms": 0.0,
                "code_version": "bench"}
    write_artifact(path, GPT(config).state_dict(), config, hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
                   vocab_size, training, code_bytes=counted_code_bytes())
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_env(data_dir: Path, tokenizer: Path, storage: Path, max_uploads: int, database_url: str | None
             ) -> dict[str, str]:
    room = str(2 * max_uploads + 2)  # room for every concurrent upload: measure, not refuse
    return {**os.environ, "PGOLF_DATA_DIR": str(data_dir), "PGOLF_TOKENIZER": str(tokenizer),
            "PGOLF_STORAGE_DIR": str(storage), "PGOLF_EVAL_ARGS": ENGINE_ARGS, "PGOLF_QUEUE_BOUND": "64",
            "PGOLF_UPLOADS_PER_CLIENT": room, "PGOLF_UPLOADS_IN_FLIGHT": room, "PGOLF_API_TOKEN": BENCH_TOKEN,
            **({"PGOLF_DATABASE_URL": database_url} if database_url else {})}


def start_service(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO_ROOT,
                               env={**env, "PGOLF_PORT": str(port)}, stdout=log_path.open("wb"),
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"service did not start; see {log_path}")


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "service", "worker"], cwd=REPO_ROOT, env=env,
                               stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "ready" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"worker did not start; see {log_path}")
        time.sleep(0.1)
    return process


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples a process's resident set every few milliseconds while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()

    def __enter__(self) -> PeakRss:
        self.peak_kib = rss_kib(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            time.sleep(0.005)

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def read_phase(urls: list[str], job_id: str, clients: int, seconds: float) -> dict[str, list[float]]:
    endpoints = ["/healthz", "/limits", "/evaluations", f"/evaluations/{job_id}"]
    latencies: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(offset: int) -> None:
        with httpx.Client(base_url=urls[offset % len(urls)], timeout=30) as client:
            n = offset
            while time.monotonic() < stop_at:
                path = endpoints[n % len(endpoints)]
                started = time.perf_counter()
                response = client.get(path)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                with lock:
                    latencies[path.replace(job_id, "{id}")].append(elapsed)
                n += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def upload_phase(url: str, files: list[Path], token_headers: dict[str, str]) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def send(path: Path) -> None:
        with httpx.Client(base_url=url, timeout=300) as client, path.open("rb") as handle:
            try:
                status = client.post("/evaluate", params={"wait": "false"}, headers=token_headers,
                                     files={"artifact": (path.name, handle)}).status_code
            except httpx.TransportError:
                status = 0  # the server cut the connection (only expected for over-cap bodies)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send, args=(path,)) for path in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--uploads", default="1,4,16", help="comma-separated numbers of concurrent uploads")
    parser.add_argument("--database-url", help="a scratch PostgreSQL database: run a cluster of 2 API nodes and "
                                               "--workers worker processes on it instead of one SQLite service")
    parser.add_argument("--workers", type=int, default=2, help="evaluations at once (worker processes, or "
                                                               "PGOLF_WORKERS of the single service)")
    parser.add_argument("--jobs", type=int, default=8, help="evaluations queued for the read and throughput phases")
    args = parser.parse_args()
    upload_counts = [int(n) for n in args.uploads.split(",")]

    with tempfile.TemporaryDirectory(prefix="pgolf-bench-") as scratch_name:
        scratch = Path(scratch_name)
        data_dir, tokenizer = locate_data(scratch)
        artifact = write_tiny_artifact(scratch / "tiny.pgolf", tokenizer)
        processes: list[subprocess.Popen] = []

        def env_for(name: str) -> dict[str, str]:
            return node_env(data_dir, tokenizer, scratch / name, max(upload_counts), args.database_url)

        try:
            if args.database_url:
                apis = [start_service({**env_for(f"api-{n}"), "PGOLF_WORKERS": "0"}, scratch / f"api-{n}.log")
                        for n in range(2)]
                processes += [process for process, _url in apis]
                processes += [start_worker(env_for(f"worker-{n}"), scratch / f"worker-{n}.log")
                              for n in range(args.workers)]
                layout = f"cluster: 2 API nodes + {args.workers} worker processes on PostgreSQL"
            else:
                apis = [start_service({**env_for("storage"), "PGOLF_WORKERS": str(args.workers)},
                                      scratch / "server.log")]
                processes += [apis[0][0]]
                layout = f"one service (SQLite) with {args.workers} in-process workers"
            api_process, url = apis[0]
            urls = [u for _process, u in apis]
            with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
                job_ids = []
                for _ in range(args.jobs):
                    with artifact.open("rb") as handle:
                        job_ids.append(client.post("/evaluate", params={"wait": "false", "force": "true"},
                                                   files={"artifact": ("tiny.pgolf", handle)}).json()["id"])
                job_id = job_ids[0]
                while client.get(f"/evaluations/{job_id}").json()["status"] != "running":
                    time.sleep(0.1)
                print(f"{layout}; API nodes {', '.join(urls)} (first API pid {api_process.pid}); {args.jobs} jobs "
                      f"queued (engine: {ENGINE_ARGS})")

                latencies = read_phase(urls, job_id, args.clients, args.seconds)
                counts = client.get("/healthz").json()
                print(f"\nread latency, {args.clients} concurrent clients over {len(urls)} API node(s) for "
                      f"{args.seconds:g} s while the jobs run (after: {counts['running']} running, "
                      f"{counts['queued']} queued):")
                print(f"  {'endpoint':<22}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}")
                everything: list[float] = []
                for path, values in sorted(latencies.items()):
                    everything += values
                    print(f"  {path:<22}{len(values):>9}{1000 * statistics.median(values):>9.1f}"
                          f"{1000 * percentile(values, 0.99):>9.1f}")
                print(f"  {'all':<22}{len(everything):>9}{1000 * statistics.median(everything):>9.1f}"
                      f"{1000 * percentile(everything, 0.99):>9.1f}   ({len(everything) / args.seconds:.0f} req/s)")

                while any(client.get(f"/evaluations/{j}").json()["status"] in ("queued", "running")
                          for j in job_ids):
                    time.sleep(0.5)
                jobs = [client.get(f"/evaluations/{j}").json() for j in job_ids]
                span = (max(iso_seconds(j["finished_at"]) for j in jobs)
                        - min(iso_seconds(j["created_at"]) for j in jobs))
                per_worker = defaultdict(int)
                for job in jobs:
                    per_worker[job["worker_id"]] += 1
                statuses = ", ".join(f"{s} x{[j['status'] for j in jobs].count(s)}"
                                     for s in sorted({j["status"] for j in jobs}))
                print(f"\nthroughput: {len(jobs)} jobs ({statuses}) in {span:.1f} s = "
                      f"{60 * len(jobs) / span:.1f} jobs/minute with {args.workers} workers; per worker: "
                      + ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items())))

                at_cap, over_cap = scratch / "at-cap.bin", scratch / "over-cap.bin"
                for path, size in ((at_cap, CAP), (over_cap, CAP + 1)):
                    with path.open("wb") as handle:
                        handle.write(os.urandom(size))
                print(f"\nAPI process peak RSS during concurrent uploads (baseline "
                      f"{rss_kib(api_process.pid) / 1024:.0f} MiB; each round: N uploads of "
                      f"{SUBMISSION_LIMIT_BYTES:,} bytes + N of {SUBMISSION_LIMIT_BYTES + 1:,} bytes):")
                print(f"  {'N':>4}{'peak MiB':>10}{'over baseline':>15}{'MB uploaded':>13}   statuses")
                for count in upload_counts:
                    baseline = rss_kib(api_process.pid)
                    with PeakRss(api_process.pid) as peak:
                        statuses_seen = upload_phase(url, [at_cap] * count + [over_cap] * count, AUTH)
                    summary = ", ".join(f"{s}x{statuses_seen.count(s)}" for s in sorted(set(statuses_seen)))
                    print(f"  {count:>4}{peak.peak_kib / 1024:>10.1f}{(peak.peak_kib - baseline) / 1024:>12.1f} MiB"
                          f"{2 * count * CAP / 1e6:>13.0f}   {summary}")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
