"""CPU thread policy: idle usable cores shared by the local processes; an explicit setting is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.threads import choose_threads

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cores", "load", "local", "expected"), [
    (2, 0.2, 1, 2),  # an idle 2-core laptop: both cores
    (2, 5.6, 1, 1),  # the shared 2-core machine bench/train_step.py measured: never oversubscribe
    (2, 0.7, 1, 1),  # one core's worth of other work
    (1, 0.0, 1, 1),
    (192, 0.0, 8, 24),  # a GPU node under torchrun: the cores split between the 8 local ranks
    (192, 40.0, 8, 19),
    (4, 0.0, 8, 1),  # more ranks than cores: still one thread each
])
def test_threads_are_idle_cores_over_local_processes(cores: int, load: float, local: int, expected: int) -> None:
    choice = choose_threads({"LOCAL_WORLD_SIZE": str(local)}, cores=cores, load=load)
    assert choice.threads == expected
    assert f"{cores} usable cores" in choice.reason and f"{local} local processes" in choice.reason
    assert choice.describe().startswith(f"intra_op_threads:{expected} (")


def test_without_torchrun_there_is_one_local_process() -> None:
    assert choose_threads({}, cores=8, load=0.0).threads == 8


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_an_explicit_setting_is_honoured(name: str) -> None:
    import torch

    choice = choose_threads({name: "3", "LOCAL_WORLD_SIZE": "8"}, cores=64, load=0.0)
    assert choice.threads == torch.get_num_threads()
    assert choice.reason == f"{name}=3 is set: honoured"


PROBE = ("import json, torch\nfrom trainer.threads import apply_thread_policy\nc = apply_thread_policy()\n"
         "print(json.dumps({'threads': c.threads, 'torch': torch.get_num_threads(), 'reason': c.reason}))")


def _probe(env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**base, **env}, timeout=120, check=True)
    return json.loads(done.stdout)


def test_a_real_process_sets_torch_to_the_choice() -> None:
    chosen = _probe({"LOCAL_WORLD_SIZE": "2"})
    assert chosen["torch"] == chosen["threads"] >= 1
    assert chosen["threads"] <= max(1, len(os.sched_getaffinity(0)) // 2)
    explicit = _probe({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"})
    assert explicit == {"threads": 1, "torch": 1, "reason": "OMP_NUM_THREADS=1 is set: honoured"}
