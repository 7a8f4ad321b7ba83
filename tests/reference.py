"""A float64 InfoNCE written from the formula, and the comparison helpers of the tests.

`reference_info_nce` shares no code with the package: it normalises with
``x / max(|x|, 1e-12)``, writes the logits of each mode out from their
definition and takes ``logsumexp(logits_i / t) - logit_target / t`` per query.
The tests compare the package's loss and gradients with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["in-batch", "unpaired", "paired"]
MODES: tuple[Mode, ...] = ("in-batch", "unpaired", "paired")
REDUCTIONS = ("mean", "sum", "none")
NORM_EPS = 1e-12  # as in F.normalize, used by info-nce-pytorch


@dataclass(frozen=True)
class Tolerance:
    """``rtol`` relative to each expected value, ``atol`` to the scale; see `assert_close`."""

    rtol: float
    atol: float


# Exact arithmetic against the float64 reference; float32 to its rounding.
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-6),
}
# Half-precision inputs against the float32 result of the same (upcast) values:
# normalisation (and, on the dense path, the logits) round to the inputs'
# precision. About 4x the largest error seen at temperature 0.01.
HALF_TOLERANCES = {
    torch.float16: Tolerance(rtol=1e-2, atol=2e-3),
    torch.bfloat16: Tolerance(rtol=5e-2, atol=1e-2),
}


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _identity(x: Tensor) -> Tensor:
    return x


def reference_info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None = None,
    temperature: float = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    *,
    normalize: bool = True,
) -> Tensor:
    """InfoNCE in float64 from its definition; differentiable in its inputs.

    ``normalize=False`` takes the inputs as already unit-normalised.

    In-batch (no negatives): logits ``q @ p.T``, target i. Unpaired negatives
    (M, D): logits ``[q_i . p_i, q_i @ n.T]``, target 0. Paired negatives
    (B, M, D): logits ``[q_i . p_i, q_i . n_ij]``, target 0.
    """
    unit = _unit if normalize else _identity
    q, p = unit(query.double()), unit(positive_key.double())  # (B, D)
    batch = len(q)
    if negative_keys is None:
        logits = q @ p.T  # (B, B)
        target = torch.arange(batch)
    else:
        n = unit(negative_keys.double())
        positive_logit = (q * p).sum(dim=1, keepdim=True)  # (B, 1)
        if negative_mode == "unpaired":
            negative_logits = q @ n.T  # (B, M)
        elif negative_mode == "paired":
            negative_logits = torch.einsum("bd,bmd->bm", q, n)  # (B, M)
        else:
            raise AssertionError(negative_mode)
        logits = torch.cat([positive_logit, negative_logits], dim=1)  # (B, 1 + M)
        target = torch.zeros(batch, dtype=torch.long)
    scaled = logits / temperature
    target_logit = scaled.gather(1, target.unsqueeze(1)).squeeze(1)  # (B,)
    loss = torch.logsumexp(scaled, dim=1) - target_logit  # (B,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    assert reduction == "none", reduction
    return loss


def make_inputs(
    mode: Mode,
    batch: int,
    dim: int,
    num_negatives: int = 5,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = True,
) -> list[Tensor]:
    """Random [query, positive_key] or [query, positive_key, negative_keys] for `mode`."""
    generator = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, ...]] = [(batch, dim), (batch, dim)]
    if mode == "unpaired":
        shapes.append((num_negatives, dim))
    elif mode == "paired":
        shapes.append((batch, num_negatives, dim))
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        .to(dtype)
        .requires_grad_(requires_grad)
        for shape in shapes
    ]


def negative_mode_of(mode: Mode) -> str:
    return "paired" if mode == "paired" else "unpaired"


def upstream_gradient(shape: torch.Size, seed: int = 1) -> Tensor:
    """A random float64 upstream gradient: one weight per query for 'none', else a scalar."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) + 0.5


@dataclass(frozen=True)
class Expected:
    """The reference loss and gradients, and the size of the terms each is made of.

    ``loss_scale`` and ``grad_scales`` are the sizes rounding in an
    implementation is relative to: the logits are at most ``1 / t`` (summed
    over B rows for ``'sum'``); a gradient is made of terms as large as
    ``weight / t * max(1, 1 / t)`` or the largest gradient with respect to
    the unit vectors, divided by the row's norm (one scale per row, shape
    (..., 1)). Where the terms cancel (the projection of the normalisation
    gives exactly 0 for D = 1; a near-certain positive gives P - 1 ~ 0) the
    error is relative to the terms, not to the result.
    """

    loss: Tensor
    grads: list[Tensor]
    loss_scale: float
    grad_scales: list[Tensor]


def reference_loss_and_grads(
    inputs: Sequence[Tensor],
    upstream: Tensor,
    *,
    temperature: float,
    reduction: str,
    negative_mode: str,
) -> Expected:
    """The reference on float64 copies of `inputs`, with gradients for `upstream`."""
    copies = [x.detach().double().requires_grad_(True) for x in inputs]
    units = [_unit(x) for x in copies]
    unit_leaves = [u.detach().requires_grad_(True) for u in units]
    loss = reference_info_nce(
        *unit_leaves,
        temperature=temperature,
        reduction=reduction,
        negative_mode=negative_mode,
        normalize=False,
    )
    unit_grads = torch.autograd.grad(loss, unit_leaves, grad_outputs=upstream)
    grads = torch.autograd.grad(units, copies, grad_outputs=unit_grads)
    # A logit's gradient is at most the row's weight (|P - 1| <= 1), a unit
    # vector's at most that over t. P itself is exp(logit / t - lse), whose
    # exponent is rounded relative to 1 / t: once more a factor 1 / t.
    row_weight = float(upstream.abs().max()) / (len(inputs[0]) if reduction == "mean" else 1)
    term = row_weight / temperature * max(1.0, 1.0 / temperature)
    grad_scales = [
        max(term, float(unit_grad.abs().max()) if unit_grad.numel() else 0.0)
        / torch.linalg.vector_norm(x.detach(), dim=-1, keepdim=True).clamp_min(NORM_EPS)
        for unit_grad, x in zip(unit_grads, copies, strict=True)
    ]
    rows = len(inputs[0]) if reduction == "sum" else 1
    loss_scale = rows * max(1.0, 1.0 / temperature)
    return Expected(loss.detach(), list(grads), loss_scale, grad_scales)


INPUT_NAMES = ("query", "positive_key", "negative_keys")


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    rtol: float,
    atol: float,
    name: str = "tensor",
    scale: float | Tensor | None = None,
) -> None:
    """Assert ``|actual - expected| <= atol * scale + rtol * |expected|`` elementwise.

    ``scale`` is the size of the terms the value is made of (a number, or a
    tensor that broadcasts, e.g. one per row); by default the largest
    ``|expected|``, at least 1. So ``atol`` bounds the error of elements that
    cancel to near zero relative to the terms they cancel from.
    Both sides are compared in float64; equal infinities match, NaN never does.
    On failure the message names the worst element: its index, both values, and
    its absolute and relative error.
    """
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    actual64 = actual.detach().to("cpu", torch.float64)
    expected64 = expected.detach().to("cpu", torch.float64)
    if actual64.numel() == 0:
        return
    if scale is None:
        finite_expected = expected64[torch.isfinite(expected64)]
        scale = max(1.0, float(finite_expected.abs().max())) if finite_expected.numel() else 1.0
    scale = torch.as_tensor(scale, dtype=torch.float64).broadcast_to(expected64.shape)
    error = (actual64 - expected64).abs()
    error = torch.where(actual64 == expected64, 0.0, error)  # equal infinities
    error = torch.nan_to_num(error, nan=math.inf)
    allowed = atol * scale + rtol * expected64.abs()
    within = error <= allowed
    if bool(within.all()):
        return
    excess = torch.where(within, -math.inf, error / allowed)  # inf where allowed is 0
    worst = int(excess.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
    got, want = actual64.flatten()[worst].item(), expected64.flatten()[worst].item()
    abs_error = abs(got - want)
    rel_error = abs_error / abs(want) if want else math.inf
    raise AssertionError(
        f"{name}: {int((~within).sum())} of {error.numel()} elements differ beyond "
        f"rtol={rtol:g}, atol={atol:g} (x scale {scale.flatten()[worst].item():.3g}); "
        f"worst at index {index}: "
        f"actual {got!r}, expected {want!r}, abs error {abs_error:.3e}, "
        f"rel error {rel_error:.3e}"
    )


def assert_matches(
    loss: Tensor,
    grads: Sequence[Tensor | None],
    expected: Expected,
    tolerance: Tolerance,
    *,
    expected_loss: Tensor | None = None,
    expected_grads: Sequence[Tensor] | None = None,
) -> None:
    """Loss and gradients against `expected` (or other values at its scales, e.g. the seed's).

    A None in `grads` skips that input (its gradient was not asked for).
    """
    want_loss = expected.loss if expected_loss is None else expected_loss
    want_grads = expected.grads if expected_grads is None else expected_grads
    assert_close(
        loss,
        want_loss,
        rtol=tolerance.rtol,
        atol=tolerance.atol,
        name="loss",
        scale=expected.loss_scale,
    )
    assert len(grads) == len(want_grads)
    for name, got, want, scale in zip(
        INPUT_NAMES, grads, want_grads, expected.grad_scales, strict=False
    ):
        if got is None:  # not asked for (the input needs no gradient)
            continue
        assert_close(
            got,
            want,
            rtol=tolerance.rtol,
            atol=tolerance.atol,
            name=f"gradient of {name}",
            scale=scale,
        )


def dtype_id(dtype: torch.dtype) -> str:
    """A readable pytest id for a dtype: 'float32'."""
    return str(dtype).removeprefix("torch.")


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: on tiny tensors thread hand-offs only cost time (a lot when busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
