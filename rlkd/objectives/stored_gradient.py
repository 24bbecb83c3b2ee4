"""The backward of the chunked losses (dense and sparse teacher), which compute each token's gradient
in forward, chunk by chunk, so that no (tokens x vocabulary) autograd graph is kept."""

from __future__ import annotations

import torch


def stored_gradient_backward(ctx, grad_per_token: torch.Tensor) -> torch.Tensor:
    """The logits' gradient of a loss whose forward stored each token's d(loss)/d(logits), times
    ``ctx.grad_scale``, in ``ctx.grad_flat`` (rows ``ctx.saved_tensors[0]``): each stored row times its
    token's incoming gradient. The stored buffer is reused in place and released unless
    ``ctx.retain`` (a loss built with ``retain_gradient=True``, which may be differentiated twice)."""
    (positions,) = ctx.saved_tensors
    grad_flat = ctx.grad_flat
    if grad_flat is None:
        raise RuntimeError("DistillLoss: a second backward through the same loss; build it with "
                           "retain_gradient=True to allow that")
    row_scale = torch.zeros(grad_flat.shape[0], dtype=grad_flat.dtype, device=grad_flat.device)
    # The stored gradient already carries grad_scale (the factor backward brings, when the caller
    # announced it right): what is left is ~1 and exactly representable.
    row_scale.index_copy_(0, positions, (grad_per_token / ctx.grad_scale).to(grad_flat.dtype))
    if ctx.retain:
        return grad_flat * row_scale.unsqueeze(-1)
    ctx.grad_flat = None
    return grad_flat.mul_(row_scale.unsqueeze(-1))
