"""The exact blockwise engine (issue 3) against the float64 formula.

`chunk_size` forces the engine (a spy on the dense loss proves it did not run);
loss and the gradient of every input are compared with `reference.py` across
modes, reductions, odd sizes, block sizes, duplicates, zero vectors and extreme
temperatures. The custom autograd Functions are gradchecked on their own, and
the automatic dispatch is checked by what it calls, never by timing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any
from unittest import mock

import grid
import pytest
import torch
import torch.nn.functional as F
from reference import (
    HALF_TOLERANCES,
    INPUT_NAMES,
    MODES,
    REDUCTIONS,
    TOLERANCES,
    Mode,
    assert_close,
    assert_matches,
    dtype_id,
    make_inputs,
    negative_mode_of,
    reference_loss_and_grads,
    upstream_gradient,
)
from tiling import column_tiles
from torch import Tensor

import info_nce.functional as functional
from info_nce import info_nce
from info_nce.engine import columns, function, walker
from info_nce.engine.function import (
    LogSumExp,
    LogSumExpOptions,
    PairedLogits,
    PairedOptions,
    log_sum_exp,
    paired_logits,
)
from info_nce.objectives import DecoupledObjective, InfoNCEObjective

pytestmark = pytest.mark.usefixtures("one_thread")

FLOAT_DTYPES = (torch.float64, torch.float32)


def _dense_must_not_run(*args: Any, **kwargs: Any) -> Tensor:
    raise AssertionError("chunk_size was given, yet the dense loss ran")


def engine_info_nce(*inputs: Tensor, **options: Any) -> Tensor:
    """`info_nce` with a forced `chunk_size`, failing if the dense loss runs instead."""
    assert options.get("chunk_size") is not None
    with mock.patch.object(functional, "dense_info_nce", _dense_must_not_run):
        return info_nce(*inputs, **options)


def check_engine(
    inputs: list[Tensor],
    mode: Mode,
    reduction: str,
    *,
    chunk_size: int,
    temperature: float = 0.1,
) -> Tensor:
    """Engine loss and gradients (random upstream gradient) against the reference."""
    negative_mode = negative_mode_of(mode)
    upstream = upstream_gradient(torch.Size([len(inputs[0])] if reduction == "none" else []))
    loss = engine_info_nce(
        *inputs,
        temperature=temperature,
        reduction=reduction,
        negative_mode=negative_mode,
        chunk_size=chunk_size,
    )
    assert loss.dtype == inputs[0].dtype
    assert loss.shape == ((len(inputs[0]),) if reduction == "none" else ())
    expected = reference_loss_and_grads(
        inputs, upstream, temperature=temperature, reduction=reduction, negative_mode=negative_mode
    )
    wanted = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted, grad_outputs=upstream.to(loss.dtype)))
    actual_grads = [next(grads) if x.requires_grad else None for x in inputs]
    assert_matches(loss, actual_grads, expected, TOLERANCES[inputs[0].dtype])
    return loss


# --- Against the float64 formula ----------------------------------------------


def chunk_sizes(batch: int) -> list[int]:
    """1, 7, B - 1, B and B + 5 queries per block (those that are positive)."""
    return sorted({1, 7, batch - 1, batch, batch + 5} - {0})


ENGINE_SHAPES = [(1, 1, 1), (1, 123, 1), (37, 1, 1), (37, 123, 1), (37, 123, 5)]
ENGINE_CASES = [
    pytest.param(
        mode,
        batch,
        dim,
        num_negatives,
        chunk,
        id=f"{mode}-B{batch}-D{dim}-M{num_negatives}-c{chunk}",
    )
    for mode in MODES
    for batch, dim, num_negatives in ENGINE_SHAPES
    if mode != "in-batch" or num_negatives == 1
    # Paired negatives have no large matrix: chunk_size only selects the engine.
    for chunk in (chunk_sizes(batch) if mode != "paired" else [1])
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("mode", "batch", "dim", "num_negatives", "chunk_size"), ENGINE_CASES)
def test_engine_matches_float64_reference(
    mode: Mode,
    batch: int,
    dim: int,
    num_negatives: int,
    chunk_size: int,
    reduction: str,
    dtype: torch.dtype,
) -> None:
    inputs = make_inputs(mode, batch, dim, num_negatives, dtype=dtype, seed=batch + dim)
    check_engine(inputs, mode, reduction, chunk_size=chunk_size, temperature=0.07)


def with_duplicates(inputs: list[Tensor]) -> list[Tensor]:
    """Leaf copies of `inputs` in which rows repeat exactly."""
    query, positive_key, *negatives = (x.detach().clone() for x in inputs)
    query[1], positive_key[1] = query[0], positive_key[0]  # a repeated (query, key) pair
    positive_key[3] = positive_key[2]  # in-batch: two equal candidates
    query[5] = query[4]
    if negatives and negatives[0].dim() == 2:
        negatives[0][1] = negatives[0][0]
        negatives[0][2] = positive_key[6]  # a negative equal to a positive
    elif negatives:
        negatives[0][:, 1] = negatives[0][:, 0]
        negatives[0][7, 2] = positive_key[7]  # a negative equal to its own positive
    return [x.requires_grad_(True) for x in (query, positive_key, *negatives)]


def with_zero_vectors(inputs: list[Tensor]) -> list[Tensor]:
    """Leaf copies of `inputs` with all-zero query, positive key and negative key rows."""
    query, positive_key, *negatives = (x.detach().clone() for x in inputs)
    query[0] = 0
    positive_key[1] = 0
    query[2] = positive_key[2] = 0
    if negatives:
        negatives[0][1] = 0  # paired: all of query 1's negatives
    return [x.requires_grad_(True) for x in (query, positive_key, *negatives)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("special", [with_duplicates, with_zero_vectors], ids=lambda f: f.__name__)
def test_engine_on_duplicate_rows_and_zero_vectors(
    special: Callable[[list[Tensor]], list[Tensor]],
    mode: Mode,
    reduction: str,
    chunk_size: int,
    dtype: torch.dtype,
) -> None:
    inputs = special(make_inputs(mode, 9, 6, 4, dtype=dtype, seed=9))
    loss = check_engine(inputs, mode, reduction, chunk_size=chunk_size)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("temperature", [0.01, 10.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_engine_at_extreme_temperatures(
    mode: Mode, reduction: str, temperature: float, dtype: torch.dtype
) -> None:
    inputs = make_inputs(mode, 37, 16, 5, dtype=dtype, seed=37)
    check_engine(inputs, mode, reduction, chunk_size=7, temperature=temperature)


@pytest.mark.parametrize("frozen", ["keys", "all-but-query"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_engine_with_inputs_that_need_no_gradient(mode: Mode, reduction: str, frozen: str) -> None:
    # Frozen keys (e.g. a queue of negatives) skip the keys' gradient product.
    inputs = make_inputs(mode, 11, 5, 4, seed=4)
    inputs[-1].requires_grad_(False)  # the negatives, or in-batch the positive keys
    if frozen == "all-but-query":
        for x in inputs[1:]:
            x.requires_grad_(False)
    check_engine(inputs, mode, reduction, chunk_size=3)


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["auto", "chunk3"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["unpaired", "paired"])
def test_no_negatives_at_all_gives_zero_loss(
    info_nce_pytorch: Any, mode: Mode, reduction: str, chunk_size: int | None
) -> None:
    # M = 0: the positive is a query's only candidate; its loss is log(1) = 0.
    query, positive_key = make_inputs("in-batch", 6, 4, seed=2)
    negatives = torch.zeros((0, 4) if mode == "unpaired" else (6, 0, 4), dtype=torch.float64)
    inputs = [query, positive_key, negatives.requires_grad_(True)]
    options = {"temperature": 0.1, "reduction": reduction, "negative_mode": mode}
    upstream = upstream_gradient(torch.Size([6] if reduction == "none" else []))
    loss = info_nce(*inputs, **options, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, inputs, grad_outputs=upstream)
    expected = reference_loss_and_grads(inputs, upstream, **options)
    assert torch.equal(expected.loss, torch.zeros_like(expected.loss))
    assert_matches(loss, grads, expected, TOLERANCES[torch.float64])
    seed_loss = info_nce_pytorch.info_nce(*inputs, **options)
    assert_close(loss, seed_loss, rtol=0, atol=1e-15, name="loss against info-nce-pytorch")


# --- The autograd Functions on their own ----------------------------------------


def explicit_log_sum_exp(
    query: Tensor,
    keys: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    options: LogSumExpOptions,
) -> Tensor:
    """What `LogSumExp` computes, with the normalised inputs and the logits matrix written out."""
    if options.normalize:
        query = query / query.norm(dim=1, keepdim=True)
        keys = keys / keys.norm(dim=1, keepdim=True)
    key_logits = query @ keys.T / (options.temperature if temperature is None else temperature)
    logits = key_logits if extra is None else torch.cat([extra, key_logits], dim=1)
    value = options.row_scale * logits.logsumexp(dim=1)  # (B,)
    if options.column_keys:
        value = value + options.column_scale * key_logits[:, : options.column_keys].logsumexp(0)
    if options.target_offset is not None:
        rows = torch.arange(len(query))
        target_scale = options.row_scale + (options.column_scale if options.column_keys else 0.0)
        value = value - target_scale * key_logits[rows, options.target_offset + rows]
    if options.reduction == "mean":
        return value.mean()
    if options.reduction == "sum":
        return value.sum()
    return value


def log_sum_exp_options(
    reduction: str, columns: bool, grads_in_forward: bool, batch: int, **settings: Any
) -> Any:
    if columns:  # the symmetric loss: half the rows' and half the columns' log-sum-exp
        return LogSumExpOptions(
            reduction=reduction,  # type: ignore[arg-type]
            block_rows=2,
            column_keys=batch,
            row_scale=0.5,
            column_scale=0.5,
            **settings,
        )
    return LogSumExpOptions(
        reduction=reduction,  # type: ignore[arg-type]
        block_rows=2,
        grads_in_forward=grads_in_forward,
        **settings,
    )


def log_sum_exp_case_id(
    width: int, reduction: str, columns: bool, in_forward: bool, target: int | None
) -> str:
    direction = "columns" if columns else "rows"
    targets = "" if target is None else f"-target{target}"
    grads = "forward" if in_forward else "backward"
    return f"extra{width}-{reduction}-{direction}-{grads}{targets}"


LOG_SUM_EXP_CASES = [
    pytest.param(*case, id=log_sum_exp_case_id(*case))
    for case in itertools.product((0, 1, 3), REDUCTIONS, (False, True), (False, True), (None, 0, 1))
    # Gradients in forward: scalar reductions, one direction only.
    if not (case[3] and (case[1] == "none" or case[2]))
    # Columns pair with rows: their targets are the rows' own (offset 0).
    and not (case[2] and case[4] == 1)
]


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize(
    ("width", "reduction", "columns", "grads_in_forward", "target_offset"), LOG_SUM_EXP_CASES
)
def test_log_sum_exp_function_value_and_gradcheck(
    width: int,
    reduction: str,
    columns: bool,
    grads_in_forward: bool,
    target_offset: int | None,
    normalize: bool,
) -> None:
    # Every input gets a gradient, the temperature tensor's included.
    batch, num_keys, dim = 5, 6, 3
    generator = torch.Generator().manual_seed(width)
    query = torch.randn(batch, dim, generator=generator, dtype=torch.float64).requires_grad_()
    keys = torch.randn(num_keys, dim, generator=generator, dtype=torch.float64).requires_grad_()
    temperature = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    extra = (
        torch.randn(batch, width, generator=generator, dtype=torch.float64).requires_grad_()
        if width
        else None
    )
    settings = {"target_offset": target_offset, "normalize": normalize}
    options = log_sum_exp_options(reduction, columns, grads_in_forward, batch, **settings)

    def function(query: Tensor, keys: Tensor, temperature: Tensor, *extra: Tensor) -> Tensor:
        return log_sum_exp(query, (keys,), extra[0] if extra else None, temperature, options)

    inputs = (query, keys, temperature) if extra is None else (query, keys, temperature, extra)
    assert_close(
        function(*inputs),
        explicit_log_sum_exp(query, keys, extra, temperature, options),
        rtol=1e-12,
        atol=1e-12,
        name="LogSumExp",
    )
    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_log_sum_exp_function_with_a_fixed_temperature(normalize: bool, reduction: str) -> None:
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(5, 3, generator=generator, dtype=torch.float64).requires_grad_()
    keys = torch.randn(7, 3, generator=generator, dtype=torch.float64).requires_grad_()
    options = LogSumExpOptions(
        reduction=reduction,  # type: ignore[arg-type]
        block_rows=3,
        target_offset=2,
        normalize=normalize,
        temperature=0.3,
        grads_in_forward=reduction != "none",
    )

    def function(query: Tensor, keys: Tensor) -> Tensor:
        return log_sum_exp(query, (keys,), None, None, options)

    expected = explicit_log_sum_exp(query, keys, None, None, options)
    assert_close(function(query, keys), expected, rtol=1e-12, atol=1e-12, name="LogSumExp")
    assert torch.autograd.gradcheck(function, (query, keys))


@pytest.mark.parametrize(
    ("columns", "grads_in_forward", "reduction"),
    [(False, False, "none"), (False, True, "mean"), (False, True, "sum"), (True, False, "mean")],
)
def test_log_sum_exp_function_with_the_same_tensor_as_queries_and_keys(
    columns: bool, grads_in_forward: bool, reduction: str
) -> None:
    # In-batch and symmetric losses pass one tensor in two roles: gradients add up.
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x.requires_grad_()
    options = log_sum_exp_options(
        reduction, columns, grads_in_forward, len(x), target_offset=0, normalize=True
    )

    def function(x: Tensor) -> Tensor:
        return log_sum_exp(x, (x,), None, None, options)

    expected = explicit_log_sum_exp(x, x, None, None, options)
    assert_close(function(x), expected, rtol=1e-12, atol=1e-12, name="lse")
    assert torch.autograd.gradcheck(function, (x,))


def test_log_sum_exp_function_on_zero_and_tiny_vectors() -> None:
    # Norms at the eps clamp divide by eps and have no radial gradient, as F.normalize.
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    keys = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    query[1] = 0.0
    keys[2] = 1e-14
    query.requires_grad_()
    keys.requires_grad_()
    options = LogSumExpOptions(
        reduction="mean", block_rows=2, target_offset=1, normalize=True, eps=1e-12
    )

    def function(query: Tensor, keys: Tensor) -> Tensor:
        return log_sum_exp(query, (keys,), None, None, options)

    def reference(query: Tensor, keys: Tensor) -> Tensor:
        logits = F.normalize(query, eps=1e-12) @ F.normalize(keys, eps=1e-12).T
        rows = torch.arange(len(query))
        return (logits.logsumexp(1) - logits[rows, rows + 1]).mean()

    loss = function(query, keys)
    expected = reference(query, keys)
    assert_close(loss, expected, rtol=1e-12, atol=1e-12, name="loss")
    grads = torch.autograd.grad(loss, (query, keys))
    expected_grads = torch.autograd.grad(expected, (query, keys))
    for name, grad, expected_grad in zip(("query", "keys"), grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12, name=name)


@pytest.mark.parametrize("normalize_negatives", [False, True])
def test_paired_logits_function_value_and_gradcheck(normalize_negatives: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(4, 3, generator=generator, dtype=torch.float64).requires_grad_()
    negatives = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64).requires_grad_()
    options = PairedOptions(normalize_negatives=normalize_negatives, eps=1e-12)

    def function(query: Tensor, negatives: Tensor) -> Tensor:
        return paired_logits(query, negatives, options)

    unit = negatives / negatives.norm(dim=-1, keepdim=True) if normalize_negatives else negatives
    expected = torch.einsum("bd,bmd->bm", query, unit)  # (B, M)
    assert_close(function(query, negatives), expected, rtol=1e-12, atol=1e-12, name="logits")
    assert torch.autograd.gradcheck(function, (query, negatives))


def statistics_pass(
    query: Tensor,
    keys: Tensor,
    extra: Tensor | None,
    *,
    row_scales: Tensor,
    column_scales: Tensor | None,
    block_rows: int,
    column_keys: int = 0,
    target_offset: int | None = None,
) -> walker.BlockPass:
    """The walker's statistics pass of the InfoNCE objective over one key segment."""
    layout = walker.Layout(block_rows, column_keys=column_keys, target_offset=target_offset)
    return walker.statistics_pass(
        query,
        (keys,),
        extra,
        InfoNCEObjective(),
        layout,
        row_scales=row_scales,
        column_scales=[column_scales],
    )


def test_block_pass_statistics_match_logsumexp() -> None:
    # The pure function behind LogSumExp: row and column statistics and targets of one pass.
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    keys = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    extra = torch.randn(7, 2, generator=generator, dtype=torch.float64) * 5
    row_scales = torch.rand(7, generator=generator, dtype=torch.float64) * 5
    column_scales = torch.rand(9, generator=generator, dtype=torch.float64) + 0.5
    result = statistics_pass(
        query,
        keys,
        extra,
        row_scales=row_scales,
        column_scales=column_scales,
        block_rows=3,
        column_keys=7,
        target_offset=2,
    )
    key_logits = (row_scales.unsqueeze(1) * query) @ (column_scales.unsqueeze(1) * keys).T
    logits = torch.cat([extra, key_logits], dim=1)  # (7, 11)
    assert_close(result.row_stat[:, 0], logits.logsumexp(1), rtol=1e-13, atol=1e-13, name="row_lse")
    assert result.column_lse is not None
    assert result.target_logit is not None
    expected_columns = key_logits[:, :7].logsumexp(0)
    assert_close(result.column_lse, expected_columns, rtol=1e-13, atol=1e-13, name="column_lse")
    expected_targets = key_logits[torch.arange(7), torch.arange(7) + 2]
    assert_close(result.target_logit, expected_targets, rtol=0, atol=1e-14, name="target_logit")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 2, 8, 16, 17])
def test_keys_start_aligned_behind_the_extra_columns(dtype: torch.dtype, width: int) -> None:
    # The objective sees the extra columns, -inf padding up to a 64-byte
    # boundary, then the keys; the padding changes no statistic.
    generator = torch.Generator().manual_seed(width)
    query = torch.randn(5, 3, generator=generator, dtype=dtype)
    keys = torch.randn(6, 3, generator=generator, dtype=dtype)
    extra = torch.randn(5, width, generator=generator, dtype=dtype)
    seen: list[Tensor] = []
    pointers: list[int] = []

    class Recording(InfoNCEObjective):
        def forward_(
            self, block: Tensor, context: Any, row_stat: Tensor, target_logit: Tensor | None
        ) -> Tensor:
            seen.append(block.clone())
            pointers.append(block.data_ptr())
            return super().forward_(block, context, row_stat, target_logit)

    layout = walker.Layout(2, target_offset=0)
    result = walker.statistics_pass(
        query,
        (keys,),
        extra,
        Recording(),
        layout,
        row_scales=torch.ones(5, dtype=dtype),
        column_scales=[None],
    )
    align = 64 // query.element_size()
    key_start = -(-width // align) * align
    block = torch.cat(seen)  # (5, key_start + 6)
    assert block.shape == (5, key_start + 6)
    # Row 0's first key sits on a 64-byte boundary of the walker's buffer.
    assert all((pointer + key_start * query.element_size()) % 64 == 0 for pointer in pointers)
    assert torch.isneginf(block[:, width:key_start]).all()
    assert_close(block[:, :width], extra, rtol=0, atol=0, name="extra")
    assert_close(block[:, key_start:], query @ keys.T, rtol=1e-6, atol=1e-6, name="keys")
    logits = torch.cat([extra, query @ keys.T], dim=1)
    assert_close(result.row_stat[:, 0], logits.logsumexp(1), rtol=1e-6, atol=1e-6, name="lse")
    assert result.target_logit is not None
    assert_close(result.target_logit, (query * keys[:5]).sum(1), rtol=1e-6, atol=1e-6, name="t")


@pytest.fixture
def separate_column_passes(monkeypatch: pytest.MonkeyPatch) -> mock.Mock:
    """A spy on the engine's separate pass for column statistics (`column_lse_pass`)."""
    spy = mock.Mock(wraps=columns.column_lse_pass)
    monkeypatch.setattr(columns, "column_lse_pass", spy)
    return spy


def check_float32_log_sum_exp(
    query: Tensor,
    keys: Tensor,
    options: LogSumExpOptions,
    *,
    rtol: float,
    grad_rtol: float,
) -> None:
    """`LogSumExp` on float32 copies of float64 inputs: loss and gradients against the formula."""
    single = [x.float().requires_grad_() for x in (query, keys)]
    loss = log_sum_exp(single[0], (single[1],), None, None, options)
    loss.backward()  # type: ignore[no-untyped-call]
    double = [x.clone().requires_grad_() for x in (query, keys)]
    expected = explicit_log_sum_exp(double[0], double[1], None, None, options)
    expected.backward()  # type: ignore[no-untyped-call]
    assert_close(loss, expected, rtol=rtol, atol=1e-5, name="loss")
    for name, got, want in zip(("query", "keys"), single, double, strict=True):
        assert_close(got.grad, want.grad, rtol=grad_rtol, atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_column_statistics_come_from_the_row_probabilities(
    dtype: torch.dtype, separate_column_passes: mock.Mock
) -> None:
    # Ordinary logits: the column statistics need no pass of their own.
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(37, 8, generator=generator, dtype=torch.float64)
    keys = torch.randn(41, 8, generator=generator, dtype=torch.float64)
    row_scales = torch.rand(37, generator=generator, dtype=torch.float64) * 2 + 0.5
    result = statistics_pass(
        query.to(dtype),
        keys.to(dtype),
        None,
        row_scales=row_scales.to(dtype),
        column_scales=None,
        block_rows=8,
        column_keys=37,
    )
    expected = ((row_scales.unsqueeze(1) * query) @ keys.T)[:, :37].logsumexp(0)
    tolerance = 1e-13 if dtype == torch.float64 else 1e-5
    assert result.column_lse is not None
    assert_close(result.column_lse, expected, rtol=tolerance, atol=tolerance, name="column_lse")
    assert separate_column_passes.call_count == 0


def test_column_statistics_keep_many_small_terms_beside_a_dominant_one(
    separate_column_passes: mock.Mock,
) -> None:
    # One logit of 0 and 2048 of -16.8 in the same column of one block: the
    # small terms add 1e-4 to its log-sum-exp, which a sum adding them one by
    # one onto the dominant term in float32 would lose entirely.
    logits = torch.full((2049, 1), -16.8, dtype=torch.float64)
    logits[0] = 0.0
    result = statistics_pass(
        logits.float(),
        torch.ones(1, 1),
        torch.zeros(2049, 1),
        row_scales=torch.ones(2049),
        column_scales=None,
        block_rows=2049,
        column_keys=1,
    )
    assert result.column_lse is not None
    expected = logits.logsumexp(0)
    assert_close(result.column_lse, expected, rtol=0, atol=1e-6, name="column_lse")
    assert separate_column_passes.call_count == 0


def test_low_temperature_needs_no_separate_column_pass(separate_column_passes: mock.Mock) -> None:
    # CLIP's usual logit scale (temperature 0.01) on matched pairs: logits span
    # about 200, yet every key's log-sum-exp is near the largest row's.
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(96, 16, generator=generator, dtype=torch.float64)
    keys = query + 0.3 * torch.randn(96, 16, generator=generator, dtype=torch.float64)
    options = LogSumExpOptions(
        reduction="mean", block_rows=32, column_keys=96, row_scale=0.5, column_scale=0.5,
        target_offset=0, normalize=True, temperature=0.01,
    )  # fmt: skip
    check_float32_log_sum_exp(query, keys, options, rtol=1e-5, grad_rtol=1e-4)
    assert separate_column_passes.call_count == 0


def test_columns_far_below_their_rows_get_a_pass_of_their_own(
    separate_column_passes: mock.Mock,
) -> None:
    # Key 1's logits are -200 (query 0) and 0 (query 1) while query 0's
    # log-sum-exp is 200: from the block's probabilities key 1's sum is
    # e^-200, zero in float32. The engine must notice and take the safe pass.
    query = torch.tensor([[200.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    keys = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    options = LogSumExpOptions(
        reduction="sum", block_rows=2, column_keys=3, row_scale=0.5, column_scale=0.5,
        target_offset=0,
    )  # fmt: skip
    check_float32_log_sum_exp(query, keys, options, rtol=1e-6, grad_rtol=1e-5)
    assert separate_column_passes.call_count == 1


@pytest.mark.parametrize(
    ("num_queries", "num_candidates"), [(1, 1), (5, 0), (300, 10), (4096, 4097), (10**6, 10**6)]
)
def test_default_block_rows_is_a_valid_block(num_queries: int, num_candidates: int) -> None:
    rows = walker.default_block_rows(num_queries, num_candidates)
    assert 1 <= rows <= num_queries
    assert rows * max(1, num_candidates) <= max(walker.MAX_BLOCK_ELEMENTS, num_candidates)


# --- Repeated and higher-order backward ---------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_backward_twice_with_retain_graph_gives_the_same_gradients(
    mode: Mode, reduction: str
) -> None:
    inputs = make_inputs(mode, 9, 5, 4, seed=7)
    loss = engine_info_nce(
        *inputs, reduction=reduction, negative_mode=negative_mode_of(mode), chunk_size=4
    )
    upstream = upstream_gradient(loss.shape)
    first = torch.autograd.grad(loss, inputs, grad_outputs=upstream, retain_graph=True)
    second = torch.autograd.grad(loss, inputs, grad_outputs=upstream, retain_graph=True)
    for name, a, b in zip(INPUT_NAMES, first, second, strict=False):
        assert torch.equal(a, b), f"gradient of {name} changed on the second backward"
    # And through .backward(): accumulated gradients are exactly twice one backward.
    loss.backward(upstream, retain_graph=True)
    loss.backward(upstream)
    for name, x, g in zip(INPUT_NAMES, inputs, first, strict=False):
        assert x.grad is not None
        assert_close(x.grad, 2 * g, rtol=1e-15, atol=0, name=f"accumulated gradient of {name}")


def hessian_vector_products(loss_fn: Callable[..., Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """Gradient of |gradient|^2 (a weighted upstream for 'none'), by double backward."""
    loss = loss_fn(*inputs)
    weighted = (loss * upstream_gradient(loss.shape)).sum()
    grads = torch.autograd.grad(weighted, inputs, create_graph=True)
    return list(torch.autograd.grad(sum(g.square().sum() for g in grads), inputs))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_double_backward_raises_a_clear_error_on_the_engine(mode: Mode, reduction: str) -> None:
    # Issue 3: "a second backward must either work or raise a clear error".
    # The engine's backward is not differentiable: it must raise, not be silently wrong.
    inputs = make_inputs(mode, 6, 4, 3, seed=8)
    options = {"reduction": reduction, "negative_mode": negative_mode_of(mode)}
    with pytest.raises(RuntimeError, match="double backward"):
        hessian_vector_products(lambda *x: engine_info_nce(*x, **options, chunk_size=2), inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_double_backward_works_on_the_dense_loss(mode: Mode, reduction: str) -> None:
    # chunk_size=None at this size is the dense loss, plain autograd: second
    # derivatives against finite differences of the first.
    inputs = make_inputs(mode, 5, 3, 2, seed=8)
    options = {"reduction": reduction, "negative_mode": negative_mode_of(mode)}

    def loss(*x: Tensor) -> Tensor:
        return info_nce(*x, **options)

    assert torch.autograd.gradgradcheck(loss, tuple(inputs))


# --- Dispatch: what chunk_size=None picks -----------------------------------------


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of calls to the dense loss and to each autograd Function of the engine."""
    counts = {"dense": 0, "LogSumExp": 0, "PairedLogits": 0}
    dense = functional.dense_info_nce

    def dense_spy(*args: Any, **kwargs: Any) -> Tensor:
        counts["dense"] += 1
        return dense(*args, **kwargs)

    monkeypatch.setattr(functional, "dense_info_nce", dense_spy)
    for autograd_function in (LogSumExp, PairedLogits):
        original = autograd_function.apply

        def apply_spy(
            *args: Any, _original: Any = original, _name: str = autograd_function.__name__
        ) -> Any:
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(autograd_function, "apply", apply_spy)
    return counts


LARGE_PROBLEMS = [
    pytest.param("in-batch", 512, 8, 0, "LogSumExp", id="in-batch-B512"),
    pytest.param("unpaired", 256, 8, 1024, "LogSumExp", id="unpaired-B256-M1024"),
    pytest.param("paired", 64, 64, 32, "PairedLogits", id="paired-B64-M32-D64"),
]


@pytest.mark.parametrize(("mode", "batch", "dim", "num_negatives", "engine"), LARGE_PROBLEMS)
def test_dispatch_picks_the_engine_for_large_problems(
    calls: dict[str, int], mode: Mode, batch: int, dim: int, num_negatives: int, engine: str
) -> None:
    if mode == "paired":
        assert batch * num_negatives * dim > functional.DENSE_MAX_PAIRED_ELEMENTS
    else:
        candidates = batch if mode == "in-batch" else 1 + num_negatives
        assert batch * candidates > functional.DENSE_MAX_LOGITS
    inputs = make_inputs(mode, batch, dim, num_negatives, seed=12)
    loss = info_nce(*inputs, negative_mode=negative_mode_of(mode))
    assert calls[engine] == 1, f"chunk_size=None did not use the engine: {calls}"
    assert calls["dense"] == 0, f"chunk_size=None used the dense loss: {calls}"
    grads = torch.autograd.grad(loss, inputs)
    expected = reference_loss_and_grads(
        inputs,
        torch.tensor(1.0, dtype=torch.float64),
        temperature=0.1,
        reduction="mean",
        negative_mode=negative_mode_of(mode),
    )
    assert_matches(loss, grads, expected, TOLERANCES[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_dispatch_picks_the_dense_loss_for_tiny_problems(calls: dict[str, int], mode: Mode) -> None:
    inputs = make_inputs(mode, 8, 4, 3)
    info_nce(*inputs, negative_mode=negative_mode_of(mode)).backward()
    assert calls == {"dense": 1, "LogSumExp": 0, "PairedLogits": 0}


@pytest.mark.parametrize("mode", MODES)
def test_chunk_size_forces_the_engine_even_for_tiny_problems(
    calls: dict[str, int], mode: Mode
) -> None:
    inputs = make_inputs(mode, 8, 4, 3)
    info_nce(*inputs, negative_mode=negative_mode_of(mode), chunk_size=2).backward()
    assert calls["dense"] == 0
    assert calls["PairedLogits" if mode == "paired" else "LogSumExp"] == 1


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_engine_loss_is_the_same_without_gradients(mode: Mode, reduction: str) -> None:
    # With gradients the scalar reductions build them during forward; without,
    # they must not, and the loss must not change.
    inputs = make_inputs(mode, 13, 6, 4, seed=13)
    options = {"reduction": reduction, "negative_mode": negative_mode_of(mode), "chunk_size": 5}
    with_grad = engine_info_nce(*inputs, **options)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = engine_info_nce(*inputs, **options)
    assert not no_grad.requires_grad
    detached = engine_info_nce(*[x.detach() for x in inputs], **options)
    assert not detached.requires_grad
    assert_close(no_grad, with_grad, rtol=1e-15, atol=1e-15, name="loss under no_grad")
    assert_close(detached, with_grad, rtol=1e-15, atol=1e-15, name="loss of detached inputs")


# --- Half precision -------------------------------------------------------------

HALF_DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_engine_half_precision_at_low_temperature(
    mode: Mode, reduction: str, dtype: torch.dtype
) -> None:
    half = [x.detach().to(dtype).requires_grad_() for x in make_inputs(mode, 16, 32, 5)]
    upcast = [x.detach().float().requires_grad_() for x in half]
    options = {
        "temperature": 0.01,
        "reduction": reduction,
        "negative_mode": negative_mode_of(mode),
        "chunk_size": 4,
    }
    upstream = upstream_gradient(torch.Size([16] if reduction == "none" else []))
    loss = engine_info_nce(*half, **options)
    grads = torch.autograd.grad(loss, half, grad_outputs=upstream.float())
    float32_loss = engine_info_nce(*upcast, **options)
    float32_grads = torch.autograd.grad(float32_loss, upcast, grad_outputs=upstream.float())
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    for name, grad in zip(INPUT_NAMES, grads, strict=False):
        assert grad.dtype == dtype
        assert torch.isfinite(grad).all(), f"gradient of {name} is not finite"
    options.pop("chunk_size")
    scales = reference_loss_and_grads(upcast, upstream, **options)
    assert_matches(
        loss,
        grads,
        scales,
        HALF_TOLERANCES[dtype],
        expected_loss=float32_loss,
        expected_grads=float32_grads,
    )


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_engine_gradients_share_an_allocation_without_overlapping(symmetric: bool) -> None:
    # The engine allocates the query and key gradients together. The symmetric
    # loss's backward returns those buffers themselves (they become .grad);
    # the one-way loss built them in forward and its backward returns rescaled
    # copies (a second backward must find them unchanged). Either way, writing
    # one gradient must leave the other as it was.
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(9, 4, generator=generator).requires_grad_()
    positive_key = torch.randn(9, 4, generator=generator).requires_grad_()
    engine_info_nce(query, positive_key, symmetric=symmetric, chunk_size=4).backward()
    assert query.grad is not None
    assert positive_key.grad is not None
    storages = (query.grad.untyped_storage(), positive_key.grad.untyped_storage())
    shared = storages[0].data_ptr() == storages[1].data_ptr()
    assert shared == symmetric, f"one allocation: {shared}, expected {symmetric}"
    key_grad = positive_key.grad.clone()
    query.grad.fill_(float("nan"))
    assert torch.equal(positive_key.grad, key_grad)
    assert query.grad.shape == query.shape
    assert positive_key.grad.shape == positive_key.shape


def test_gradient_buffers_are_one_allocation_of_disjoint_pieces() -> None:
    rows, first, second = torch.randn(5, 3), torch.randn(4, 3), torch.randn(2, 3)
    grad_rows, (grad_first, grad_second) = walker._gradient_buffers(rows, [first, second], True)
    assert grad_rows is not None
    pieces = (grad_rows, grad_first, grad_second)
    assert len({piece.untyped_storage().data_ptr() for piece in pieces}) == 1
    assert [tuple(piece.shape) for piece in pieces] == [(5, 3), (4, 3), (2, 3)]
    assert torch.equal(grad_first, torch.zeros(4, 3))
    assert torch.equal(grad_second, torch.zeros(2, 3))
    for index, piece in enumerate(pieces):
        others = [other.clone() for other in pieces]
        piece.fill_(float(index + 1))
        for other, before in zip(pieces, others, strict=True):
            if other is not piece:
                assert torch.equal(other, before), "gradient buffers overlap"


TWO_SEGMENT_CASES = [
    pytest.param(
        rule,
        in_forward,
        reduction,
        tile,
        id=f"{rule}-{reduction}-{'forward' if in_forward else 'backward'}-tile{tile}",
    )
    for rule in ("target-extra", "exclude")
    for reduction in REDUCTIONS
    for in_forward in (False, True)
    for tile in (None, 1, 3)
    if not (in_forward and reduction == "none")  # gradients in forward: scalar reductions
    if not (in_forward and tile is not None)  # tiles take the gradient pass
]


@pytest.mark.parametrize(
    ("rule", "grads_in_forward", "reduction", "tile_columns"), TWO_SEGMENT_CASES
)
def test_log_sum_exp_function_over_two_segments_gradcheck(
    rule: str, grads_in_forward: bool, reduction: str, tile_columns: int | None
) -> None:
    # Two key segments (the second frozen: no gradient asked for), and either
    # each row's target in its first extra column or its own key excluded;
    # complete rows, or column tiles (1 column: a tile per key; 3: tiles that
    # cross from one segment into the next).
    generator = torch.Generator().manual_seed(23)
    rows = torch.randn(5, 3, generator=generator, dtype=torch.float64).requires_grad_()
    frozen = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    extra = torch.randn(5, 2, generator=generator, dtype=torch.float64).requires_grad_()
    temperature = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    options = LogSumExpOptions(
        reduction=reduction,  # type: ignore[arg-type]
        block_rows=2,
        tile_columns=tile_columns,
        target_extra=rule == "target-extra",
        exclusions=(walker.Diagonal(0),) if rule == "exclude" else (),
        normalize=True,
        grads_in_forward=grads_in_forward,
    )

    def function(rows: Tensor, extra: Tensor, temperature: Tensor) -> Tensor:
        # The rows are also the first segment (as in NT-Xent): gradients add up.
        return log_sum_exp(rows, (rows, frozen), extra, temperature, options)

    def explicit(rows: Tensor, extra: Tensor, temperature: Tensor) -> Tensor:
        units = rows / rows.norm(dim=1, keepdim=True)
        keys = torch.cat([units, frozen / frozen.norm(dim=1, keepdim=True)])
        key_logits = units @ keys.T / temperature  # (5, 9)
        if rule == "exclude":
            key_logits = key_logits.masked_fill(torch.eye(5, 9, dtype=torch.bool), float("-inf"))
        logits = torch.cat([extra, key_logits], dim=1)
        value = logits.logsumexp(dim=1) - (extra[:, 0] if rule == "target-extra" else 0.0)
        return {"mean": value.mean(), "sum": value.sum(), "none": value}[reduction]

    inputs = (rows, extra, temperature)
    assert_close(function(*inputs), explicit(*inputs), rtol=1e-12, atol=1e-12, name="value")
    assert torch.autograd.gradcheck(function, inputs)


# --- Column tiles of long rows ----------------------------------------------------


TILE_CASES = [
    pytest.param(mode, batch, dim, tile, id=f"{mode}-B{batch}-D{dim}-tile{tile}")
    for mode in ("in-batch", "unpaired", "queue")
    for batch, dim in [(1, 1), (1, 123), (37, 1), (37, 123)]
    for tile in (1, 4, 16)
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("mode", "batch", "dim", "tile"), TILE_CASES)
def test_tiled_engine_matches_float64_reference(
    mode: str, batch: int, dim: int, tile: int, reduction: str, dtype: torch.dtype
) -> None:
    # Rows longer than a tile are walked 4 rows against `tile` columns at a
    # time: the row statistics accumulate tile by tile, the gradient pass
    # recomputes each tile. A queue (negatives without gradient) under a
    # scalar reduction takes the one-pass walk (online softmax) instead.
    inputs = make_inputs(
        "in-batch" if mode == "in-batch" else "unpaired",
        batch,
        dim,
        23,
        dtype=dtype,
        seed=batch + dim + tile,
    )
    if mode == "queue":
        inputs[2].requires_grad_(False)
    upstream = upstream_gradient(torch.Size([batch] if reduction == "none" else []))
    with (
        column_tiles(rows=4, tile=tile) as walks,
        mock.patch.object(walker, "_online_pass", wraps=walker._online_pass) as one_pass,
    ):
        loss = info_nce(
            *inputs,
            temperature=0.07,
            reduction=reduction,  # type: ignore[arg-type]
        )
    if batch == 37:  # 4 rows of 37 (in-batch) or 24 (unpaired) candidates exceed 4 * tile
        assert walks == [tile], walks
        assert one_pass.called == (mode == "queue" and reduction != "none")
    expected = reference_loss_and_grads(
        inputs, upstream, temperature=0.07, reduction=reduction, negative_mode="unpaired"
    )
    wanted = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted, grad_outputs=upstream.to(loss.dtype)))
    actual = [next(grads) if x.requires_grad else None for x in inputs]
    assert_matches(loss, actual, expected, TOLERANCES[dtype])


def test_default_block_shape() -> None:
    # Keys with gradient: complete rows down to 64 rows per block (C3: 255
    # rows), tiles below. A queue (frozen keys): 256 rows against 16,384-column
    # tiles once rows are longer than two tiles (C11, C12). An objective that
    # needs complete rows keeps them.
    assert walker.default_block_shape(1024, 65537, tileable=True) == (255, None)
    assert walker.default_block_shape(1024, 262145, tileable=True) == (256, 1 << 14)
    assert walker.default_block_shape(4096, 65537, tileable=True, frozen_keys=True) == (
        256,
        1 << 14,
    )
    assert walker.default_block_shape(4096, 16385, tileable=True, frozen_keys=True) == (
        256,
        None,
    )
    assert walker.default_block_shape(256, (1 << 20) + 1, tileable=True) == (256, 1 << 14)
    assert walker.default_block_shape(256, (1 << 20) + 1, tileable=False) == (15, None)
    assert walker.default_block_shape(20, 1 << 30, tileable=True) == (20, (1 << 22) // 20)


@pytest.mark.parametrize(
    ("options", "tiled"),
    [
        ({}, True),
        ({"decoupled": True}, True),
        ({"false_negative_rate": 0.1}, False),  # the debiased loss needs complete rows
        ({"chunk_size": 3}, False),  # the caller's rows per block: complete rows
        ({"symmetric": True}, False),  # column statistics need complete rows
        ({"queue": True}, True),
        ({"queue": True, "decoupled": True}, True),
    ],
)
def test_which_walks_are_tiled(options: dict[str, Any], tiled: bool) -> None:
    query, positive = make_inputs("in-batch", 12, 4, seed=5)
    negatives = None
    if options.pop("queue", False):  # 12 frozen negatives, no in-batch keys
        negatives = torch.randn(12, 4, dtype=torch.float64)
    with column_tiles(rows=3, tile=5) as walks:
        info_nce(query, positive, negatives, **options)
    assert walks == [5 if tiled else None], walks


@pytest.mark.parametrize("tile_columns", [1, 3, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["infonce", "decoupled"])
def test_one_pass_tile_walk_gradcheck(tile_columns: int, reduction: str, decoupled: bool) -> None:
    # Two frozen key segments (a queue), each row's target in its first extra
    # column (decoupled: excluded from the candidates), gradients built in the
    # one pass: the online softmax, rescaled as each row's maximum grows.
    generator = torch.Generator().manual_seed(29)
    rows = torch.randn(5, 3, generator=generator, dtype=torch.float64).requires_grad_()
    frozen = (
        torch.randn(4, 3, generator=generator, dtype=torch.float64) * 3,
        torch.randn(6, 3, generator=generator, dtype=torch.float64),
    )
    extra = torch.randn(5, 2, generator=generator, dtype=torch.float64).requires_grad_()
    temperature = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    objective = DecoupledObjective() if decoupled else InfoNCEObjective()
    options = LogSumExpOptions(
        reduction=reduction,  # type: ignore[arg-type]
        block_rows=2,
        tile_columns=tile_columns,
        target_extra=True,
        exclude_target=decoupled,
        normalize=True,
        grads_in_forward=True,
        objective=objective,
    )

    def function(rows: Tensor, extra: Tensor, temperature: Tensor) -> Tensor:
        return log_sum_exp(rows, frozen, extra, temperature, options)

    def explicit(rows: Tensor, extra: Tensor, temperature: Tensor) -> Tensor:
        units = rows / rows.norm(dim=1, keepdim=True)
        keys = torch.cat([k / k.norm(dim=1, keepdim=True) for k in frozen])
        candidates = torch.cat([extra, units @ keys.T / temperature], dim=1)  # (5, 12)
        if decoupled:
            candidates = candidates[:, 1:]
        value = candidates.logsumexp(dim=1) - extra[:, 0]
        return value.mean() if reduction == "mean" else value.sum()

    inputs = (rows, extra, temperature)
    with mock.patch.object(walker, "_online_pass", wraps=walker._online_pass) as one_pass:
        assert_close(function(*inputs), explicit(*inputs), rtol=1e-12, atol=1e-12, name="value")
    assert one_pass.called
    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(grid.options("engine")))
def test_scaled_key_copies_as_on_an_accelerator(
    monkeypatch: pytest.MonkeyPatch, name: str, reduction: str
) -> None:
    """Every pass over scaled copies of the keys (as off the CPU) gives the same result."""

    def loss_and_grads() -> list[Tensor]:
        leaves = [x.requires_grad_() for x in grid.inputs(0)]
        value = grid.options("engine", reduction)[name](*leaves)
        upstream = torch.rand(value.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(value, leaves, upstream.double(), allow_unused=True)
        return [
            value,
            *(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)),
        ]

    exact = loss_and_grads()
    walked: list[list[Tensor | None]] = []

    def spy(original: Callable[..., walker.BlockPass]) -> Callable[..., walker.BlockPass]:
        def recorded(*args: Any, **kwargs: Any) -> walker.BlockPass:
            walked.append(kwargs["column_scales"])
            return original(*args, **kwargs)

        return recorded

    monkeypatch.setattr(function, "scaled_key_copies", lambda rows: True)
    monkeypatch.setattr(walker, "gradient_pass", spy(walker.gradient_pass))
    monkeypatch.setattr(walker, "statistics_pass", spy(walker.statistics_pass))
    for got, want in zip(loss_and_grads(), exact, strict=True):
        assert_close(got, want, rtol=1e-12, atol=1e-12, name=name)
    # Every pass walked scaled copies: no column scales left to apply.
    assert walked
    assert all(s is None for scales in walked for s in scales)
