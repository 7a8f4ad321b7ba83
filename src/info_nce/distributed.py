"""torch.distributed helpers: rank and world size without a process group, gather with gradient.

Everything here works, as a no-op, where torch.distributed is unavailable or no
process group is initialised.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from info_nce._autograd import guard_backward, refuse_derivative, refuse_vmap


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes in the default group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(length: int, device: torch.device) -> list[int]:
    """Every rank's ``length``, in rank order (the ranks may differ)."""
    local = torch.tensor([length], dtype=torch.long, device=device)
    sizes = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return [int(size.item()) for size in sizes]


def _all_gather_padded(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0; the lengths are ``sizes``."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


_ALLGATHER = "gather_distributed (AllGather)"


class AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each rank the gradient of its own rows.

    Every rank's loss may depend on every rank's rows, so the gradient of rank
    r's rows is the sum over all ranks of the gradients they computed for those
    rows: an all-reduce of the gathered gradient, then r's slice (gloo has no
    reduce-scatter; NCCL's would move less data, not change the result).
    """

    @staticmethod
    def forward(tensor: Tensor, sizes: list[int]) -> Tensor:
        return _all_gather_padded(tensor, sizes)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        tensor, ctx.sizes = inputs
        ctx.save_for_backward(tensor)  # to refuse a second derivative (see backward)

    vmap = refuse_vmap(_ALLGATHER)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None]:
        refuse = guard_backward(_ALLGATHER)
        with torch.no_grad():
            sizes: list[int] = ctx.sizes
            grad = grad_output.contiguous()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            start = sum(sizes[: rank()])
            grads: tuple[Tensor | None, ...] = (grad[start : start + sizes[rank()]],)
        if refuse:
            grads = refuse_derivative(_ALLGATHER, grads, ctx.saved_tensors)
        return grads[0], None


def all_gather(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Every rank's rows, concatenated in rank order; differentiable if ``tensor`` needs it.

    Args:
        tensor: (n_r, ...) this rank's rows.
        sizes: every rank's n_r, from `gather_sizes`.

    Returns:
        (sum(sizes), ...) all ranks' rows; rank r's start at ``sum(sizes[:r])``.
    """
    if tensor.requires_grad and torch.is_grad_enabled():
        return cast(Tensor, AllGather.apply(tensor, sizes))  # type: ignore[no-untyped-call]
    return _all_gather_padded(tensor, sizes)


class Gatherer:
    """Gathers tensors of this rank's row count from all ranks (the counts may differ).

    Attributes:
        sizes: every rank's row count, in rank order.
        offset: where this rank's rows start in a gathered tensor.
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.sizes = gather_sizes(rows, device)
        self.offset = sum(self.sizes[: rank()])

    def __call__(self, tensor: Tensor) -> Tensor:
        return all_gather(tensor, self.sizes)
