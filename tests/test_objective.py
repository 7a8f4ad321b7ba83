"""The full contrastive objective (issue 4) against float64 formulas written here.

`reference_per_sample` transcribes the issue's definitions one query (and, for
the symmetric loss, one key) at a time: it lists each query's candidates
explicitly and takes ``logsumexp(candidates / t) - mean(positive logits / t)``.
It shares no code with the package. Both implementations are compared with it,
loss and gradients of every input: the dense reference (``chunk_size=None`` at
these sizes) and the blockwise engine (``chunk_size`` forced to 1, 7, B - 1 and
B + 3 queries per block). A spy on `info_nce.functional.dense_info_nce` checks
that each path really ran.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import torch
from reference import assert_close as assert_close_scaled
from reference import upstream_gradient
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import info_nce.functional as functional
from info_nce import InfoNCE, NTXent, info_nce, nt_xent
from info_nce.engine import columns

REDUCTIONS = ("mean", "sum", "none")
# chunk_size=None ("auto") takes the dense loss at the small sizes used here
# (checked in `run_info_nce`); the others force the blockwise engine.
PATHS = ("auto", "chunk=1", "chunk=7", "chunk=B-1", "chunk=B+3")
RTOL, ATOL = 1e-9, 1e-11


pytestmark = pytest.mark.usefixtures("one_thread")


# --- The float64 reference ---------------------------------------------------


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def reference_per_sample(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None = None,
    *,
    temperature: float | Tensor,
    negative_mode: str = "unpaired",
    negative_mask: Tensor | None = None,
    labels: Tensor | None = None,
    in_batch_negatives: bool | None = None,
    symmetric: bool = False,
    normalize: bool = True,
) -> Tensor:
    """Per-sample loss (B,) from issue 4's definitions, one query at a time."""
    assert query.dtype == torch.float64
    q, p, n = query, positive_key, negative_keys
    if normalize:
        q, p = _unit(q), _unit(p)
        n = None if n is None else _unit(n)
    batch = len(q)
    in_batch = in_batch_negatives
    if in_batch is None:  # the seed's behaviour, or True with labels
        in_batch = n is None or labels is not None

    def same_class(i: int, j: int) -> bool:
        return i == j if labels is None else bool(labels[i] == labels[j])

    # Query to key: query i against its candidate keys.
    rows = []
    for i in range(batch):
        candidates = []  # (K_i, D) pieces
        if in_batch:
            candidates.append(p)  # all B positive keys; key j is candidate j
            positives = [j for j in range(batch) if same_class(i, j)]
        else:
            candidates.append(p[i : i + 1])  # its own positive only
            positives = [0]
        if n is not None and negative_mode == "unpaired":
            candidates.append(n)
        elif n is not None:
            own = n[i] if negative_mask is None else n[i][negative_mask[i]]
            candidates.append(own)  # only its valid negatives
        logits = torch.cat(candidates) @ q[i] / temperature  # (K_i,)
        rows.append(torch.logsumexp(logits, dim=0) - logits[positives].mean())
    loss = torch.stack(rows)  # (B,)
    if not symmetric:
        return loss

    # Key to query: key j against all B queries; explicit negatives play no part.
    columns = []
    for j in range(batch):
        logits = q @ p[j] / temperature  # (B,)
        positives = [k for k in range(batch) if same_class(j, k)]
        columns.append(torch.logsumexp(logits, dim=0) - logits[positives].mean())
    return (loss + torch.stack(columns)) / 2


def reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


# --- Helpers -------------------------------------------------------------------


# Errors relative to each expected value plus an absolute floor (no scale).
assert_close = functools.partial(assert_close_scaled, rtol=RTOL, atol=ATOL, scale=1.0)


def scalar(x: Tensor) -> float:
    return float(x.detach())


def chunk_size_for(path: str, batch: int) -> int | None:
    return {
        "auto": None,
        "chunk=1": 1,
        "chunk=7": 7,
        "chunk=B-1": max(1, batch - 1),
        "chunk=B+3": batch + 3,
    }[path]


def run_info_nce(
    path: str,
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """`info_nce` on `path`, checking which implementation ran."""
    chunk_size = chunk_size_for(path, len(query))
    with mock.patch.object(
        functional, "dense_info_nce", wraps=functional.dense_info_nce
    ) as dense_spy:
        loss = info_nce(query, positive_key, negative_keys, chunk_size=chunk_size, **options)
    if chunk_size is not None:
        assert dense_spy.call_count == 0, "chunk_size given, yet the dense loss ran"
    else:
        # At the small sizes of these tests, chunk_size=None picks the dense loss.
        assert len(query) * (len(query) + 16) <= functional.DENSE_MAX_LOGITS
        assert dense_spy.call_count == 1, "chunk_size=None did not take the dense loss"
    return loss


@dataclass(frozen=True)
class Case:
    """One option combination; `case_inputs` builds its tensors."""

    batch: int = 5
    dim: int = 3
    negatives: str | None = None  # None, "unpaired" or "paired"
    num_negatives: int = 4
    labels: str | None = None  # None, "repeated", "singleton" or "distinct"
    mask: str | None = None  # None, "random" or "empty-row"
    in_batch_negatives: bool | None = None
    symmetric: bool = False
    normalize: bool = True
    temperature: float = 0.1


def make_labels(kind: str, batch: int, generator: torch.Generator) -> Tensor:
    if kind == "repeated":  # fewer classes than samples: some class repeats
        return torch.randint(0, max(1, (batch + 1) // 2), (batch,), generator=generator)
    if kind == "singleton":  # a class of size 1 next to bigger classes
        half = batch // 2
        labels = torch.tensor([3] * half + [-1] * (batch - half - 1) + [7])
        return labels[torch.randperm(batch, generator=generator)]
    if kind == "distinct":
        return torch.randperm(batch, generator=generator) * 5 - 2
    raise AssertionError(kind)


def make_mask(kind: str, batch: int, num_negatives: int, generator: torch.Generator) -> Tensor:
    mask = torch.rand(batch, num_negatives, generator=generator) < 0.6  # (B, M)
    if kind == "empty-row":
        mask[batch // 2] = False  # a query with only padding
        mask[0] = True
    return mask


def case_inputs(case: Case, seed: int = 0) -> dict[str, Any]:
    """Float64 leaf tensors (requiring gradients) and options of `case`."""
    generator = torch.Generator().manual_seed(seed)
    batch, dim, m = case.batch, case.dim, case.num_negatives

    def embeddings(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        if case.normalize:  # arbitrary norms: the normalisation is part of the loss
            x = x * (0.5 + 2 * torch.rand(*shape[:-1], 1, generator=generator, dtype=x.dtype))
        else:  # raw dot products: keep the logits moderate
            x = 0.3 * x
        return x.requires_grad_()

    query, positive_key = embeddings(batch, dim), embeddings(batch, dim)
    negative_keys = None
    if case.negatives == "unpaired":
        negative_keys = embeddings(m, dim)
    elif case.negatives == "paired":
        negative_keys = embeddings(batch, m, dim)
    options: dict[str, Any] = {
        "negative_mode": case.negatives or "unpaired",
        "symmetric": case.symmetric,
        "in_batch_negatives": case.in_batch_negatives,
        "normalize": case.normalize,
        "labels": None if case.labels is None else make_labels(case.labels, batch, generator),
        "negative_mask": None if case.mask is None else make_mask(case.mask, batch, m, generator),
    }
    temperature = torch.tensor(case.temperature, dtype=torch.float64, requires_grad=True)
    return {
        "query": query,
        "positive_key": positive_key,
        "negative_keys": negative_keys,
        "temperature": temperature,
        "options": options,
        "generator": generator,
    }


CASES = {
    "in-batch": Case(),
    "symmetric": Case(batch=37, dim=16, symmetric=True),
    "symmetric-one-sample": Case(batch=1, symmetric=True),
    "symmetric-unpaired-in-batch": Case(
        negatives="unpaired", in_batch_negatives=True, symmetric=True, temperature=0.05
    ),
    "symmetric-unpaired-explicit": Case(negatives="unpaired", symmetric=True),
    "symmetric-paired-explicit": Case(negatives="paired", symmetric=True),
    "symmetric-paired-in-batch": Case(negatives="paired", in_batch_negatives=True, symmetric=True),
    "labels-repeated": Case(batch=37, dim=16, labels="repeated"),
    "labels-singleton-class": Case(batch=7, labels="singleton", temperature=0.5),
    "labels-distinct": Case(labels="distinct"),
    "labels-one-sample": Case(batch=1, labels="repeated"),
    "labels-symmetric": Case(batch=37, dim=16, labels="repeated", symmetric=True),
    "labels-symmetric-singleton": Case(batch=7, labels="singleton", symmetric=True),
    "labels-unpaired": Case(negatives="unpaired", labels="repeated"),
    "labels-paired": Case(negatives="paired", labels="repeated"),
    "labels-paired-one-sample": Case(batch=1, negatives="paired", labels="repeated"),
    "labels-paired-mask-symmetric": Case(
        batch=7, negatives="paired", labels="singleton", mask="random", symmetric=True
    ),
    "unpaired-default": Case(negatives="unpaired"),
    "unpaired-not-in-batch": Case(negatives="unpaired", in_batch_negatives=False),
    "unpaired-in-batch": Case(batch=37, dim=16, negatives="unpaired", in_batch_negatives=True),
    "paired-default": Case(negatives="paired"),
    "paired-in-batch": Case(batch=37, dim=16, negatives="paired", in_batch_negatives=True),
    "mask-random": Case(batch=37, dim=16, negatives="paired", mask="random"),
    "mask-random-in-batch": Case(negatives="paired", mask="random", in_batch_negatives=True),
    "mask-empty-row": Case(negatives="paired", mask="empty-row"),
    "mask-empty-row-in-batch": Case(negatives="paired", mask="empty-row", in_batch_negatives=True),
    "mask-empty-row-symmetric": Case(negatives="paired", mask="empty-row", symmetric=True),
    "raw-in-batch": Case(normalize=False),
    "raw-symmetric-labels-unpaired": Case(
        normalize=False, negatives="unpaired", labels="repeated", symmetric=True
    ),
    "raw-paired-mask": Case(normalize=False, negatives="paired", mask="random"),
    "raw-paired-mask-in-batch": Case(
        batch=37,
        dim=16,
        normalize=False,
        negatives="paired",
        mask="random",
        in_batch_negatives=True,
    ),
    "one-feature": Case(dim=1, negatives="unpaired", labels="repeated", symmetric=True),
}


def implementation_and_reference(
    inputs: dict[str, Any], path: str, reduction: str
) -> tuple[Tensor, Tensor]:
    """(loss, reference loss) of `inputs` on `path`, with the tensor temperature."""
    query, positive_key = inputs["query"], inputs["positive_key"]
    negative_keys, temperature = inputs["negative_keys"], inputs["temperature"]
    options = inputs["options"]
    loss = run_info_nce(
        path,
        query,
        positive_key,
        negative_keys,
        temperature=temperature,
        reduction=reduction,
        **options,
    )
    expected = reduce(
        reference_per_sample(
            query, positive_key, negative_keys, temperature=temperature, **options
        ),
        reduction,
    )
    return loss, expected


def leaves(inputs: dict[str, Any]) -> dict[str, Tensor]:
    names = ("query", "positive_key", "negative_keys", "temperature")
    return {name: inputs[name] for name in names if inputs[name] is not None}


def gradients(loss: Tensor, upstream: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    grads = torch.autograd.grad(loss, list(tensors.values()), upstream)
    return dict(zip(tensors, grads, strict=True))


def assert_matches_reference(inputs: dict[str, Any], path: str, reduction: str) -> Tensor:
    """Loss and all gradients against the reference; returns the loss."""
    loss, expected = implementation_and_reference(inputs, path, reduction)
    assert loss.dtype == torch.float64
    assert_close(loss, expected, name="loss")
    upstream = upstream_gradient(expected.shape)
    tensors = leaves(inputs)
    actual_grads = gradients(loss, upstream, tensors)
    expected_grads = gradients(expected, upstream, tensors)
    for name in tensors:
        assert_close(actual_grads[name], expected_grads[name], name=f"gradient of {name}")
    return loss


# --- Loss and gradients against the reference ----------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_loss_and_gradients_match_reference(case: Case, path: str, reduction: str) -> None:
    assert_matches_reference(case_inputs(case), path, reduction)


# Symmetric cases whose key-to-query statistics are columns of the main pass
# (in-batch candidates), with enough rows for several column chunks.
COLUMN_CASES = {
    name: case
    for name, case in CASES.items()
    if case.symmetric
    and case.batch > 2
    and (case.negatives is None or case.in_batch_negatives or case.labels is not None)
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", ["chunk=1", "chunk=7"])
@pytest.mark.parametrize("case", list(COLUMN_CASES.values()), ids=list(COLUMN_CASES))
def test_symmetric_engine_across_column_chunks(case: Case, path: str, reduction: str) -> None:
    # The engine takes column statistics a few columns at a time; at these sizes
    # one chunk would hold every column, so make them 2 logits (1 or 2 columns).
    chunk_counts: list[int] = []

    def column_chunks(split: int, num_columns: int, chunk: int) -> list[slice]:
        chunks = original(split, num_columns, chunk)
        chunk_counts.append(sum(piece.stop <= split for piece in chunks))
        return chunks

    original = columns.column_chunks
    with (
        mock.patch.object(columns, "COLUMN_CHUNK_ELEMENTS", 2),
        mock.patch.object(columns, "column_chunks", column_chunks),
    ):
        assert_matches_reference(case_inputs(case), path, reduction)
    assert max(chunk_counts) > 1, "the column statistics never took more than one chunk"


def test_reference_is_the_seed_loss() -> None:
    # The reference itself, on the one case with a closed form elsewhere.
    inputs = case_inputs(Case(batch=6, dim=4))
    q, p = _unit(inputs["query"]), _unit(inputs["positive_key"])
    expected = torch.nn.functional.cross_entropy(q @ p.T / 0.1, torch.arange(6))
    actual = reference_per_sample(inputs["query"], inputs["positive_key"], temperature=0.1)
    assert_close(actual.mean(), expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "case",
    [
        Case(batch=37, dim=16),
        Case(batch=5, symmetric=True),
        Case(negatives="unpaired", in_batch_negatives=True),
        Case(negatives="paired", in_batch_negatives=True, symmetric=True),
        Case(negatives="paired", mask="random", in_batch_negatives=True),
    ],
    ids=["plain", "symmetric", "unpaired", "paired-symmetric", "paired-mask"],
)
def test_distinct_labels_equal_the_plain_loss(case: Case, path: str) -> None:
    inputs = case_inputs(case, seed=1)
    options = dict(inputs["options"], in_batch_negatives=True)
    tensors = leaves(inputs)
    labels = torch.randperm(case.batch, generator=inputs["generator"]) * 3 + 11

    def loss_of(labels: Tensor | None) -> Tensor:
        return run_info_nce(
            path,
            inputs["query"],
            inputs["positive_key"],
            inputs["negative_keys"],
            temperature=inputs["temperature"],
            reduction="none",
            **dict(options, labels=labels),
        )

    with_labels, plain = loss_of(labels), loss_of(None)
    assert_close(with_labels, plain, name="loss")
    upstream = upstream_gradient(plain.shape)
    labelled_grads = gradients(with_labels, upstream, tensors)
    plain_grads = gradients(plain, upstream, tensors)
    for name in tensors:
        assert_close(labelled_grads[name], plain_grads[name], name=f"gradient of {name}")


@pytest.mark.parametrize("path", PATHS)
def test_labels_of_any_integer_dtype(path: str) -> None:
    inputs = case_inputs(Case(batch=9, labels="repeated", symmetric=True))
    options = inputs["options"]
    losses = [
        run_info_nce(
            path,
            inputs["query"],
            inputs["positive_key"],
            temperature=0.1,
            reduction="none",
            **dict(options, labels=options["labels"].to(dtype)),
        )
        for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
    ]
    for loss in losses[1:]:
        assert torch.equal(loss, losses[0])


def test_with_negatives_and_no_labels_the_default_is_not_in_batch() -> None:
    # The seed's behaviour: explicit negatives replace the in-batch candidates.
    inputs = case_inputs(Case(negatives="unpaired"))
    q, p, n = inputs["query"], inputs["positive_key"], inputs["negative_keys"]
    default = info_nce(q, p, n, reduction="none")
    assert torch.equal(default, info_nce(q, p, n, reduction="none", in_batch_negatives=False))
    with_in_batch = info_nce(q, p, n, reduction="none", in_batch_negatives=True)
    assert not torch.allclose(default, with_in_batch)
    # Labels turn the in-batch candidates on.
    labels = torch.arange(len(q))
    assert_close(info_nce(q, p, n, reduction="none", labels=labels), with_in_batch)


# --- Padding masks -------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("in_batch", [False, True], ids=["explicit", "in-batch"])
@pytest.mark.parametrize("path", PATHS)
def test_all_padding_row_is_as_if_it_had_no_negatives(
    path: str, in_batch: bool, symmetric: bool
) -> None:
    inputs = case_inputs(Case(negatives="paired", mask="empty-row", symmetric=symmetric))
    q, p, n = inputs["query"], inputs["positive_key"], inputs["negative_keys"]
    options = dict(inputs["options"], in_batch_negatives=in_batch)
    empty = len(q) // 2
    assert not bool(options["negative_mask"][empty].any())
    loss = run_info_nce(path, q, p, n, reduction="none", **options)
    assert bool(torch.isfinite(loss).all())
    # Without negatives, the row's candidates are only the positive keys.
    if in_batch:  # the in-batch candidates remain
        without_negatives = info_nce(q, p, reduction="none", symmetric=symmetric)[empty]
    elif not symmetric:  # its positive alone: logsumexp of one logit minus that logit
        without_negatives = torch.zeros((), dtype=q.dtype)
    else:  # half the key-to-query loss, which never sees explicit negatives
        both_directions = info_nce(q, p, reduction="none", symmetric=True)
        query_to_key = info_nce(q, p, reduction="none")
        without_negatives = (2 * both_directions - query_to_key)[empty] / 2
    assert_close(loss[empty], without_negatives, name="loss of the all-padding row")
    grad_query, grad_negatives = torch.autograd.grad(loss.sum(), [q, n])
    assert bool(torch.isfinite(grad_query).all())
    assert torch.count_nonzero(grad_negatives[empty]) == 0
    if not in_batch and not symmetric:  # the row's loss is identically zero
        assert torch.count_nonzero(grad_query[empty]) == 0


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("in_batch", [False, True], ids=["explicit", "in-batch"])
@pytest.mark.parametrize("path", PATHS)
def test_masked_negative_gets_exactly_zero_gradient(
    path: str, in_batch: bool, symmetric: bool
) -> None:
    inputs = case_inputs(Case(batch=7, negatives="paired", mask="random", num_negatives=5))
    q, p, n = inputs["query"], inputs["positive_key"], inputs["negative_keys"]
    options = dict(inputs["options"], in_batch_negatives=in_batch, symmetric=symmetric)
    mask = options["negative_mask"]
    assert bool(mask.any())
    assert not bool(mask.all())
    loss = run_info_nce(path, q, p, n, reduction="none", **options)
    (grad,) = torch.autograd.grad(loss, [n], upstream_gradient(loss.shape))
    assert torch.count_nonzero(grad[~mask]) == 0
    assert bool((grad[mask].abs().sum(dim=-1) > 0).all())  # valid negatives do get one
    # A masked negative's value does not matter: any padding gives the same loss.
    padding = 1e3 * torch.randn(n.shape, generator=inputs["generator"], dtype=n.dtype)
    scrambled = torch.where(mask.unsqueeze(-1), n.detach(), padding)
    assert_close(run_info_nce(path, q, p, scrambled, reduction="none", **options), loss)


# --- Temperature -----------------------------------------------------------------

GRADCHECK_CASES = {
    "in-batch": Case(batch=4),
    "symmetric-labels": Case(batch=4, labels="repeated", symmetric=True),
    "symmetric-unpaired-in-batch": Case(
        batch=4, negatives="unpaired", num_negatives=3, in_batch_negatives=True, symmetric=True
    ),
    "paired-mask": Case(batch=4, negatives="paired", num_negatives=3, mask="empty-row"),
    "paired-mask-labels-symmetric": Case(
        batch=4, negatives="paired", num_negatives=3, mask="random", labels="singleton"
    ),
    "raw-symmetric": Case(batch=4, normalize=False, symmetric=True, temperature=0.3),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["auto", "chunk=1", "chunk=B-1"])
@pytest.mark.parametrize("case", list(GRADCHECK_CASES.values()), ids=list(GRADCHECK_CASES))
def test_gradcheck(case: Case, path: str, reduction: str) -> None:
    inputs = case_inputs(case, seed=2)
    negative_keys = inputs["negative_keys"]
    options = inputs["options"]

    chunk_size = chunk_size_for(path, case.batch)

    def loss(query: Tensor, positive_key: Tensor, temperature: Tensor, *rest: Tensor) -> Tensor:
        negatives = rest[0] if rest else None
        return info_nce(
            query,
            positive_key,
            negatives,
            temperature=temperature,
            reduction=reduction,
            chunk_size=chunk_size,
            **options,
        )

    arguments = [inputs["query"], inputs["positive_key"], inputs["temperature"]]
    if negative_keys is not None:
        arguments.append(negative_keys)
    run_info_nce(path, *arguments[:2], negative_keys, temperature=0.1, **options)  # the path
    assert torch.autograd.gradcheck(loss, tuple(arguments), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", PATHS)
def test_float_and_tensor_temperature_give_identical_losses(path: str, dtype: torch.dtype) -> None:
    inputs = case_inputs(Case(batch=6, negatives="unpaired", labels="repeated", symmetric=True))
    q, p, n = (
        inputs[name].detach().to(dtype) for name in ("query", "positive_key", "negative_keys")
    )
    options = dict(inputs["options"], reduction="none")
    as_float = run_info_nce(path, q, p, n, temperature=0.07, **options)
    for temperature in (torch.tensor(0.07, dtype=dtype), torch.tensor([0.07], dtype=dtype)):
        assert torch.equal(
            run_info_nce(path, q, p, n, temperature=temperature, **options), as_float
        )


def test_one_element_temperature_gets_gradient_of_its_shape() -> None:
    inputs = case_inputs(Case(symmetric=True))
    temperature = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    info_nce(inputs["query"], inputs["positive_key"], temperature=temperature).backward()
    assert temperature.grad is not None
    assert temperature.grad.shape == (1,)
    assert scalar(temperature.grad) != 0


# --- The learnable temperature of InfoNCE ------------------------------------------


def test_learnable_temperature_is_one_logit_scale_parameter() -> None:
    loss = InfoNCE(learn_temperature=True, temperature=0.07)
    named = dict(loss.named_parameters())
    assert list(named) == ["logit_scale"]
    assert named["logit_scale"].shape == ()
    assert scalar(named["logit_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    temperature = loss.temperature
    assert isinstance(temperature, Tensor)
    assert scalar(temperature) == pytest.approx(0.07, rel=1e-6)
    assert list(loss.state_dict()) == ["logit_scale"]


LEARNABLE_CASES = {
    "symmetric-labels": Case(batch=9, dim=4, labels="repeated", symmetric=True),
    "paired-mask": Case(batch=9, dim=4, negatives="paired", mask="empty-row"),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(LEARNABLE_CASES.values()), ids=list(LEARNABLE_CASES))
def test_learnable_temperature_gradient_matches_reference(
    case: Case, path: str, reduction: str
) -> None:
    inputs = case_inputs(case)
    q, p, n = inputs["query"], inputs["positive_key"], inputs["negative_keys"]
    options = inputs["options"]
    module = InfoNCE(
        temperature=0.07,
        reduction=reduction,  # type: ignore[arg-type]
        negative_mode=options["negative_mode"],
        symmetric=case.symmetric,
        learn_temperature=True,
        chunk_size=chunk_size_for(path, len(q)),
    ).double()
    loss = module(q, p, n, labels=options["labels"], negative_mask=options["negative_mask"])
    # Reference: t = exp(-s), d loss / d s by the chain rule, through autograd.
    logit_scale = module.logit_scale.detach().clone().requires_grad_()
    expected = reduce(
        reference_per_sample(q, p, n, temperature=torch.exp(-logit_scale), **options), reduction
    )
    assert_close(loss, expected, name="loss")
    upstream = upstream_gradient(expected.shape)
    (actual_grad,) = torch.autograd.grad(loss, [module.logit_scale], upstream)
    (expected_grad,) = torch.autograd.grad(expected, [logit_scale], upstream)
    assert_close(actual_grad, expected_grad, name="gradient of logit_scale")
    assert scalar(actual_grad) != 0


@pytest.mark.parametrize("path", ["auto", "chunk=7"])
@pytest.mark.parametrize(
    ("max_logit_scale", "floor"), [(None, 0.01), (20.0, 0.05)], ids=["default", "custom"]
)
def test_learnable_temperature_clamp(
    path: str, max_logit_scale: float | None, floor: float
) -> None:
    settings: dict[str, Any] = (
        {} if max_logit_scale is None else {"max_logit_scale": max_logit_scale}
    )
    module = InfoNCE(
        learn_temperature=True, symmetric=True, chunk_size=chunk_size_for(path, 6), **settings
    )
    inputs = case_inputs(Case(batch=6, dim=8))
    q, p = (inputs[name].detach().float() for name in ("query", "positive_key"))

    # Below the clamp the gradient flows ...
    with torch.no_grad():
        module.logit_scale.fill_(math.log(2.0))
    module(q, p).backward()
    assert module.logit_scale.grad is not None
    assert scalar(module.logit_scale.grad) != 0
    module.zero_grad()

    # ... above it, the effective temperature is 1 / max_logit_scale and the gradient is zero.
    with torch.no_grad():
        module.logit_scale.fill_(math.log(1000.0))
    assert scalar(module.temperature) == pytest.approx(floor, rel=1e-6)
    loss = module(q, p)
    expected = info_nce(q, p, temperature=floor, symmetric=True)
    assert_close(loss, expected, rtol=1e-5, atol=0, name="clamped loss")
    loss.backward()
    assert module.logit_scale.grad is not None
    assert scalar(module.logit_scale.grad) == 0.0


def test_learnable_temperature_state_dict_round_trip() -> None:
    trained = InfoNCE(learn_temperature=True, temperature=0.07, symmetric=True)
    with torch.no_grad():
        trained.logit_scale.fill_(math.log(1 / 0.03))
    fresh = InfoNCE(learn_temperature=True, symmetric=True)
    assert scalar(fresh.temperature) == pytest.approx(0.1, rel=1e-6)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.logit_scale, trained.logit_scale)
    assert scalar(fresh.temperature) == pytest.approx(0.03, rel=1e-6)
    inputs = case_inputs(Case(batch=6, dim=8))
    q, p = inputs["query"].detach().float(), inputs["positive_key"].detach().float()
    assert torch.equal(fresh(q, p), trained(q, p))


def test_fixed_temperature_is_reassignable_and_learnable_is_not() -> None:
    inputs = case_inputs(Case(batch=6, dim=8))
    q, p = inputs["query"].detach(), inputs["positive_key"].detach()
    fixed = InfoNCE(temperature=0.1, symmetric=True)
    assert list(fixed.parameters()) == []
    assert fixed.state_dict() == {}
    assert fixed.temperature == 0.1
    fixed.temperature = 0.2
    assert fixed.temperature == 0.2
    assert torch.equal(fixed(q, p), info_nce(q, p, temperature=0.2, symmetric=True))
    with pytest.raises(ValueError, match="temperature"):
        fixed.temperature = 0
    assert fixed.temperature == 0.2

    learnable = InfoNCE(learn_temperature=True)
    with pytest.raises(AttributeError, match="temperature"):
        learnable.temperature = 0.2


# Each module and its functional with the same inputs: (query, key, temperature) -> loss.
FUNCTIONAL_OF = {
    InfoNCE: lambda q, p, t: info_nce(q, p, temperature=t),
    NTXent: lambda q, p, t: nt_xent([q, p], temperature=t),
}


@pytest.mark.parametrize("module_type", list(FUNCTIONAL_OF), ids=lambda m: m.__name__)
def test_a_tensor_temperature_on_a_module_gets_gradients(module_type: type) -> None:
    # As in info-nce-pytorch, whose module divides by whatever it was given.
    inputs = case_inputs(Case(batch=6, dim=8))
    q, p = inputs["query"].detach(), inputs["positive_key"].detach()
    functional = FUNCTIONAL_OF[module_type]
    temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss = module_type(temperature=temperature)(q, p)
    reference = temperature.detach().clone().requires_grad_()
    expected = functional(q, p, reference)
    assert_close(loss, expected, name="loss")
    (grad,) = torch.autograd.grad(loss, [temperature])
    (expected_grad,) = torch.autograd.grad(expected, [reference])
    assert_close(grad, expected_grad, name="gradient of the temperature")
    assert scalar(grad) != 0


@pytest.mark.parametrize("module_type", list(FUNCTIONAL_OF), ids=lambda m: m.__name__)
def test_a_parameter_temperature_is_registered_as_info_nce_pytorch_does(
    module_type: type, info_nce_pytorch: types.ModuleType
) -> None:
    inputs = case_inputs(Case(batch=6, dim=8))
    q, p = inputs["query"].detach().float(), inputs["positive_key"].detach().float()
    temperature = nn.Parameter(torch.tensor(0.2))
    module = module_type(temperature=temperature)
    assert dict(module.named_parameters()) == {"temperature": temperature}
    seed = info_nce_pytorch.InfoNCE(temperature=nn.Parameter(torch.tensor(0.3)))
    assert list(module.state_dict()) == list(seed.state_dict()) == ["temperature"]
    module.load_state_dict(seed.state_dict())  # an info-nce-pytorch checkpoint loads
    assert scalar(module.temperature) == pytest.approx(0.3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    module(q, p).backward()
    optimizer.step()
    assert scalar(temperature) != pytest.approx(0.3)  # trained through parameters()
    assert module.double().temperature.dtype == torch.float64  # moved with the module
    module.temperature = 0.5  # a number replaces it
    assert list(module.parameters()) == []
    assert_close(
        module(q.double(), p.double()),
        FUNCTIONAL_OF[module_type](q.double(), p.double(), 0.5),
        name="loss",
    )


@pytest.mark.parametrize(
    ("temperature", "max_logit_scale"), [(0.001, 100.0), (0.1, 5.0)], ids=["default-cap", "custom"]
)
def test_a_learnable_temperature_must_start_above_its_floor(
    temperature: float, max_logit_scale: float
) -> None:
    with pytest.raises(ValueError, match=r"temperature=.* below 1 / max_logit_scale"):
        InfoNCE(temperature=temperature, learn_temperature=True, max_logit_scale=max_logit_scale)
    with pytest.raises(ValueError, match="max_logit_scale"):
        NTXent(temperature=temperature, learn_temperature=True, max_logit_scale=max_logit_scale)
    # At the floor exactly it starts at the clamp, which is allowed.
    floor = InfoNCE(temperature=0.01, learn_temperature=True)
    assert scalar(floor.temperature) == pytest.approx(0.01, rel=1e-6)


def test_module_passes_every_option_on() -> None:
    inputs = case_inputs(Case(batch=7, negatives="paired", labels="singleton", mask="random"))
    q, p, n = inputs["query"], inputs["positive_key"], inputs["negative_keys"]
    options = inputs["options"]
    settings = dict(
        temperature=0.3,
        reduction="none",
        negative_mode="paired",
        symmetric=True,
        in_batch_negatives=True,
        normalize=False,
    )
    module = InfoNCE(**settings, chunk_size=3)  # type: ignore[arg-type]
    actual = module(q, p, n, labels=options["labels"], negative_mask=options["negative_mask"])
    expected = reference_per_sample(
        q,
        p,
        n,
        temperature=0.3,
        negative_mode="paired",
        negative_mask=options["negative_mask"],
        labels=options["labels"],
        in_batch_negatives=True,
        symmetric=True,
        normalize=False,
    )
    assert_close(actual, expected)


# --- Half precision ------------------------------------------------------------------


@pytest.mark.parametrize("negatives", [None, "unpaired", "paired"])
@pytest.mark.parametrize("labels", [False, True], ids=["no-labels", "labels"])
@pytest.mark.parametrize("path", ["auto", "chunk=7"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_at_low_temperature(
    dtype: torch.dtype, path: str, labels: bool, negatives: str | None
) -> None:
    # At temperature 0.01 the logits reach +-100: exp overflows in half precision
    # unless the softmax statistics are kept in float32.
    generator = torch.Generator().manual_seed(3)
    batch, dim, temperature = 37, 16, 0.01
    query = torch.randn(batch, dim, generator=generator)
    positive_key = torch.randn(batch, dim, generator=generator)
    negative_keys = None
    if negatives == "unpaired":
        negative_keys = torch.randn(11, dim, generator=generator)
    elif negatives == "paired":
        negative_keys = torch.randn(batch, 4, dim, generator=generator)
    options: dict[str, Any] = {
        "temperature": temperature,
        "symmetric": True,
        "negative_mode": negatives or "unpaired",
        "labels": torch.randint(0, 6, (batch,), generator=generator) if labels else None,
        "in_batch_negatives": True if negatives else None,
    }
    half = [x.to(dtype).requires_grad_() for x in (query, positive_key)]
    if negative_keys is not None:
        half.append(negative_keys.to(dtype).requires_grad_())
    upcast = [x.detach().float() for x in half]
    # Similarities rounded to the half-precision epsilon, divided by the temperature.
    logit_error = 2 * torch.finfo(dtype).eps / temperature
    for reduction in ("mean", "none"):
        loss = run_info_nce(path, *half, reduction=reduction, **options)
        expected = info_nce(*upcast, reduction=reduction, **options)
        assert loss.dtype == torch.float32
        assert bool(torch.isfinite(loss).all())
        if reduction == "mean":
            assert_close(loss, expected, rtol=2e-2, atol=0, name="mean loss")
        else:
            assert_close(loss, expected, rtol=0, atol=logit_error, name="per-sample loss")
    grads = torch.autograd.grad(loss.sum(), half)
    for grad, x in zip(grads, half, strict=True):
        assert grad.dtype == x.dtype == dtype
        assert bool(torch.isfinite(grad).all())
        assert torch.count_nonzero(grad) > 0


# --- Errors ----------------------------------------------------------------------------

B, M, D = 4, 3, 5


def _error_inputs() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(4)
    return {
        "query": torch.randn(B, D, generator=generator),
        "positive_key": torch.randn(B, D, generator=generator),
        "unpaired": torch.randn(M, D, generator=generator),
        "paired": torch.randn(B, M, D, generator=generator),
    }


def _paired(**options: Any) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda x: info_nce(
        x["query"], x["positive_key"], x["paired"], negative_mode="paired", **options
    )


def _unpaired(**options: Any) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda x: info_nce(x["query"], x["positive_key"], x["unpaired"], **options)


def _no_negatives(**options: Any) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda x: info_nce(x["query"], x["positive_key"], **options)


MASK = torch.ones(B, M, dtype=torch.bool)

ERROR_CASES: dict[str, tuple[Callable[[dict[str, Tensor]], Any], type[Exception], str]] = {
    "labels-too-long": (_no_negatives(labels=torch.arange(B + 1)), ValueError, "labels"),
    "labels-2d": (_no_negatives(labels=torch.arange(B).unsqueeze(1)), ValueError, "labels"),
    "labels-0d": (_no_negatives(labels=torch.tensor(1)), ValueError, "labels"),
    "labels-float": (_no_negatives(labels=torch.arange(B).float()), TypeError, "labels"),
    "labels-bool": (_no_negatives(labels=torch.ones(B, dtype=torch.bool)), TypeError, "labels"),
    "labels-list": (_no_negatives(labels=[0, 1, 0, 1]), TypeError, "labels"),
    "labels-not-in-batch": (
        _unpaired(labels=torch.arange(B), in_batch_negatives=False),
        ValueError,
        "labels",
    ),
    "labels-not-in-batch-paired": (
        _paired(labels=torch.arange(B), in_batch_negatives=False),
        ValueError,
        "in_batch_negatives",
    ),
    "not-in-batch-without-negatives": (
        _no_negatives(in_batch_negatives=False),
        ValueError,
        "in_batch_negatives",
    ),
    "in-batch-int": (_unpaired(in_batch_negatives=1), TypeError, "in_batch_negatives"),
    "in-batch-str": (_unpaired(in_batch_negatives="yes"), TypeError, "in_batch_negatives"),
    "symmetric-int": (_no_negatives(symmetric=1), TypeError, "symmetric"),
    "symmetric-str": (_no_negatives(symmetric="True"), TypeError, "symmetric"),
    "normalize-int": (_no_negatives(normalize=0), TypeError, "normalize"),
    "normalize-none": (_no_negatives(normalize=None), TypeError, "normalize"),
    "mask-without-negatives": (_no_negatives(negative_mask=MASK), ValueError, "negative_mask"),
    "mask-unpaired": (_unpaired(negative_mask=MASK), ValueError, "negative_mask"),
    "mask-unpaired-explicit": (
        _unpaired(negative_mask=torch.ones(B, M, dtype=torch.bool), negative_mode="unpaired"),
        ValueError,
        "negative_mask",
    ),
    "mask-wrong-shape": (
        _paired(negative_mask=torch.ones(B, M + 1, dtype=torch.bool)),
        ValueError,
        "negative_mask",
    ),
    "mask-transposed": (
        _paired(negative_mask=torch.ones(M, B, dtype=torch.bool)),
        ValueError,
        "negative_mask",
    ),
    "mask-flat": (
        _paired(negative_mask=torch.ones(B * M, dtype=torch.bool)),
        ValueError,
        "negative_mask",
    ),
    "mask-float": (_paired(negative_mask=torch.ones(B, M)), TypeError, "negative_mask"),
    "mask-int": (
        _paired(negative_mask=torch.ones(B, M, dtype=torch.int64)),
        TypeError,
        "negative_mask",
    ),
    "mask-list": (_paired(negative_mask=[[True] * M] * B), TypeError, "negative_mask"),
    "temperature-tensor-zero": (
        _no_negatives(temperature=torch.tensor(0.0)),
        ValueError,
        "temperature",
    ),
    "temperature-tensor-negative": (
        _no_negatives(temperature=torch.tensor(-0.1)),
        ValueError,
        "temperature",
    ),
    "temperature-tensor-nan": (
        _no_negatives(temperature=torch.tensor(math.nan, requires_grad=True)),
        ValueError,
        "temperature",
    ),
    "temperature-tensor-inf": (
        _no_negatives(temperature=torch.tensor(math.inf)),
        ValueError,
        "temperature",
    ),
    "temperature-tensor-two-elements": (
        _no_negatives(temperature=torch.tensor([0.1, 0.2])),
        (TypeError, ValueError),  # type: ignore[dict-item]
        "temperature",
    ),
    "temperature-tensor-int": (
        _no_negatives(temperature=torch.tensor(1)),
        TypeError,
        "temperature",
    ),
    "temperature-float-zero": (_no_negatives(temperature=0.0), ValueError, "temperature"),
    "module-max-logit-scale-zero": (
        lambda x: InfoNCE(learn_temperature=True, max_logit_scale=0),
        ValueError,
        "max_logit_scale",
    ),
    "module-max-logit-scale-negative": (
        lambda x: InfoNCE(max_logit_scale=-5.0),
        ValueError,
        "max_logit_scale",
    ),
    "module-max-logit-scale-nan": (
        lambda x: InfoNCE(max_logit_scale=math.nan),
        ValueError,
        "max_logit_scale",
    ),
    "module-max-logit-scale-str": (
        lambda x: InfoNCE(max_logit_scale="100"),
        TypeError,
        "max_logit_scale",
    ),
    "module-learn-temperature-int": (
        lambda x: InfoNCE(learn_temperature=1),
        TypeError,
        "learn_temperature",
    ),
    "module-symmetric-str": (lambda x: InfoNCE(symmetric="no"), TypeError, "symmetric"),
    "module-normalize-int": (lambda x: InfoNCE(normalize=1), TypeError, "normalize"),
    "module-in-batch-int": (
        lambda x: InfoNCE(in_batch_negatives=0),
        TypeError,
        "in_batch_negatives",
    ),
    "module-float-labels": (
        lambda x: InfoNCE()(x["query"], x["positive_key"], labels=torch.zeros(B)),
        TypeError,
        "labels",
    ),
    "module-mask-unpaired": (
        lambda x: InfoNCE()(x["query"], x["positive_key"], x["unpaired"], negative_mask=MASK),
        ValueError,
        "negative_mask",
    ),
}


@pytest.mark.parametrize(
    ("call", "error", "argument"), list(ERROR_CASES.values()), ids=list(ERROR_CASES)
)
def test_invalid_option_raises_naming_the_argument(
    call: Callable[[dict[str, Tensor]], Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error, match=argument):
        call(_error_inputs())


# --- The engine's memory ----------------------------------------------------------------


def _largest_allocation(run: Callable[[], None]) -> int:
    """Bytes of the largest single CPU allocation made while `run` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    return max(event.self_cpu_memory_usage for event in profiler.events())


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_engine_with_labels_allocates_nothing_quadratic(symmetric: bool) -> None:
    # A decision test, not a timing: no single allocation of forward + backward
    # comes near B * B elements, while the dense loss at the same size does make one.
    batch, dim, classes = 300, 16, 10
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    positive_key = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    positive_key.requires_grad_()
    labels = torch.randint(0, classes, (batch,), generator=generator)
    quadratic = batch * batch * query.element_size()

    def run(chunk_size: int | None) -> Callable[[], None]:
        def forward_backward() -> None:
            loss = info_nce(
                query,
                positive_key,
                labels=labels,
                symmetric=symmetric,
                reduction="none",
                chunk_size=chunk_size,
            )
            loss.sum().backward()

        return forward_backward

    assert _largest_allocation(run(None)) >= quadratic  # the probe sees a (B, B) matrix
    largest = _largest_allocation(run(16))
    assert largest < quadratic // 4, f"largest allocation {largest} bytes, B*B is {quadratic}"
