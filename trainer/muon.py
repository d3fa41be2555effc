"""Muon: momentum SGD whose update direction is orthogonalised by a Newton–Schulz iteration.

This is the optimizer the reference stack uses for every 2-D matrix inside the transformer blocks (plus the
BigramHash projection), reproduced from the non-banked DDP code of PR #287 / #761 (reference-stack §5.1–5.2):

    buf ← μ·buf + g                  (fp32 momentum buffer, same dtype as the grad)
    u   ← g + μ·buf                  (Nesterov; plain momentum uses u = buf)
    O   ← NS5(u) · sqrt(max(1, rows/cols))
    p   ← p·(1 − lr·wd)              (decoupled weight decay)
    p   ← p − lr·O

Distributed mode (torch.distributed initialised, any backend incl. gloo on CPU): parameter i is orthogonalised
only on rank i % world_size, every rank writes its share into one flat (bf16) buffer that is all_reduce(SUM)-ed,
and every rank then applies the full update. Each slot of the buffer is written by exactly one rank and is zero
elsewhere, so the sum is exact and all ranks end with bit-identical parameters. Gradients must already be
averaged across ranks (DDP does that) before `step()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic Newton–Schulz coefficients from modded-nanogpt. They are tuned for speed, not convergence: the
# iteration does not reach the orthogonal polar factor exactly but leaves singular values in a band around 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate the orthogonal factor U·Vᵀ of G = U·S·Vᵀ with `steps` quintic Newton–Schulz iterations.

    Runs in bf16 by default (as upstream: the iteration is robust to it and it is the fast path on tensor
    cores) and returns a tensor of G's shape in that dtype. CPUs without bf16 matrix units run it several
    times slower than fp32, hence `dtype`. Dividing by the Frobenius norm puts every singular value in [0, 1],
    inside the iteration's basin. The iteration works on the wide orientation (rows ≤ cols) so that
    X·Xᵀ is the smaller Gram matrix.
    """
    if G.ndim != 2:
        raise ValueError(f"Newton–Schulz needs a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    X = X / (X.norm() + NS_EPS)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (see the module docstring for the update rule and the distributed scheme).

    `lr` and `momentum` are read from each param group at every step, so a trainer can schedule them
    (the reference warms momentum up 0.92 → 0.99 and scales lr by the wall-clock warmdown multiplier).
    `backend_dtype` is the Newton–Schulz and update-buffer dtype: bf16 is the reference; fp32 is the faster
    choice on CPUs without bf16 matrix units (measured ~5× on the project's 2-core AMD EPYC dev machine).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.025,
        momentum: float = 0.99,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        backend_steps: int = 5,
        backend_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if backend_steps < 1:
            raise ValueError(f"backend_steps must be >= 1, got {backend_steps}")
        if backend_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"backend_dtype must be torch.bfloat16 or torch.float32, got {backend_dtype}")
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, backend_steps=backend_steps
        )
        super().__init__(params, defaults)
        self.backend_dtype = backend_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0

        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            if not params:
                continue
            lr = group["lr"]
            weight_decay = group["weight_decay"]

            # One flat buffer for the whole group: this rank fills the slots of the parameters it owns, the
            # rest stay zero, and a single all_reduce(SUM) hands every rank every update.
            total = sum(p.numel() for p in params)
            updates = torch.zeros(total, device=params[0].device, dtype=self.backend_dtype)
            offset = 0
            for index, p in enumerate(params):
                if index % world_size == rank and p.grad is not None:
                    updates[offset : offset + p.numel()] = self._orthogonalised_update(p, group).reshape(-1)
                offset += p.numel()

            if distributed and world_size > 1:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)

            offset = 0
            for p in params:
                numel = p.numel()
                # A parameter without a gradient did not take part in the loss. DDP makes that the same on
                # every rank, so skipping it (no decay either) keeps the ranks in step.
                if p.grad is not None:
                    if weight_decay > 0.0:
                        p.mul_(1.0 - lr * weight_decay)
                    p.add_(updates[offset : offset + numel].view_as(p).to(dtype=p.dtype), alpha=-lr)
                offset += numel
        return loss

    def _orthogonalised_update(self, p: Tensor, group: dict) -> Tensor:
        """Advance p's momentum buffer and return the shape-scaled Newton–Schulz update (backend dtype)."""
        grad = p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
        buf: Tensor = state["momentum_buffer"]
        momentum = group["momentum"]
        buf.mul_(momentum).add_(grad)
        direction = grad.float().add(buf, alpha=momentum) if group["nesterov"] else buf
        update = zeropower_via_newtonschulz5(direction, steps=group["backend_steps"], dtype=self.backend_dtype)
        # Orthogonalised updates have unit spectral norm regardless of shape; tall matrices (MLP up, 1536×512)
        # get sqrt(rows/cols) so their per-element RMS matches the square ones.
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5
