"""The Triton kernels (``INFO_NCE_BACKEND=triton``) against float64, and the backend's choice.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before any kernel is built);
with one, the same tests run them on CUDA too. Marked ``triton``:
``pytest -m "not triton"`` leaves them out locally; CI runs them.

* Each kernel against the formula in float64, written here: odd shapes,
  rows longer than one program's step, excluded entries, rows without
  candidates, targets on a diagonal, in one column or none, a weight per row
  or one for all; float64, float32 and float16 blocks.
* Every option of the test grid on the engine and tiles paths, with every
  reduction, under the kernels: equal to the PyTorch ops in float64, and to
  the float64 loss in float32.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from grid import inputs, options
from reference import assert_close
from tiling import TILES_PATH, tiles_on_path  # noqa: F401  (autouse: the tiles path)
from torch import Tensor

from info_nce import info_nce
from info_nce._backend import ENVIRONMENT, backend, kernels_for
from info_nce.engine import function
from info_nce.objectives import DecoupledObjective, InfoNCEObjective, SigmoidObjective
from info_nce.objectives.base import ColumnSoftmax, RowContext, TargetLabels

pytestmark = [
    pytest.mark.triton,
    pytest.mark.usefixtures("one_thread"),
    # The interpreter computes log(0) of a row without candidates in NumPy, which warns.
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="CUDA is not available on this machine"
        ),
    ),
]


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels on every tensor."""
    monkeypatch.setenv(ENVIRONMENT, "triton")


def random_block(rows: int, width: int, dtype: torch.dtype, device: str, seed: int) -> Tensor:
    """(rows, width) logits in [-3, 3], about one in five -inf, row 1 all -inf if it exists."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.rand(rows, width, generator=generator, dtype=torch.float64) * 6 - 3
    block[torch.rand(rows, width, generator=generator) < 0.2] = float("-inf")
    if rows > 2:
        block[1] = float("-inf")  # a row without candidates
    return block.to(device, dtype)


def target_columns(context: RowContext, rows: int, first_column: int) -> list[int | None]:
    """Each row's target column in a slice from ``first_column``, from the definition."""
    if context.target_start is None:
        return [None] * rows
    return [
        context.target_start + (context.first_row + r) * context.target_step - first_column
        for r in range(rows)
    ]


def expected_softmax(block: Tensor) -> tuple[Tensor, Tensor]:
    """float64 log-sum-exp of each row (-inf: no candidate) and its softmax (0 there)."""
    exact = block.double().cpu()
    lse = torch.logsumexp(exact, dim=1)
    probabilities = torch.exp(exact - lse[:, None]).nan_to_num(nan=0.0)
    return lse, probabilities


def expected_gradient(
    probabilities: Tensor, weight: Tensor | float, targets: list[int | None]
) -> Tensor:
    """``weight * (probabilities - onehot(target))`` in float64."""
    w = (
        weight.double().cpu()
        if isinstance(weight, Tensor)
        else torch.tensor(weight, dtype=torch.float64)
    )
    grad = probabilities * w
    rows = w[:, 0] if isinstance(weight, Tensor) else w.expand(len(probabilities))
    for r, column in enumerate(targets):
        if column is not None and 0 <= column < probabilities.shape[1]:
            grad[r, column] -= rows[r]
    return grad


TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
}
SHAPES = [(1, 1), (1, 123), (5, 7), (37, 123), (9, 2048 + 37)]
CONTEXTS = {
    "none": (RowContext(3), 0),
    "diagonal": (RowContext(3, target_start=2), 0),
    "diagonal-offset": (RowContext(5, target_start=1), 4),
    "column": (RowContext(3, target_start=0, target_step=0), 0),
    "column-outside": (RowContext(0, target_start=0, target_step=0), 2),
}


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("target", list(CONTEXTS))
def test_forward_kernel_is_the_row_softmax(
    device: str, dtype: torch.dtype, shape: tuple[int, int], target: str
) -> None:
    rows, width = shape
    context, _ = CONTEXTS[target]
    block = random_block(rows, width, dtype, device, seed=rows + width)
    lse, probabilities = expected_softmax(block)
    target_logit = None
    if context.target_start is not None:
        target_logit = torch.randn(rows, dtype=torch.float64).to(device, dtype)
    row_stat = block.new_empty(rows, 1, dtype=torch.promote_types(dtype, torch.float32))
    loss = InfoNCEObjective().forward_(block, context, row_stat, target_logit)
    rtol, atol = TOLERANCES[dtype]
    finite = torch.isfinite(lse)
    assert_close(
        row_stat[finite.to(device), 0].cpu().double(), lse[finite], rtol=rtol, atol=atol, name="lse"
    )
    assert torch.isneginf(row_stat[~finite.to(device), 0]).all()
    assert_close(block.cpu().double(), probabilities, rtol=rtol, atol=atol, name="softmax")
    want = lse if target_logit is None else lse - target_logit.double().cpu()
    assert_close(
        loss[finite.to(device)].cpu().double(), want[finite], rtol=rtol, atol=atol, name="loss"
    )


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("target", list(CONTEXTS))
@pytest.mark.parametrize("row_weight", [False, True], ids=["one-weight", "row-weights"])
@pytest.mark.parametrize("from_forward", [False, True], ids=["from-logits", "from-softmax"])
def test_gradient_kernels_are_weighted_softmax_minus_target(
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int],
    target: str,
    row_weight: bool,
    from_forward: bool,
) -> None:
    rows, width = shape
    context, first_column = CONTEXTS[target]
    block = random_block(rows, width, dtype, device, seed=rows * width)
    lse, probabilities = expected_softmax(block)
    weight: Tensor | float = 0.7
    if row_weight:
        weight = torch.rand(rows, 1, dtype=torch.float64).to(device, dtype)
    objective = InfoNCEObjective()
    if from_forward:
        block = probabilities.to(device, dtype, copy=True)
        objective.gradient_from_forward_(block, context, block.new_empty(rows, 1), weight)
        first_column = 0
    else:
        row_stat = lse.to(device, torch.promote_types(dtype, torch.float32))[:, None]
        objective.gradient_(block, context, first_column, row_stat, weight)
    want = expected_gradient(probabilities, weight, target_columns(context, rows, first_column))
    rtol, atol = TOLERANCES[dtype]
    assert_close(block.cpu().double(), want, rtol=rtol, atol=atol, name="gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("target", ["none", "diagonal", "column"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["infonce", "decoupled"])
@pytest.mark.parametrize("keys", [None, "same", "float16"], ids=lambda k: f"keys-{k}")
@pytest.mark.parametrize("chosen", ["triton", "torch"])
def test_one_pass_is_the_loss_and_softmax_minus_target(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int],
    target: str,
    decoupled: bool,
    keys: str | None,
    chosen: str,
) -> None:
    """The one-pass walk's step (kernel and ops): statistics, loss and gradient.

    With ``keys`` the key columns live in a buffer of their own (as the
    products' dtype keeps them): logits read from it, gradient written to it.
    """
    monkeypatch.setenv(ENVIRONMENT, chosen)
    rows, width = shape
    context, _ = CONTEXTS[target]
    block = random_block(rows, width, dtype, device, seed=5 * rows + width)
    target_logit = None
    if context.target_start is not None:
        target_logit = torch.randn(rows, dtype=torch.float64).to(device, dtype)
    key_columns = width - width // 3  # the last columns: the keys'
    split = width - key_columns
    keys_buffer = None
    if keys is not None:
        keys_dtype = dtype if keys == "same" else torch.float16
        keys_buffer = block[:, split:].to(keys_dtype, copy=True)
        block[:, split:] = block[:, split:].to(keys_dtype)  # the logits as the buffer holds them
    lse, probabilities = expected_softmax(block)
    if keys_buffer is not None:
        block[:, split:] = 7.0  # scratch: never read
    stat_dtype = torch.promote_types(dtype, torch.float32)
    row_stat = block.new_empty(rows, 1, dtype=stat_dtype)
    objective = DecoupledObjective() if decoupled else InfoNCEObjective()
    loss = objective.forward_with_gradient_(block, context, row_stat, target_logit, keys_buffer)

    empty = torch.isneginf(lse)
    want_loss = lse if target_logit is None else lse - target_logit.double().cpu()
    want_stat = lse.clone()
    want = expected_gradient(probabilities, 1.0, target_columns(context, rows, 0))
    # InfoNCE's rows always have candidates (the target); the decoupled
    # loss's may have none: they cost 0, have no gradient, and are marked.
    checked = torch.ones_like(empty) if decoupled else ~empty
    if decoupled:
        want_loss[empty], want_stat[empty], want[empty] = 0.0, float("inf"), 0.0
    rtol, atol = TOLERANCES[dtype]
    got_loss, got_stat = loss.cpu().double()[checked], row_stat[:, 0].cpu().double()[checked]
    assert_close(got_loss, want_loss[checked], rtol=rtol, atol=atol, name="loss")
    assert_close(got_stat, want_stat[checked], rtol=rtol, atol=atol, name="statistic")
    got = block.cpu().double()[checked]
    want = want[checked]
    if keys_buffer is not None:
        g_rtol, g_atol = TOLERANCES[keys_buffer.dtype]
        got_keys = keys_buffer.cpu().double()[checked]
        assert_close(got_keys, want[:, split:], rtol=g_rtol, atol=g_atol, name="keys")
        got, want = got[:, :split], want[:, :split]
    assert_close(got, want, rtol=rtol, atol=atol, name="gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("target", ["none", "diagonal-offset"])
@pytest.mark.parametrize("column_weights", [False, True], ids=["one-weight", "column-weights"])
@pytest.mark.parametrize("column_targets", [False, True], ids=["", "column-targets"])
@pytest.mark.parametrize("chosen", ["triton", "torch"])
def test_gradient_with_the_column_softmax(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int],
    target: str,
    column_weights: bool,
    column_targets: bool,
    chosen: str,
) -> None:
    """The symmetric loss's gradient pass: the columns' weighted softmax added (kernel, ops).

    With column targets, each column's weight comes off its target, the
    entry that is its row's target.
    """
    monkeypatch.setenv(ENVIRONMENT, chosen)
    rows, width = shape
    context, first_column = CONTEXTS[target]
    block = random_block(rows, width, dtype, device, seed=7 * rows + width)
    lse, probabilities = expected_softmax(block)
    exact = block.double().cpu().clone()  # the block is overwritten
    generator = torch.Generator().manual_seed(width)
    # Each column's log-sum-exp over all rows: these rows' and more (a positive excess).
    excess = torch.rand(width, generator=generator, dtype=torch.float64)
    column_lse = torch.logaddexp(torch.logsumexp(exact, dim=0), excess)
    column_weight: Tensor | float = 0.3
    want_weight = torch.full((width,), 0.3, dtype=torch.float64)
    if column_weights:
        want_weight = torch.rand(width, generator=generator, dtype=torch.float64)
        column_weight = want_weight.to(device, dtype)
    weight = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    stat_dtype = torch.promote_types(dtype, torch.float32)
    columns = ColumnSoftmax(column_lse.to(device, stat_dtype), column_weight, column_targets)
    InfoNCEObjective().gradient_(
        block,
        context,
        first_column,
        lse.to(device, stat_dtype)[:, None],
        weight.to(device, dtype),
        columns,
    )
    found = target_columns(context, rows, first_column)
    want = expected_gradient(probabilities, weight, found)
    want += want_weight * torch.exp(exact - column_lse)
    for r, column in enumerate(found):
        if column_targets and column is not None and 0 <= column < width:
            want[r, column] -= want_weight[column]
    # A row without candidates never reaches the ops (the symmetric loss's
    # rows have their target); the kernel gives it the plain formula.
    checked = torch.isfinite(lse) if chosen == "torch" else torch.ones_like(lse, dtype=torch.bool)
    rtol, atol = TOLERANCES[dtype]
    got = block.cpu().double()[checked]
    assert_close(got, want[checked], rtol=rtol, atol=atol, name="gradient")


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (77, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_column_sums_kernel_is_the_weighted_column_sum(
    device: str, dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    """The symmetric loss's column statistics: one read of a slice of a wider block."""
    from info_nce import kernels

    rows, width = shape
    block = random_block(rows, width + 5, dtype, device, seed=rows + 3 * width)
    _, probabilities = expected_softmax(block)
    found = probabilities.to(device, dtype)[:, 3 : 3 + width]  # strided, as the walker's
    generator = torch.Generator().manual_seed(width)
    weight = torch.rand(rows, generator=generator, dtype=torch.float64)
    stat_dtype = torch.promote_types(dtype, torch.float32)
    sums = kernels.column_sums(found, weight.to(device, stat_dtype))
    want = (found.double().cpu() * weight[:, None]).sum(0)
    rtol, atol = TOLERANCES[dtype]
    assert sums.dtype == stat_dtype
    assert_close(sums.cpu().double(), want, rtol=rtol, atol=atol, name="column sums")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("keys", ["same", "float16"], ids=lambda k: f"keys-{k}")
@pytest.mark.parametrize("chosen", ["triton", "torch"])
def test_statistics_with_the_keys_elsewhere_leave_the_logits(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int],
    keys: str,
    chosen: str,
) -> None:
    """``forward_`` with the key columns in their own buffer: the statistics and the loss.

    Under the kernels the logits stay where they are (the walker takes the
    column statistics from them); the ops widen them into the block.
    """
    monkeypatch.setenv(ENVIRONMENT, chosen)
    rows, width = shape
    context, _ = CONTEXTS["diagonal"]
    block = random_block(rows, width, dtype, device, seed=11 * rows + width)
    split = width // 3
    keys_dtype = dtype if keys == "same" else torch.float16
    keys_buffer = block[:, split:].to(keys_dtype, copy=True)
    block[:, split:] = keys_buffer.to(dtype)  # the logits as the buffer holds them
    lse, _ = expected_softmax(block)
    kept = keys_buffer.clone()
    target_logit = torch.randn(rows, dtype=torch.float64).to(device, dtype)
    row_stat = block.new_empty(rows, 1, dtype=torch.promote_types(dtype, torch.float32))
    loss = InfoNCEObjective().forward_(block, context, row_stat, target_logit, keys_buffer)
    finite = torch.isfinite(lse)
    rtol, atol = TOLERANCES[dtype]
    want = lse - target_logit.double().cpu()
    got_lse = row_stat[:, 0].cpu().double()[finite]
    assert_close(got_lse, lse[finite], rtol=rtol, atol=atol, name="lse")
    assert_close(loss.cpu().double()[finite], want[finite], rtol=rtol, atol=atol, name="loss")
    assert torch.equal(keys_buffer, kept)  # the keys' logits are left as they were


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*TOLERANCES, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (77, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_column_exp_sums_kernel_is_the_shifted_column_sum(
    device: str, dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    """The column statistics from the logits: ``sum_i exp(logit_ij - shift)``, read once."""
    from info_nce import kernels

    rows, width = shape
    block = random_block(rows, width + 5, dtype, device, seed=rows + 7 * width)
    logits = block[:, 3 : 3 + width]  # strided, as the walker's
    exact = logits.double().cpu()
    lse = torch.logsumexp(exact, dim=1)
    stat_dtype = torch.promote_types(dtype, torch.float32)
    shift = lse[torch.isfinite(lse)].max()  # the largest row log-sum-exp
    sums = kernels.column_exp_sums(logits, shift.to(device, stat_dtype))
    want = torch.exp(exact - shift).sum(0)
    rtol, atol = TOLERANCES[stat_dtype]
    assert sums.dtype == stat_dtype
    assert_close(sums.cpu().double(), want, rtol=rtol, atol=atol, name="column sums")


def sigmoid_targets(context: RowContext, rows: int, width: int, first_column: int) -> Tensor:
    """(rows, width) bool: each row's targets, from the definition (its column, or its label)."""
    found = torch.zeros(rows, width, dtype=torch.bool)
    labels = context.target_labels
    if labels is not None:
        for r in range(rows):
            for c in range(width):
                key = first_column + c - labels.key_start
                if 0 <= key < len(labels.keys):
                    found[r, c] = bool(labels.rows[r] == labels.keys[key])
        return found
    for r, column in enumerate(target_columns(context, rows, first_column)):
        if column is not None and 0 <= column < width:
            found[r, column] = True
    return found


def sigmoid_contexts(rows: int) -> dict[str, tuple[RowContext, int]]:
    generator = torch.Generator().manual_seed(rows)
    labels = TargetLabels(
        rows=torch.randint(0, 3, (rows,), generator=generator),
        keys=torch.randint(0, 3, (50,), generator=generator),
        key_start=2,
    )
    return {
        "none": (RowContext(3, logit_bias=-2.0), 0),
        "diagonal": (RowContext(3, target_start=2, logit_bias=torch.tensor(-1.5)), 0),
        "column-offset": (RowContext(5, target_start=6, target_step=0, logit_bias=0.5), 4),
        "labels": (RowContext(0, target_labels=labels, logit_bias=-3.0), 0),
        "labels-offset": (RowContext(0, target_labels=labels, logit_bias=-3.0), 30),
    }


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("target", ["none", "diagonal", "column-offset", "labels", "labels-offset"])
@pytest.mark.parametrize("row_weight", [False, True], ids=["one-weight", "row-weights"])
def test_sigmoid_kernels_are_softplus_and_signed_sigmoid(
    device: str, dtype: torch.dtype, shape: tuple[int, int], target: str, row_weight: bool
) -> None:
    rows, width = shape
    context, first_column = sigmoid_contexts(rows)[target]
    labels = context.target_labels
    if labels is not None:
        moved = TargetLabels(labels.rows.to(device), labels.keys.to(device), labels.key_start)
        context = RowContext(0, target_labels=moved, logit_bias=context.logit_bias)
    bias = context.logit_bias
    block = random_block(rows, width, dtype, device, seed=rows + 2 * width)
    # A target is never excluded (the walker excludes none for this loss).
    targets = sigmoid_targets(context, rows, width, 0)
    targets |= sigmoid_targets(context, rows, width, first_column)
    block[targets.to(device) & torch.isneginf(block)] = 0.5
    exact = block.double().cpu()
    z = exact + (bias.double() if isinstance(bias, Tensor) else bias)
    excluded = torch.isneginf(exact)

    def expected(first: int) -> tuple[Tensor, Tensor]:
        """Each entry's softplus(s z) and s sigmoid(s z) in a slice from column ``first``."""
        signs = 1 - 2 * sigmoid_targets(context, rows, width, first).double()
        terms = torch.nn.functional.softplus(signs * z).masked_fill(excluded, 0.0)
        return terms, (signs * torch.sigmoid(signs * z)).masked_fill(excluded, 0.0)

    rtol, atol = TOLERANCES[dtype]
    terms, grad = expected(0)
    objective = SigmoidObjective()

    # The forward pass: the loss, d loss / d bias per row, the gradient left in the block.
    forward = block.clone()
    row_stat = block.new_empty(rows, 1, dtype=torch.promote_types(dtype, torch.float32))
    loss = objective.forward_(forward, context, row_stat, None)
    assert_close(loss.cpu().double(), terms.sum(1), rtol=rtol, atol=atol, name="loss")
    assert_close(row_stat[:, 0].cpu().double(), grad.sum(1), rtol=rtol, atol=atol, name="bias")
    assert_close(forward.cpu().double(), grad, rtol=rtol, atol=atol, name="forward's gradient")

    # The gradient pass on a slice of columns, weighted.
    weight: Tensor | float = 0.7
    w = torch.tensor(0.7, dtype=torch.float64)
    if row_weight:
        weight = torch.rand(rows, 1, dtype=torch.float64).to(device, dtype)
        w = weight.double().cpu()
    objective.gradient_(block, context, first_column, row_stat, weight)
    _, grad = expected(first_column)
    assert_close(block.cpu().double(), grad * w, rtol=rtol, atol=atol, name="gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("target", ["none", "diagonal", "labels"])
@pytest.mark.parametrize("keys", [None, "same", "float16"], ids=lambda k: f"keys-{k}")
@pytest.mark.parametrize("chosen", ["triton", "torch"])
def test_sigmoid_one_pass_with_the_keys_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int],
    target: str,
    keys: str | None,
    chosen: str,
) -> None:
    """The sigmoid loss's one-pass step, the key columns read from and written to their buffer."""
    monkeypatch.setenv(ENVIRONMENT, chosen)
    rows, width = shape
    context, _ = sigmoid_contexts(rows)[target]
    labels = context.target_labels
    if labels is not None:
        moved = TargetLabels(labels.rows.to(device), labels.keys.to(device), labels.key_start)
        context = RowContext(0, target_labels=moved, logit_bias=context.logit_bias)
    block = random_block(rows, width, dtype, device, seed=rows + 5 * width)
    targets = sigmoid_targets(context, rows, width, 0)
    block[targets.to(device) & torch.isneginf(block)] = 0.5
    split = width // 3
    keys_buffer = None
    if keys is not None:
        keys_dtype = dtype if keys == "same" else torch.float16
        keys_buffer = block[:, split:].to(keys_dtype, copy=True)
        block[:, split:] = keys_buffer.to(dtype)  # the logits as the buffer holds them
    bias = context.logit_bias
    exact = block.double().cpu().clone()
    if keys_buffer is not None:
        block[:, split:] = 7.0  # scratch: never read
    z = exact + (bias.double() if isinstance(bias, Tensor) else bias)
    signs = 1 - 2 * targets.double()
    excluded = torch.isneginf(exact)
    terms = torch.nn.functional.softplus(signs * z).masked_fill(excluded, 0.0)
    grad = (signs * torch.sigmoid(signs * z)).masked_fill(excluded, 0.0)
    row_stat = block.new_empty(rows, 1, dtype=torch.promote_types(dtype, torch.float32))
    loss = SigmoidObjective().forward_with_gradient_(block, context, row_stat, None, keys_buffer)
    rtol, atol = TOLERANCES[dtype]
    assert_close(loss.cpu().double(), terms.sum(1), rtol=rtol, atol=atol, name="loss")
    assert_close(row_stat[:, 0].cpu().double(), grad.sum(1), rtol=rtol, atol=atol, name="bias")
    got = block.cpu().double()
    if keys_buffer is not None:
        k_rtol, k_atol = TOLERANCES[keys_buffer.dtype]
        got_keys = keys_buffer.cpu().double()
        assert_close(got_keys, grad[:, split:], rtol=k_rtol, atol=k_atol, name="keys")
        got, grad = got[:, :split], grad[:, :split]
    assert_close(got, grad, rtol=rtol, atol=atol, name="gradient")


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_debiased_kernels_are_two_softmaxes(
    device: str, dtype: torch.dtype, shape: tuple[int, int], beta: float
) -> None:
    from info_nce import kernels

    rows, width = shape
    block = random_block(rows, width, dtype, device, seed=3 * rows + width)
    # The objective keeps one finite entry in a row without negatives.
    block[torch.isneginf(block).all(dim=1), 0] = 0.0
    exact = block.double().cpu().clone()
    rtol, atol = TOLERANCES[dtype]
    lse_p, lse_q = kernels.dual_lse(block, beta)
    want_p = torch.logsumexp((1 + beta) * exact, dim=1)
    assert_close(lse_p.cpu().double(), want_p, rtol=rtol, atol=atol, name="lse((1 + beta) s)")
    assert (lse_q is None) == (beta == 0)
    want_q = torch.logsumexp(beta * exact, dim=1)
    if lse_q is not None:
        assert_close(lse_q.cpu().double(), want_q, rtol=rtol, atol=atol, name="lse(beta s)")
    generator = torch.Generator().manual_seed(rows)
    coef_p, coef_q = torch.rand(2, rows, generator=generator, dtype=torch.float64)
    kernels.dual_gradient_(
        block,
        beta,
        want_p.to(device),
        want_q.to(device) if beta else None,
        coef_p.to(device),
        coef_q.to(device) if beta else None,
    )
    excluded = torch.isneginf(exact)
    want = coef_p[:, None] * torch.exp((1 + beta) * exact - want_p[:, None])
    if beta:
        want -= coef_q[:, None] * torch.exp(beta * exact - want_q[:, None])
    want = want.masked_fill(excluded, 0.0)
    assert_close(block.cpu().double(), want, rtol=rtol, atol=atol, name="gradient")


GRID_PATHS = ["engine", TILES_PATH]


def loss_and_grads(
    path: str, name: str, reduction: str, dtype: torch.dtype, device: str
) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.requires_grad_() for x in inputs(0, dtype, device)]
    value = options(path, reduction)[name](*leaves)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.rand(value.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(value, leaves, upstream.to(device, dtype), allow_unused=True)
    zeros = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
    return value.cpu().double(), [g.cpu().double() for g in zeros]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("path", "name"), [(path, name) for path in GRID_PATHS for name in options(path)]
)
def test_every_option_under_the_kernels_matches_the_ops(
    monkeypatch: pytest.MonkeyPatch, device: str, path: str, name: str, reduction: str
) -> None:
    monkeypatch.setenv(ENVIRONMENT, "torch")
    exact, exact_grads = loss_and_grads(path, name, reduction, torch.float64, "cpu")
    monkeypatch.setenv(ENVIRONMENT, "triton")
    for dtype, (rtol, atol) in [(torch.float64, (1e-12, 1e-12)), (torch.float32, (1e-5, 1e-6))]:
        value, grads = loss_and_grads(path, name, reduction, dtype, device)
        assert_close(value, exact, rtol=rtol, atol=atol, name=f"{name} loss, {dtype}")
        for got, want in zip(grads, exact_grads, strict=True):
            assert_close(got, want, rtol=rtol, atol=atol, name=f"{name} gradient, {dtype}")


def autocast_loss_and_grads(path: str, name: str, reduction: str) -> tuple[Tensor, list[Tensor]]:
    """`loss_and_grads` of float32 inputs under CPU autocast: bfloat16 products."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return loss_and_grads(path, name, reduction, torch.float32, "cpu")


@pytest.mark.parametrize("scaled_keys", [False, True], ids=["", "scaled-keys"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    ("path", "name"), [(path, name) for path in GRID_PATHS for name in options(path)]
)
def test_bfloat16_products_under_the_kernels_match_the_ops(
    monkeypatch: pytest.MonkeyPatch, path: str, name: str, reduction: str, scaled_keys: bool
) -> None:
    """With a product dtype the kernels read the keys' logits and write their gradient in it.

    The loss comes from the same float32 statistics in both: equal to 1e-3.
    The gradients are rounded to bfloat16 by the kernels themselves, and
    Triton's interpreter truncates there where CUDA and torch round to
    nearest (about half of all float32 values come out one bfloat16 step
    apart), so under the interpreter the gradients are held to the bfloat16
    products' own error (2e-2, as against float32 in tests/test_autocast.py).
    Both took bfloat16 products. With ``scaled_keys`` the gradient pass
    walks scaled keys, as off the CPU, and so keeps the keys' logits
    unwidened too.
    """
    if scaled_keys:
        monkeypatch.setattr(function, "scaled_key_copies", lambda rows: True)
    monkeypatch.setenv(ENVIRONMENT, "torch")
    exact, exact_grads = loss_and_grads(path, name, reduction, torch.float32, "cpu")
    ops, ops_grads = autocast_loss_and_grads(path, name, reduction)
    monkeypatch.setenv(ENVIRONMENT, "triton")
    value, grads = autocast_loss_and_grads(path, name, reduction)
    assert_close(value, ops, rtol=0, atol=1e-3, name=f"{name} loss")
    for got, want in zip(grads, ops_grads, strict=True):
        assert_close(got, want, rtol=0, atol=2e-2, name=f"{name} gradient")
    assert not torch.equal(value, exact)
    assert not torch.equal(grads[0], exact_grads[0])


def test_the_kernels_run_where_the_backend_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from info_nce import kernels

    calls: list[str] = []
    original = kernels.infonce_forward_

    def counted(*args: object) -> Tensor:
        calls.append("forward")
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "infonce_forward_", counted)
    query, key = torch.randn(13, 4), torch.randn(13, 4)
    for value, runs in [("triton", True), ("torch", False), ("auto", False)]:  # CPU tensors
        monkeypatch.setenv(ENVIRONMENT, value)
        calls.clear()
        info_nce(query, key, chunk_size=6)
        assert bool(calls) == runs, value
    monkeypatch.delenv(ENVIRONMENT)
    assert backend() == "auto"


def test_an_unknown_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT, "cuda")
    with pytest.raises(ValueError, match=r"INFO_NCE_BACKEND must be one of 'auto', .*got 'cuda'"):
        info_nce(torch.randn(13, 4), torch.randn(13, 4), chunk_size=6)


def test_triton_on_the_cpu_without_the_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENVIRONMENT, "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels_for(torch.zeros(1))


def test_without_triton_the_ops_run_with_one_warning() -> None:
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import torch\n"
        "from info_nce import info_nce\n"
        "q, k = torch.randn(13, 4), torch.randn(13, 4)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    a = info_nce(q, k, chunk_size=6)\n"
        "    b = info_nce(q, k, chunk_size=6)\n"
        "found = [str(w.message) for w in caught if 'Triton' in str(w.message)]\n"
        "print(len(found), found[0] if found else '')\n"
        "import os; os.environ['INFO_NCE_BACKEND'] = 'torch'\n"
        "print(torch.equal(a, info_nce(q, k, chunk_size=6)))\n"
    )
    environment = {**os.environ, ENVIRONMENT: "triton", "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    count, *message = result.stdout.splitlines()[0].split(" ", 1)
    assert count == "1", result.stdout
    assert "PyTorch ops instead of its Triton kernels" in message[0]
    assert result.stdout.splitlines()[1] == "True"
