import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.artifact import read_artifact
from trainer.config import ConfigError, TrainConfig, env_overrides, resolve_config
from trainer.train import lr_multiplier, muon_momentum

TINY = ["--num-layers", "2", "--model-dim", "64", "--num-heads", "2", "--num-kv-heads", "1",
        "--bigram-buckets", "64", "--bigram-dim", "16", "--xsa-last-n", "2", "--train-seq-len", "64",
        "--train-batch-tokens", "512", "--val-batch-tokens", "8192", "--warmup-steps", "1", "--val-loss-every", "0",
        "--train-log-every", "1"]


def run_train(out: Path, data: Path, *extra: str, nproc: int = 1,
              env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "trainer"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "trainer"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([*launcher, "train", "--preset", "demo", "--data", str(data), "--out", str(out), *TINY,
                           *extra], capture_output=True, text=True, timeout=600, env=environment)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_reference_environment_names_and_cli_flags_override_the_preset() -> None:
    config = resolve_config("pr940", {"matrix_lr": 0.5}, environ={"NUM_LAYERS": "9", "MATRIX_LR": "0.1",
                                                                  "BIGRAM_VOCAB_SIZE": "2048", "HOME": "/root"})
    assert config.model.num_layers == 9 and config.model.bigram_buckets == 2048
    assert config.matrix_lr == 0.5  # the flag wins over the environment
    assert resolve_config("pr940", environ={}) == TrainConfig()
    assert env_overrides({"VALUE_RESIDUAL": "0", "GATED_ATTENTION": "true"}) == {"value_residual": False,
                                                                                   "gated_attention": True}


def test_unknown_or_unsupported_settings_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown configuration field"):
        resolve_config("pr940", {"num_layer": 3}, environ={})
    with pytest.raises(ConfigError, match="SWA_ENABLED=1: SWA is accumulated but never applied"):
        resolve_config("pr940", environ={"SWA_ENABLED": "1"})
    with pytest.raises(ConfigError, match="NUM_LAYERS: cannot read 'eleven' as int"):
        resolve_config("pr940", environ={"NUM_LAYERS": "eleven"})
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("gpt5", environ={})
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--data", ".", "--out", ".", "--num-layer", "3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --num-layer" in proc.stderr


def test_pr940_preset_is_the_submission() -> None:
    config = resolve_config("pr940", environ={})
    assert (config.model.num_layers, config.model.model_dim, config.model.num_heads, config.model.num_kv_heads) == (
        11, 512, 8, 4)
    assert config.train_batch_tokens == 786_432 and config.train_seq_len == 2048
    assert config.max_wallclock_seconds == 600 and config.warmdown_iters == 3000 and config.ema_decay == 0.997
    assert config.model.bigram_buckets == 4096 and config.model.xsa_last_n == 11


def test_wallclock_warmdown_falls_linearly_to_zero_at_the_cap() -> None:
    config = TrainConfig(max_wallclock_seconds=10.0, warmdown_iters=5)
    assert lr_multiplier(config, 10, 5000.0) == 1.0  # 500 ms/step: warmdown is the last 2.5 s
    assert lr_multiplier(config, 16, 8000.0) == pytest.approx(0.8)
    assert lr_multiplier(config, 19, 9500.0) == pytest.approx(0.2)
    assert lr_multiplier(config, 20, 10000.0) == 0.0
    by_steps = TrainConfig(max_wallclock_seconds=0, iterations=100, warmdown_iters=10)
    assert lr_multiplier(by_steps, 89, 0) == 1.0 and lr_multiplier(by_steps, 95, 0) == pytest.approx(0.5)


def test_muon_momentum_warms_up_linearly() -> None:
    config = TrainConfig()
    assert muon_momentum(config, 0) == pytest.approx(0.92)
    assert muon_momentum(config, 750) == pytest.approx(0.955)
    assert muon_momentum(config, 5000) == pytest.approx(0.99)


def test_training_run_writes_artifact_log_and_summary(tmp_path: Path, embedded_data: Path) -> None:
    out = tmp_path / "run"
    run_train(out, embedded_data, "--iterations", "12", "--max-wallclock-seconds", "0")
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "train.log").read_text()
    assert summary["steps"] == 12 and summary["stop_reason"] == "iterations"
    assert summary["world_size"] == 1 and summary["device"].startswith("1xcpu")
    assert summary["within_train_time_limit"] and summary["artifact"]["within_size_limit"]
    curve = summary["loss_curve"]
    assert [s for s, _ in curve] == list(range(1, 13)) and curve[-1][1] < curve[0][1]
    artifact = read_artifact(out / "model.pgolf")
    assert artifact.file_sha256 == summary["artifact"]["sha256"]
    assert artifact.manifest["training"]["steps"] == 12
    assert summary["artifact"]["bytes"] == (out / "model.pgolf").stat().st_size
    exact = re.search(r"^final_int6_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", log, re.M)
    assert exact and float(exact.group(2)) == pytest.approx(summary["roundtrip"]["val_bpb"], abs=1e-8)
    for line in ("warmup_step:1/1", "ema:applying EMA weights", "DIAGNOSTIC post_ema val_loss:",
                 "quant_try int6 zstd-16:", "Total submission size:", "step:12/12 val_loss:"):
        assert line in log


def test_wallclock_cap_stops_training_and_logs_it(tmp_path: Path, embedded_data: Path) -> None:
    out = tmp_path / "capped"
    run_train(out, embedded_data, "--iterations", "100000", "--max-wallclock-seconds", "3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "wallclock_cap" and 0 < summary["steps"] < 100000
    assert f"stopping_early: wallclock_cap train_time:{round(summary['train_time_ms'])}ms" in (
        out / "train.log").read_text()
    # The run stops before the step that would cross the cap (predicted from recent step times).
    assert summary["train_time_ms"] <= 3000 + max(1000.0, 3000 / summary["steps"])


def test_two_process_ddp_matches_one_process_with_grad_accumulation(tmp_path: Path, embedded_data: Path) -> None:
    """2 ranks × 1 micro-step and 1 rank × 2 micro-steps see the same tokens; their losses must agree.

    Tolerance: relative 1e-4 per step. The gradient all-reduce sums in a different order than accumulation, and
    Muon's bf16 Newton–Schulz amplifies those last-bit differences a little; bugs (wrong spans, missing
    averaging, unsynchronised updates) show up as differences of 1e-2 or more.
    """
    common = ["--iterations", "6", "--max-wallclock-seconds", "0", "--grad-accum-base", "2"]
    run_train(tmp_path / "single", embedded_data, *common)
    run_train(tmp_path / "ddp", embedded_data, *common, nproc=2)
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    for (s1, l1), (s2, l2) in zip(single["loss_curve"], ddp["loss_curve"], strict=True):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-4)
    assert ddp["final_val"]["val_loss"] == pytest.approx(single["final_val"]["val_loss"], rel=1e-4)
