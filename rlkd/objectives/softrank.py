"""Differentiable soft ranks of Blondel et al. 2020 ("Fast Differentiable Sorting and Ranking").

With l2 regularisation of strength eps, the soft rank of a row x of n values is the projection of
x / eps onto the permutahedron of (1, ..., n): sort theta = x / eps in decreasing order (s), solve
the decreasing isotonic regression v of s - (n, ..., 1), and the ranks are s - v, un-permuted. As
eps -> 0 they become the hard ranks (1 = smallest); torchsort computes the same quantity.

Rows of different lengths are packed into one [R, n] tensor with a ``valid`` mask. Padding is
handled exactly, without a loop over rows: padded entries are placed far enough below the row's
smallest valid value that the isotonic regression can never pool them with valid entries, which
makes the valid part of the solution that of the valid entries alone, ranks shifted by the number
of padded entries (removed again before returning).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def torchsort_available() -> bool:
    try:
        import torchsort  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


@functools.lru_cache(maxsize=None)
def torchsort_runs_on(device_type: str) -> bool:
    """Whether torchsort computes soft ranks on this kind of device. Importable is not enough: built
    without nvcc (scripts/install.sh on a machine without the CUDA toolkit) it has no CUDA kernel
    and raises on CUDA tensors, so one tiny call on the device decides."""
    if not torchsort_available():
        return False
    import torchsort

    try:
        probe = torch.tensor([[0.3, 0.1, 0.2]], device=device_type, requires_grad=True)
        torchsort.soft_rank(probe, regularization="l2", regularization_strength=1.0).sum().backward()
    except Exception:  # noqa: BLE001 - any failure means "not on this device"
        return False
    return True


def isotonic_decreasing(y: torch.Tensor) -> torch.Tensor:
    """argmin_v ||v - y||^2 s.t. v_1 >= v_2 >= ... >= v_n, per row, differentiable.

    Uses the closed form v_i = min_{j<=i} max_{l>=i} mean(y_j..y_l): O(n^2) memory per row but
    fully vectorised, which beats a sequential pool-adjacent-violators loop for the short rows
    (n <= 2k) of the ranking loss. Gradients flow through the selected block means, which is the
    block-averaging Jacobian of isotonic regression.
    """
    n = y.shape[-1]
    idx = torch.arange(n, device=y.device)
    upper = idx[:, None] <= idx[None, :]  # [j, l]: block j..l is non-empty
    blocks = torch.where(upper, y.unsqueeze(-2), torch.zeros((), dtype=y.dtype, device=y.device))
    lengths = (idx[None, :] - idx[:, None] + 1).clamp_min(1).to(y.dtype)
    means = blocks.cumsum(-1) / lengths  # [..., j, l] = mean(y_j..y_l) where j <= l
    best_end = means.flip(-1).cummax(-1).values.flip(-1)  # [..., j, i] = max_{l>=i} mean(j..l)
    best_end = best_end.masked_fill(~upper, float("inf"))  # only starts j <= i are allowed
    return best_end.min(dim=-2).values


def _soft_rank_dense(theta: torch.Tensor) -> torch.Tensor:
    n = theta.shape[-1]
    sorted_theta, order = theta.sort(dim=-1, descending=True)
    weights = torch.arange(n, 0, -1, device=theta.device, dtype=theta.dtype)
    ranks_sorted = sorted_theta - isotonic_decreasing(sorted_theta - weights)
    return torch.empty_like(ranks_sorted).scatter(-1, order, ranks_sorted)


def soft_rank(
    values: torch.Tensor,
    valid: torch.Tensor | None = None,
    regularization_strength: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Soft ranks of each row of ``values`` [R, n] among its ``valid`` entries (all if None).

    Returned ranks of valid entries lie on the scale 1..m (m = valid count of the row); padded
    entries get 0. ``backend``: "torch" (built in), "torchsort" (needs the package) or "auto".
    """
    if values.dim() != 2:
        raise ValueError(f"soft_rank expects [rows, n] values, got shape {tuple(values.shape)}")
    if regularization_strength <= 0:
        raise ValueError(f"regularization_strength must be > 0, got {regularization_strength}")
    if backend == "auto":
        backend = "torchsort" if torchsort_runs_on(values.device.type) else "torch"
    elif backend == "torchsort" and not torchsort_runs_on(values.device.type):
        raise RuntimeError(f"ranking.backend=torchsort: the installed torchsort cannot rank {values.device.type} "
                           "tensors (not installed, or built without CUDA); use backend auto or torch")
    if backend not in {"torch", "torchsort"}:
        raise ValueError(f"unknown soft-rank backend {backend!r}; use 'torch', 'torchsort' or 'auto'")

    n = values.shape[-1]
    theta = values / regularization_strength
    if valid is not None:
        n_valid = valid.sum(-1, keepdim=True)
        with torch.no_grad():
            row_min = torch.where(valid, theta, torch.full_like(theta, float("inf"))).amin(-1, keepdim=True)
            row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
            # Any valid y = s - w is >= row_min - n and any padded y <= fill - 1: a gap of 2n + 2
            # keeps every padded entry strictly below every valid one, so no block mixes them.
            fill = (row_min - (2 * n + 2)).expand_as(theta)
        theta = torch.where(valid, theta, fill)

    if backend == "torchsort":
        import torchsort

        ranks = torchsort.soft_rank(theta, regularization="l2", regularization_strength=1.0)
    else:
        ranks = _soft_rank_dense(theta)

    if valid is None:
        return ranks
    return torch.where(valid, ranks - (n - n_valid).to(ranks.dtype), torch.zeros_like(ranks))
