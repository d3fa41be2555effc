"""Muon and its Newton–Schulz kernel: formulas by hand, the gloo distributed scheme in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.model import GPT, ModelConfig
from trainer.muon import NS_COEFFICIENTS, Muon, zeropower_via_newtonschulz5
from trainer.train import parameter_groups

REPO_ROOT = Path(__file__).resolve().parents[1]



def scalar_newton_schulz(s: np.ndarray, steps: int = 5) -> np.ndarray:
    """The NS5 polynomial applied to singular values: the matrix iteration acts on each one independently."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def matrix_with_singular_values(rows: int, cols: int, singular_values: np.ndarray, seed: int):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=generator, dtype=torch.float64))
    return u, torch.from_numpy(singular_values), v


# ---- Newton–Schulz ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 192), (512, 128), (24, 40)])
def test_newton_schulz_singular_values_stay_in_the_band(shape):
    # Measured over these shapes and 3 seeds: 0.673 … 1.146. The quintic's fixed points sit around 0.7–1.13
    # (it trades exactness for speed); bf16 adds about ±0.01. Gaussian matrices with aspect ratio ≥ 5/3 have no
    # near-zero singular values, which NS5 could not lift into the band in 5 steps.
    for seed in range(3):
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        out = zeropower_via_newtonschulz5(g)
        assert out.dtype == torch.bfloat16 and out.shape == g.shape
        singular_values = torch.linalg.svdvals(out.double())
        assert singular_values.min() > 0.65 and singular_values.max() < 1.20


@pytest.mark.parametrize("rows, cols", [(8, 24), (24, 8)])
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.03), (torch.float32, 1e-5)])
def test_newton_schulz_is_the_scalar_polynomial_on_singular_values(rows, cols, dtype, atol):
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.7, 0.4, 0.25, 0.1])
    u, s_t, v = matrix_with_singular_values(rows, cols, s, seed=0)
    g = (u * s_t) @ v.T
    expected = (u * torch.from_numpy(scalar_newton_schulz(s / np.linalg.norm(s)))) @ v.T  # Frobenius-normalised
    out = zeropower_via_newtonschulz5(g.float(), dtype=dtype)
    assert out.dtype == dtype
    # Same singular vectors; each normalised singular value mapped by the polynomial (0.75 … 1.13 here).
    assert torch.allclose(out.double(), expected, atol=atol)


def test_muon_refuses_non_matrix_parameters_and_unsupported_dtypes():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    with pytest.raises(ValueError, match="backend_dtype"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=0.1, backend_dtype=torch.float16)


# ---- one optimizer step by hand -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nesterov, backend_dtype", [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float32)]
)
def test_muon_steps_match_the_hand_computed_update(nesterov, backend_dtype):
    generator = torch.Generator().manual_seed(1)
    initial = torch.randn(6, 4, generator=generator)  # tall: shape scale sqrt(6/4)
    grads = [torch.randn(6, 4, generator=generator) for _ in range(2)]
    lr, momentum, weight_decay = 0.1, 0.9, 0.5

    p = torch.nn.Parameter(initial.clone())
    optimizer = Muon(
        [p], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, backend_dtype=backend_dtype
    )
    for g in grads:
        p.grad = g.clone()
        optimizer.step()

    expected = initial.clone()
    buf = torch.zeros(6, 4)
    for g in grads:
        buf = momentum * buf + g
        direction = g + momentum * buf if nesterov else buf
        update = zeropower_via_newtonschulz5(direction, dtype=backend_dtype) * (6 / 4) ** 0.5
        expected = expected * (1 - lr * weight_decay)
        expected = expected - lr * update.float()
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert optimizer.state[p]["momentum_buffer"].dtype == torch.float32
    assert torch.allclose(optimizer.state[p]["momentum_buffer"], buf)


def test_wide_matrices_get_no_shape_scale_and_params_without_grad_are_untouched():
    wide = torch.nn.Parameter(torch.zeros(4, 6))
    idle = torch.nn.Parameter(torch.ones(4, 6))
    wide.grad = torch.randn(4, 6)
    Muon([wide, idle], lr=1.0, momentum=0.0, weight_decay=0.1).step()
    assert torch.allclose(wide.detach(), -zeropower_via_newtonschulz5(wide.grad).float())
    assert torch.equal(idle.detach(), torch.ones(4, 6))


# ---- distributed: two gloo processes --------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from trainer.muon import Muon

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    generator = torch.Generator().manual_seed(0)  # same params and grads on both ranks, as after DDP's all-reduce
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 4), (4, 8), (6, 6))]
    optimizer = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.04)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    np.save(out, np.concatenate([p.detach().numpy().ravel() for p in params]))
    print("owned", sorted(i for i, p in enumerate(params) if p in optimizer.state))
    dist.destroy_process_group()
    """
)


def test_distributed_muon_over_gloo_matches_the_single_process_update(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store = tmp_path / "store"
    outputs = [tmp_path / f"rank{rank}.npy" for rank in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(store), str(outputs[rank])],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        )
        for rank in range(2)
    ]
    results = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr
    # Parameter i is orthogonalised on rank i % 2, so only that rank holds its momentum buffer.
    assert "owned [0, 2]" in results[0][0] and "owned [1]" in results[1][0]

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 4), (4, 8), (6, 6))]
    optimizer = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.04)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    single = np.concatenate([p.detach().numpy().ravel() for p in params])
    rank0, rank1 = (np.load(path) for path in outputs)
    # Each slot of the summed buffer has exactly one non-zero contribution, so the results are bit-identical.
    np.testing.assert_array_equal(rank0, rank1)
    np.testing.assert_array_equal(rank0, single)


# ---- end to end -----------------------------------------------------------------------------------------------


def test_tiny_model_loss_falls_with_muon_and_adamw_on_a_repeated_batch():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, bigram_buckets=64,
        bigram_dim=16,
    )
    model = GPT(config)
    groups = parameter_groups(model)
    muon = Muon(groups["matrix"], lr=0.025, momentum=0.95, weight_decay=0.04)
    adam = torch.optim.AdamW(
        [{"params": groups["embed"], "lr": 0.035}, {"params": groups["scalar"], "lr": 0.025}],
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.04,
    )
    ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        muon.step()
        adam.step()
        muon.zero_grad(set_to_none=True)
        adam.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(64), abs=0.3)  # near-uniform at the reference init
    assert losses[-1] < 0.5 * losses[0], losses
