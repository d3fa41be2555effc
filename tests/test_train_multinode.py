"""Multi-node training on one machine: separate torchrun agents, one per "node", joined by torchrun's rendezvous.

2 nodes × 1 process (c10d rendezvous) must train exactly as 1 node × 2 processes: the same global ranks, data
spans, gloo collectives and thread count (1) make every floating-point operation the same, so the losses are
bit-identical and the artifacts hold identical tensors (their files differ only in the training time the manifest
records). The static rendezvous (--node-rank, --master-addr) carries the wall-clock cap test: one node's clock
runs fast, as a slow node's would, and both nodes must stop after the same step with identical weights.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY

from trainer.artifact import read_artifact
from trainer.config import TrainConfig
from trainer.train import Runtime, init_runtime, train

SKEWED_CLOCK_TRAINER = Path(__file__).resolve().parent / "skewed_clock_trainer.py"
LAUNCH_TIMEOUT_S = 300  # a rank left waiting in a collective would hang: fail instead


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(out: Path, data: Path, *, entry: list[str], torchrun: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, *entry, "train", "--preset", "demo",
            "--data", str(data), "--out", str(out), *TINY, *extra]


def launch_nodes(commands: list[list[str]], envs: list[dict[str, str]]) -> list[str]:
    """Start every torchrun at once (a rendezvous waits for all of its nodes) and return each one's output."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})
             for cmd, env in zip(commands, envs, strict=True)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    return outputs


def train_losses(log: str) -> list[str]:
    return re.findall(r"^step:\d+/\d+ train_loss:\S+", log, re.M)


def test_two_nodes_train_exactly_as_one_node_with_two_processes(tmp_path: Path, embedded_data: Path) -> None:
    extra = ["--iterations", "4", "--max-wallclock-seconds", "0", "--grad-accum-base", "2"]
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    port = free_port()
    c10d = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode-test"]
    # The two agents start together and c10d orders them itself (it does not use --node-rank); the one-node run
    # starts beside them, which only shares the cores.
    two_node_commands = [train_command(two_nodes, embedded_data, entry=["-m", "trainer"], torchrun=c10d,
                                       extra=extra)] * 2
    one_node_command = train_command(one_node, embedded_data, entry=["-m", "trainer"],
                                     torchrun=["--standalone", "--nproc-per-node", "2"], extra=extra)
    *node_outputs, _ = launch_nodes([*two_node_commands, one_node_command], [{}, {}, {}])

    single_log, multi_log = (one_node / "train.log").read_text(), (two_nodes / "train.log").read_text()
    assert "distributed: nodes:1 local_world_size:2 backend:gloo" in single_log
    assert "distributed: nodes:2 local_world_size:1 backend:gloo" in multi_log
    # The node without global rank 0 says where the artifact is written.
    assert sum("global rank 0 runs on" in out for out in node_outputs) == 1

    assert len(train_losses(single_log)) == 4 and train_losses(multi_log) == train_losses(single_log)
    single = json.loads((one_node / "summary.json").read_text())
    multi = json.loads((two_nodes / "summary.json").read_text())
    assert multi["world_size"] == single["world_size"] == 2 and multi["nodes"] == 2 and single["nodes"] == 1
    assert multi["loss_curve"] == single["loss_curve"]  # the full float64 values, not only the printed digits
    assert multi["final_val"] == single["final_val"] and multi["roundtrip"]["val_bpb"] == single["roundtrip"]["val_bpb"]

    a, b = read_artifact(one_node / "model.pgolf"), read_artifact(two_nodes / "model.pgolf")
    assert a.manifest["payload"] == b.manifest["payload"]  # compressed and raw payload hashes: the same bytes
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    # The files differ only where the manifest records this run's own training time.
    for manifest in (a.manifest, b.manifest):
        manifest["training"].pop("train_time_ms")
    assert a.manifest == b.manifest


def test_wallclock_cap_stops_every_node_after_the_same_step(tmp_path: Path, embedded_data: Path) -> None:
    cap_s, scale, iterations = 30, 50.0, 10_000
    out, reports = tmp_path / "capped", tmp_path / "ranks"
    reports.mkdir()
    port = free_port()
    extra = ["--iterations", str(iterations), "--max-wallclock-seconds", str(cap_s), "--grad-accum-base", "2"]
    commands = [train_command(out, embedded_data, entry=[str(SKEWED_CLOCK_TRAINER)], extra=extra,
                              torchrun=["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                        "--master-addr", "127.0.0.1", "--master-port", str(port)])
                for node in (0, 1)]
    # Node 1 (global rank 1, which writes nothing) runs its clock `scale` times fast: it reaches the cap first.
    envs = [{"PGOLF_TEST_RANK_REPORT_DIR": str(reports), "PGOLF_TEST_CLOCK_SCALE": str(s)} for s in (1.0, scale)]
    launch_nodes(commands, envs)

    summary = json.loads((out / "summary.json").read_text())
    rank0, rank1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert summary["stop_reason"] == "wallclock_cap" and 1 <= summary["steps"] < iterations
    assert rank0["steps"] == rank1["steps"] == summary["steps"]
    # Rank 0's own clock stayed far from the cap: the stop came from node 1, and the recorded training time is
    # the largest of the ranks' clocks, node 1's.
    assert rank0["own_train_ms"] < cap_s * 1000 / 4
    assert summary["train_time_ms"] == pytest.approx(rank1["own_train_ms"] * scale, rel=1e-6)
    log = (out / "train.log").read_text()
    assert f"stopping_early: wallclock_cap train_time:{round(summary['train_time_ms'])}ms " \
           f"step:{summary['steps']}/{iterations}" in log
    # The warmdown read the agreed time on both ranks (node 1's clock alone would have lowered only its learning
    # rate), so the replicas stayed bit-identical.
    assert rank0["weights_sha256"] == rank1["weights_sha256"]


def test_a_multi_process_launch_without_torchruns_ranks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guessing LOCAL_RANK from RANK would pick cuda:8 on a second node; only torchrun's LOCAL_RANK names the GPU.
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "9")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=16 but LOCAL_RANK is not set: launch with torchrun"):
        init_runtime()


def test_grad_accumulation_comes_from_the_global_world_size(tmp_path: Path) -> None:
    sixteen_ranks = Runtime(rank=0, world_size=16, local_rank=0, device=torch.device("cpu"), local_world_size=8,
                            nodes=2)
    with pytest.raises(ValueError, match="world size 16 must divide grad_accum_base 8 .* set GRAD_ACCUM_BASE to a "
                                         "multiple of 16"):
        train(TrainConfig(), tmp_path, tmp_path / "tokenizer.model", tmp_path / "out", runtime=sixteen_ranks)
