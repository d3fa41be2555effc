"""`python -m trainer` with this process's training clock running fast, for the multi-node wall-clock cap test.

A node whose clock runs PGOLF_TEST_CLOCK_SCALE times faster reaches the cap first, as a slower node would: the
test shows that every node then stops after the same step. The script also records this rank's optimiser steps
(EMA updates: one per training step, none in the rolled-back priming steps), its own unscaled training time and
a hash of its trained weights in PGOLF_TEST_RANK_REPORT_DIR/rank<RANK>.json: the per-rank record that rank 0's
train.log, the only log, cannot give.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from trainer import train as train_module
from trainer.cli import main

SCALE = float(os.environ.get("PGOLF_TEST_CLOCK_SCALE", "1"))
REPORT_DIR = Path(os.environ["PGOLF_TEST_RANK_REPORT_DIR"])
STARTED = time.perf_counter()
timers: list[train_module.Timer] = []
models: list[torch.nn.Module] = []
steps = 0


def fast_now(self: train_module.Timer) -> float:
    return STARTED + (time.perf_counter() - STARTED) * SCALE


def registering_init(self: train_module.Timer, device, _init=train_module.Timer.__init__) -> None:
    _init(self, device)
    timers.append(self)


def counting_update(self: train_module.EMA, model, _update=train_module.EMA.update) -> None:
    global steps
    steps += 1
    if not models:
        models.append(model)
    _update(self, model)


train_module.Timer._now = fast_now
train_module.Timer.__init__ = registering_init
train_module.EMA.update = counting_update
status = main()
weights = hashlib.sha256()
for name, tensor in sorted(models[0].state_dict().items()):  # the trained model, EMA weights applied
    weights.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
# The loop pauses the timer before it ends, so accumulated_ms is this rank's whole (scaled) training time.
(REPORT_DIR / f"rank{os.environ['RANK']}.json").write_text(json.dumps(
    {"steps": steps, "clock_scale": SCALE, "own_train_ms": timers[-1].accumulated_ms / SCALE,
     "weights_sha256": weights.hexdigest()}))
raise SystemExit(status)
