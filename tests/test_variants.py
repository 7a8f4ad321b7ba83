"""The decoupled, debiased and hard-negative objectives against float64 formulas, on both paths.

The reference here is written from the papers' definitions, row by row and in
exp space as the authors' code is (float64 holds exp(200) easily), sharing
nothing with the package's log-space objectives:

* decoupled (Yeh et al. 2022): ``log sum_{j negative} exp(s_j) - mean_{p positive} s_p``;
  a row without negatives costs 0.
* debiased (Chuang et al. 2020) with hard-negative weights (Robinson et al.
  2021): ``w_j = exp(beta s_j)``, ``reweight = N sum_j w_j exp(s_j) / sum_j w_j``,
  ``Ng = max((reweight - tau N exp(s+)) / (1 - tau), N exp(-1/t))``,
  ``loss = log(exp(s+) + Ng) - s+``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from reference import assert_close, upstream_gradient
from tiling import on_path, tiles_on_path  # noqa: F401  (an autouse fixture)
from torch import Tensor

from info_nce import InfoNCE, NTXent, info_nce, nt_xent


@dataclass(frozen=True)
class Kind:
    """One objective: its options and the reference row loss they stand for."""

    name: str
    decoupled: bool = False
    false_negative_rate: float = 0.0
    hard_negative_beta: float = 0.0

    def options(self) -> dict[str, float | bool]:
        return {
            "decoupled": self.decoupled,
            "false_negative_rate": self.false_negative_rate,
            "hard_negative_beta": self.hard_negative_beta,
        }


KINDS = (
    Kind("decoupled", decoupled=True),
    Kind("debiased", false_negative_rate=0.1),
    Kind("hard-negative", false_negative_rate=0.1, hard_negative_beta=1.0),
    Kind("hard-negative-only", hard_negative_beta=0.5),
)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def reference_rows(
    logits: Tensor, positive: Tensor, kind: Kind, temperature: float | Tensor
) -> Tensor:
    """Each row's loss: ``logits`` (R, C) float64, non-candidates at -inf; ``positive`` (R, C)."""
    losses = []
    for row, is_positive in zip(logits, positive, strict=True):
        candidate = torch.isfinite(row)
        negatives = row[candidate & ~is_positive]
        positives = row[is_positive]
        if kind.decoupled:
            if len(negatives) == 0:
                losses.append(row.new_zeros(()))
            else:
                losses.append(torch.log(torch.exp(negatives).sum()) - positives.mean())
            continue
        assert len(positives) == 1, "the debiased loss has one positive per anchor"
        s_pos, count = positives[0], len(negatives)
        if count == 0:  # Ng = 0
            losses.append(torch.log(torch.exp(s_pos)) - s_pos)
            continue
        importance = torch.exp(kind.hard_negative_beta * negatives)
        reweight = count * (importance * torch.exp(negatives)).sum() / importance.sum()
        tau = kind.false_negative_rate
        estimate = (reweight - tau * count * torch.exp(s_pos)) / (1 - tau)
        floor = count * torch.exp(-1 / torch.as_tensor(temperature, dtype=torch.float64))
        negative_sum = torch.maximum(estimate, floor)
        losses.append(torch.log(torch.exp(s_pos) + negative_sum) - s_pos)
    return torch.stack(losses)


def _reduce(values: Tensor, reduction: str) -> Tensor:
    return {"mean": values.mean, "sum": values.sum, "none": lambda: values}[reduction]()


# --- info_nce -----------------------------------------------------------------------------


CASES = (
    "in-batch",
    "unpaired",
    "queue",  # unpaired negatives without gradient
    "paired-mask",
    "in-batch+hard",
    "symmetric",
    "symmetric-unpaired",
)


def info_nce_inputs(case: str, batch: int, dim: int, seed: int) -> dict[str, Tensor | None]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    query, positive = randn(batch, dim), randn(batch, dim)
    negatives = mask = None
    if case in ("unpaired", "symmetric-unpaired"):
        negatives = randn(7, dim)
    elif case == "queue":
        negatives = randn(7, dim).detach()
    elif case in ("paired-mask", "in-batch+hard"):
        negatives = randn(batch, 4, dim)
        mask = torch.rand(batch, 4, generator=generator) > 0.3
        mask[0] = False  # a row with only padding
    return {"query": query, "positive_key": positive, "negative_keys": negatives, "mask": mask}


def call_info_nce(
    case: str,
    inputs: dict[str, Tensor | None],
    kind: Kind,
    *,
    temperature: float | Tensor,
    reduction: str,
    chunk_size: int | None,
    labels: Tensor | None = None,
) -> Tensor:
    query, positive = inputs["query"], inputs["positive_key"]
    assert query is not None
    assert positive is not None
    return info_nce(
        query,
        positive,
        inputs["negative_keys"],
        temperature=temperature,
        reduction=reduction,  # type: ignore[arg-type]
        negative_mode="paired" if inputs["mask"] is not None else "unpaired",
        symmetric=case.startswith("symmetric"),
        in_batch_negatives=True if case == "in-batch+hard" else None,
        negative_mask=inputs["mask"],
        labels=labels,
        chunk_size=chunk_size,
        **kind.options(),  # type: ignore[arg-type]
    )


def reference_info_nce(
    case: str,
    inputs: dict[str, Tensor | None],
    kind: Kind,
    *,
    temperature: float | Tensor,
    labels: Tensor | None = None,
) -> Tensor:
    """Per-query loss (symmetric: the mean of the two directions), float64."""
    query, positive = inputs["query"], inputs["positive_key"]
    negatives, mask = inputs["negative_keys"], inputs["mask"]
    assert query is not None
    assert positive is not None
    q, p = _unit(query), _unit(positive)
    batch = len(q)
    same = torch.eye(batch, dtype=torch.bool) if labels is None else labels[:, None] == labels
    in_batch = case in ("in-batch", "in-batch+hard", "symmetric") or labels is not None
    if in_batch:
        logits, positive_columns = q @ p.T, same
    else:
        logits = (q * p).sum(1, keepdim=True)
        positive_columns = torch.ones(batch, 1, dtype=torch.bool)
    padding = torch.zeros_like(positive_columns)  # (B, C) True: no candidate
    if negatives is not None:
        n = _unit(negatives)
        negative_logits = torch.einsum("bd,bmd->bm", q, n) if mask is not None else q @ n.T
        logits = torch.cat([logits, negative_logits], 1)
        no = torch.zeros(negative_logits.shape, dtype=torch.bool)
        positive_columns = torch.cat([positive_columns, no], 1)
        padding = torch.cat([padding, no if mask is None else ~mask], 1)
    # Padding leaves the candidates after the division by the temperature, so
    # that no -inf / t enters a temperature gradient (0 * inf is NaN).
    logits = (logits / temperature).masked_fill(padding, -math.inf)
    rows = reference_rows(logits, positive_columns, kind, temperature)
    if case.startswith("symmetric"):
        key_rows = reference_rows(p @ q.T / temperature, same, kind, temperature)
        rows = (rows + key_rows) / 2
    return rows


# chunk_size per path: "engine" walks 5 rows per block (blocks 5, 5, ..., 2);
# "tiles" lets the engine choose, with limits that split rows into tiles.
PATHS = {"dense": None, "engine": 5, "tiles": None}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_info_nce_variants_match_the_formula(
    kind: Kind, case: str, path: str, reduction: str, temperature: float, one_thread: None
) -> None:
    inputs = info_nce_inputs(case, batch=12, dim=6, seed=hash((case, kind.name)) % 1000)
    loss = call_info_nce(
        case, inputs, kind, temperature=temperature, reduction=reduction, chunk_size=PATHS[path]
    )
    expected = _reduce(reference_info_nce(case, inputs, kind, temperature=temperature), reduction)
    _check_loss_and_grads(loss, expected, inputs, temperature)


def _check_loss_and_grads(
    loss: Tensor, expected: Tensor, inputs: dict[str, Tensor | None], temperature: float
) -> None:
    """Loss, and gradients under a random upstream gradient, against the float64 formula."""
    scale = max(1.0, 1.0 / temperature)
    assert_close(loss, expected, rtol=1e-10, atol=1e-10 * scale, name="loss")
    leaves = [
        x for name, x in inputs.items() if name != "mask" and x is not None and x.requires_grad
    ]
    upstream = upstream_gradient(expected.shape)
    grads = torch.autograd.grad(loss, leaves, upstream)
    want = torch.autograd.grad(expected, leaves, upstream)
    for got, ref in zip(grads, want, strict=True):
        assert_close(got, ref, rtol=1e-9, atol=1e-10 * scale**2, name="gradient")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("case", ["in-batch", "paired-mask", "symmetric", "queue"])
def test_float32_variants_match_the_float64_formula(kind: Kind, case: str) -> None:
    inputs = info_nce_inputs(case, batch=37, dim=123, seed=4)
    single = {
        k: None if v is None else v.detach().float().requires_grad_() for k, v in inputs.items()
    }
    single["mask"] = inputs["mask"]
    temperature = 0.05
    for path, chunk_size in PATHS.items():
        with on_path(path):
            loss = call_info_nce(
                case, single, kind, temperature=temperature, reduction="mean", chunk_size=chunk_size
            )
        expected = reference_info_nce(case, inputs, kind, temperature=temperature).mean()
        assert_close(loss, expected, rtol=1e-5, atol=1e-5, name="loss")
        leaves = [single[n] for n in ("query", "positive_key")]
        ref_leaves = [inputs[n] for n in ("query", "positive_key")]
        grads = torch.autograd.grad(loss, leaves)  # type: ignore[arg-type]
        want = torch.autograd.grad(expected, ref_leaves)  # type: ignore[arg-type]
        for got, ref in zip(grads, want, strict=True):
            assert_close(got, ref, rtol=1e-4, atol=1e-6 / temperature, name="gradient")


@pytest.mark.parametrize("case", ["in-batch", "symmetric", "in-batch+hard"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_decoupled_with_labels_drops_every_positive(
    case: str, path: str, reduction: str, one_thread: None
) -> None:
    inputs = info_nce_inputs(case, batch=13, dim=5, seed=8)
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 3, 0, 4, 1, 2, 5, 0])
    kind = KINDS[0]
    loss = call_info_nce(
        case,
        inputs,
        kind,
        temperature=0.2,
        reduction=reduction,
        chunk_size=PATHS[path],
        labels=labels,
    )
    expected = reference_info_nce(case, inputs, kind, temperature=0.2, labels=labels)
    _check_loss_and_grads(loss, _reduce(expected, reduction), inputs, 0.2)


# --- nt_xent ------------------------------------------------------------------------------


def reference_nt_xent(
    views: Tensor,
    kind: Kind,
    temperature: float | Tensor,
    labels: Tensor | None = None,
    first_view_only: bool = False,
    negatives: Tensor | None = None,
) -> Tensor:
    """Per-anchor loss (V * B,) or (B,), float64; ``negatives`` (M, D): extra negatives."""
    num_views, batch, _ = views.shape
    z = _unit(views.reshape(num_views * batch, -1))
    sample = torch.arange(batch) if labels is None else labels
    label = sample.repeat(num_views)
    itself = torch.eye(len(z), dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(itself, -math.inf)
    positive = (label[:, None] == label) & ~itself
    if negatives is not None:
        logits = torch.cat([logits, z @ _unit(negatives).T / temperature], 1)
        positive = torch.cat([positive, torch.zeros(len(z), len(negatives), dtype=torch.bool)], 1)
    if first_view_only:
        logits, positive = logits[:batch], positive[:batch]
    return reference_rows(logits, positive, kind, temperature)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.01, 1.0])
@pytest.mark.parametrize("anchors", ["all", "first"])
@pytest.mark.parametrize("queue", [False, True], ids=["views", "views+queue"])
def test_nt_xent_variants_match_the_formula(
    kind: Kind,
    path: str,
    reduction: str,
    temperature: float,
    anchors: str,
    queue: bool,
    one_thread: None,
) -> None:
    # With ``queue``, 7 extra negatives (a queue's entries, without gradient).
    generator = torch.Generator().manual_seed(11)
    views = torch.randn(2, 9, 4, generator=generator, dtype=torch.float64).requires_grad_()
    negatives = torch.randn(7, 4, generator=generator, dtype=torch.float64) if queue else None
    loss = nt_xent(
        views,
        temperature=temperature,
        reduction=reduction,  # type: ignore[arg-type]
        anchors=anchors,  # type: ignore[arg-type]
        chunk_size=PATHS[path],
        negative_keys=negatives,
        **kind.options(),  # type: ignore[arg-type]
    )
    rows = reference_nt_xent(
        views, kind, temperature, first_view_only=anchors == "first", negatives=negatives
    )
    expected = _reduce(rows, reduction)
    if reduction == "none" and anchors == "all":
        expected = expected.view(2, 9)
    _check_loss_and_grads(loss, expected, {"views": views}, temperature)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_decoupled_nt_xent_over_three_views(
    path: str, with_labels: bool, reduction: str, one_thread: None
) -> None:
    generator = torch.Generator().manual_seed(12)
    views = torch.randn(3, 7, 5, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0]) if with_labels else None
    loss = nt_xent(
        views,
        labels,
        temperature=0.3,
        reduction=reduction,  # type: ignore[arg-type]
        chunk_size=PATHS[path],
        decoupled=True,
    )
    rows = reference_nt_xent(views, KINDS[0], 0.3, labels)
    expected = _reduce(rows, reduction)
    if reduction == "none":
        expected = expected.view(3, 7)
    _check_loss_and_grads(loss, expected, {"views": views}, 0.3)


# --- equalities ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["in-batch", "unpaired", "paired-mask", "symmetric"])
def test_the_estimator_without_bias_correction_is_the_plain_loss(case: str, path: str) -> None:
    # tau+ -> 0 and beta -> 0 reach the plain loss through the estimator's own
    # code (tau+ = 0 and beta = 0 exactly select InfoNCE's objective).
    inputs = info_nce_inputs(case, batch=11, dim=4, seed=2)
    plain = call_info_nce(
        case, inputs, Kind("plain"), temperature=0.1, reduction="none", chunk_size=PATHS[path]
    )
    for kind in (
        Kind("tiny tau", false_negative_rate=1e-13),
        Kind("tiny beta", hard_negative_beta=1e-13),
    ):
        loss = call_info_nce(
            case, inputs, kind, temperature=0.1, reduction="none", chunk_size=PATHS[path]
        )
        assert_close(loss, plain, rtol=1e-10, atol=1e-10, name=kind.name)


@pytest.mark.parametrize("path", PATHS)
def test_hard_negative_beta_zero_is_the_debiased_loss(path: str) -> None:
    generator = torch.Generator().manual_seed(3)
    views = torch.randn(2, 10, 6, generator=generator, dtype=torch.float64)
    debiased = nt_xent(views, reduction="none", chunk_size=PATHS[path], false_negative_rate=0.2)
    weighted = nt_xent(
        views,
        reduction="none",
        chunk_size=PATHS[path],
        false_negative_rate=0.2,
        hard_negative_beta=1e-13,
    )
    assert_close(weighted, debiased, rtol=1e-10, atol=1e-10, name="beta -> 0")
    plain = nt_xent(views, reduction="none", chunk_size=PATHS[path])
    assert not torch.allclose(debiased, plain)  # the correction does something


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_decoupled_nt_xent_is_lightlys_dcl_loss(
    lightly_dcl_loss: type, path: str, temperature: float
) -> None:
    # lightly 1.6.0's DCLLoss (no weighting function), read from its wheel.
    generator = torch.Generator().manual_seed(15)
    views = torch.randn(2, 23, 9, generator=generator, dtype=torch.float64).requires_grad_()
    loss = nt_xent(views, temperature=temperature, chunk_size=PATHS[path], decoupled=True)
    expected = lightly_dcl_loss(temperature=temperature)(views[0], views[1])
    assert_close(loss, expected, rtol=1e-12, atol=1e-12, name="loss")
    (grad,) = torch.autograd.grad(loss, views)
    (want,) = torch.autograd.grad(expected, views)
    assert_close(grad, want, rtol=1e-10, atol=1e-12, name="gradient")
    plain = nt_xent(views, temperature=temperature, chunk_size=PATHS[path])
    assert float(plain.detach()) > float(loss.detach()) + 1e-3  # the positives left the denominator


def test_hard_negative_weights_carry_gradient() -> None:
    # Not detached, as in the authors' code: the gradient differs from the one
    # with the weights held fixed, which the formula with detached weights gives.
    generator = torch.Generator().manual_seed(4)
    views = torch.randn(2, 8, 5, generator=generator, dtype=torch.float64).requires_grad_()
    kind = Kind("hcl", false_negative_rate=0.1, hard_negative_beta=1.0)
    loss = nt_xent(views, temperature=0.5, chunk_size=4, **kind.options())  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(loss, views)
    (want,) = torch.autograd.grad(reference_nt_xent(views, kind, 0.5).mean(), views)
    assert_close(grad, want, rtol=1e-9, atol=1e-12, name="gradient")


# --- the clamp, empty rows, temperature ---------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_clamp_branch(path: str) -> None:
    # Positives equal to their anchors (s+ = 1/t) and tau+ = 0.5: the estimate
    # mean - tau exp(s+) is negative, so Ng is N exp(-1/t) and the loss is
    # softplus(log N - 1/t - s+) = log(1 + N exp(-2/t)).
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    inputs = {
        "query": query.clone().requires_grad_(),
        "positive_key": query.clone().requires_grad_(),
    }
    inputs_all: dict[str, Tensor | None] = {**inputs, "negative_keys": None, "mask": None}
    kind = Kind("debiased", false_negative_rate=0.5)
    loss = call_info_nce(
        "in-batch",
        inputs_all,
        kind,
        temperature=temperature,
        reduction="none",
        chunk_size=PATHS[path],
    )
    expected = torch.log1p(5 * torch.exp(-2 / temperature)).expand(6)
    assert_close(loss, expected, rtol=1e-12, atol=1e-12, name="clamped loss")
    reference = reference_info_nce("in-batch", inputs_all, kind, temperature=temperature)
    leaves = [inputs["query"], inputs["positive_key"], temperature]
    upstream = upstream_gradient(loss.shape)
    grads = torch.autograd.grad(loss, leaves, upstream)
    want = torch.autograd.grad(reference, leaves, upstream)
    for name, got, ref in zip(("query", "positive_key", "temperature"), grads, want, strict=True):
        assert_close(got, ref, rtol=1e-9, atol=1e-12, name=name)
    assert float(want[2].abs()) > 1e-3  # the clamp's share reaches the temperature


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("case", ["in-batch", "paired-mask", "symmetric", "queue"])
@pytest.mark.parametrize("path", PATHS)
def test_learnable_temperature_gradient(kind: Kind, case: str, path: str) -> None:
    inputs = info_nce_inputs(case, batch=9, dim=4, seed=6)
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = call_info_nce(
        case, inputs, kind, temperature=temperature, reduction="sum", chunk_size=PATHS[path]
    )
    expected = reference_info_nce(case, inputs, kind, temperature=temperature).sum()
    assert_close(loss, expected, rtol=1e-10, atol=1e-10, name="loss")
    (grad,) = torch.autograd.grad(loss, temperature)
    (want,) = torch.autograd.grad(expected, temperature)
    assert_close(grad, want, rtol=1e-9, atol=1e-10, name="temperature gradient")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_of", ["info_nce", "info_nce-symmetric", "nt_xent"])
def test_decoupled_labels_of_one_class_cost_nothing(loss_of: str, path: str) -> None:
    # Every candidate shares the anchor's label: no negative, loss 0 and no
    # gradient. (The engine once subtracted the positives' mean all the same.)
    generator = torch.Generator().manual_seed(3)
    views = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.zeros(6, dtype=torch.long)
    options = {"labels": labels, "decoupled": True, "reduction": "none"}
    if loss_of == "nt_xent":
        loss = nt_xent(views, chunk_size=PATHS[path], **options)  # type: ignore[arg-type]
    else:
        symmetric = loss_of.endswith("symmetric")
        loss = info_nce(  # type: ignore[call-overload]
            views[0], views[1], symmetric=symmetric, chunk_size=PATHS[path], **options
        )
    assert_close(loss, torch.zeros_like(loss), rtol=0, atol=0, name="loss")
    (grad,) = torch.autograd.grad(loss.sum(), views)
    assert_close(grad, torch.zeros_like(grad), rtol=0, atol=0, name="gradient")


@pytest.mark.parametrize("path", PATHS)
def test_decoupled_row_without_negatives_costs_nothing(path: str) -> None:
    # Paired negatives only, row 0 all padding: its loss is 0 and no gradient reaches it.
    inputs = info_nce_inputs("paired-mask", batch=5, dim=3, seed=7)
    mask = inputs["mask"]
    assert mask is not None
    assert not mask[0].any()
    query = inputs["query"]
    assert query is not None
    loss = call_info_nce(
        "paired-mask", inputs, KINDS[0], temperature=0.1, reduction="none", chunk_size=PATHS[path]
    )
    assert float(loss[0].detach()) == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), query)
    assert torch.all(grad[0] == 0)
    assert torch.isfinite(grad).all()
    # A batch of one has no in-batch negative either.
    single = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    alone = info_nce(single, single.detach() + 1, decoupled=True, chunk_size=PATHS[path])
    assert float(alone.detach()) == 0.0
    (grad,) = torch.autograd.grad(alone, single)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_low_temperature_does_not_overflow_in_float32(kind: Kind) -> None:
    inputs = info_nce_inputs("in-batch", batch=64, dim=8, seed=9)
    single = {
        k: None if v is None else v.detach().float().requires_grad_() for k, v in inputs.items()
    }
    for path, chunk_size in PATHS.items():
        with on_path(path):
            loss = call_info_nce(
                "in-batch", single, kind, temperature=0.01, reduction="mean", chunk_size=chunk_size
            )
        expected = reference_info_nce("in-batch", inputs, kind, temperature=0.01).mean()
        assert torch.isfinite(loss)
        assert_close(loss, expected, rtol=1e-5, atol=1e-4, name="loss")


# --- gradcheck ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_engine_gradcheck(kind: Kind, reduction: str) -> None:
    # The engine's Function with each objective: in-batch plus paired negatives
    # and a mask, a learnable temperature, blocks of 2 rows.
    inputs = info_nce_inputs("in-batch+hard", batch=5, dim=3, seed=10)
    query, positive, negatives, mask = (
        inputs[k] for k in ("query", "positive_key", "negative_keys", "mask")
    )
    temperature = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def function(q: Tensor, p: Tensor, n: Tensor, t: Tensor) -> Tensor:
        return info_nce(
            q,
            p,
            n,
            temperature=t,
            reduction=reduction,  # type: ignore[arg-type]
            negative_mode="paired",
            in_batch_negatives=True,
            negative_mask=mask,
            chunk_size=2,
            **kind.options(),  # type: ignore[arg-type]
        )

    assert torch.autograd.gradcheck(function, (query, positive, negatives, temperature))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_engine_gradcheck_nt_xent(kind: Kind) -> None:
    generator = torch.Generator().manual_seed(13)
    views = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64).requires_grad_()
    temperature = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def function(v: Tensor, t: Tensor) -> Tensor:
        return nt_xent(v, temperature=t, reduction="none", chunk_size=3, **kind.options())  # type: ignore[arg-type]

    assert torch.autograd.gradcheck(function, (views, temperature))


# --- modules ------------------------------------------------------------------------------


def test_modules_pass_the_options() -> None:
    generator = torch.Generator().manual_seed(14)
    query, positive = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64)
    for kind in KINDS:
        module = InfoNCE(temperature=0.2, chunk_size=3, **kind.options())  # type: ignore[arg-type]
        expected = info_nce(query, positive, temperature=0.2, **kind.options())  # type: ignore[arg-type]
        assert_close(module(query, positive), expected, rtol=1e-12, atol=1e-12, name=kind.name)
        ntxent = NTXent(temperature=0.2, **kind.options())  # type: ignore[arg-type]
        expected = nt_xent([query, positive], temperature=0.2, **kind.options())  # type: ignore[arg-type]
        assert_close(ntxent(query, positive), expected, rtol=1e-12, atol=1e-12, name=kind.name)
        for name, value in kind.options().items():
            assert getattr(module, name) == value
    assert "decoupled=True" in repr(InfoNCE(decoupled=True))
    assert "hard_negative_beta=2" in repr(NTXent(hard_negative_beta=2.0))
    assert "decoupled=False" in repr(InfoNCE())


# --- errors -------------------------------------------------------------------------------

Loss = Callable[..., Tensor]
QUERY, KEY = torch.randn(4, 3), torch.randn(4, 3)


def _info_nce(**options: object) -> Tensor:
    return info_nce(QUERY, KEY, **options)  # type: ignore[arg-type]


def _nt_xent(**options: object) -> Tensor:
    return nt_xent([QUERY, KEY], **options)  # type: ignore[arg-type]


def _info_nce_module(**options: object) -> Tensor:
    return InfoNCE(**options)(QUERY, KEY)  # type: ignore[arg-type]


def _nt_xent_module(**options: object) -> Tensor:
    return NTXent(**options)(QUERY, KEY)  # type: ignore[arg-type]


LOSSES = {
    "info_nce": _info_nce,
    "nt_xent": _nt_xent,
    "InfoNCE": _info_nce_module,
    "NTXent": _nt_xent_module,
}

COMBINATIONS = [
    ({"decoupled": True, "false_negative_rate": 0.1}, ("decoupled", "false_negative_rate")),
    ({"decoupled": True, "hard_negative_beta": 1.0}, ("decoupled", "hard_negative_beta")),
    ({"false_negative_rate": 0.1, "normalize": False}, ("false_negative_rate", "normalize")),
    ({"hard_negative_beta": 1.0, "normalize": False}, ("hard_negative_beta", "normalize")),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(("options", "names"), COMBINATIONS)
def test_combinations_outside_the_scope_are_refused(
    loss: str, options: dict[str, object], names: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=names[0]) as error:
        LOSSES[loss](**options)
    assert names[1] in str(error.value)


@pytest.mark.parametrize("option", ["false_negative_rate", "hard_negative_beta"])
def test_the_estimator_needs_one_positive(option: str) -> None:
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=f"{option}.*labels"):
        info_nce(QUERY, KEY, labels=labels, **{option: 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"{option}.*labels"):
        nt_xent([QUERY, KEY], labels, **{option: 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"{option}.*V = 3"):
        nt_xent([QUERY, KEY, KEY], **{option: 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"{option}.*V = 3"):
        NTXent(**{option: 0.1})(QUERY, KEY, KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("false_negative_rate", -0.1, ValueError, r"false_negative_rate must be in \[0, 1\)"),
        ("false_negative_rate", 1.0, ValueError, r"false_negative_rate must be in \[0, 1\)"),
        ("false_negative_rate", math.nan, ValueError, r"false_negative_rate must be in \[0, 1\)"),
        ("false_negative_rate", "0.1", TypeError, "false_negative_rate must be a real number"),
        ("false_negative_rate", True, TypeError, "false_negative_rate must be a real number"),
        ("hard_negative_beta", -1.0, ValueError, "hard_negative_beta must be a finite number >= 0"),
        ("hard_negative_beta", math.inf, ValueError, "hard_negative_beta must be a finite"),
        ("hard_negative_beta", math.nan, ValueError, "hard_negative_beta must be a finite"),
        ("hard_negative_beta", None, TypeError, "hard_negative_beta must be a real number"),
        ("decoupled", 1, TypeError, "decoupled must be a bool"),
    ],
)
def test_values_out_of_range_are_refused(
    loss: str, option: str, value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LOSSES[loss](**{option: value})
