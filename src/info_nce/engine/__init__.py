"""The exact blockwise engine: the loss without any (B, N) logits matrix.

`run` takes a `Problem` (built by `info_nce._problem`, the only reader of the
losses' flags) and walks each of its walks through the `LogSumExp` Function
(`function`; compiled, through the custom ops of `op`), whose forward and
backward are the block walker's two passes (`walker`); the loss of each row
of a block is
the objective's (`info_nce.objectives`). Normalisation and temperature are
row and column factors (`scales`); the symmetric loss's column statistics are
in `columns`. Positives that are not a target column are class sums, O((B +
classes) * D) autograd ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from info_nce._autograd import plain_values
from info_nce._validation import Reduction, reduce_loss
from info_nce.engine.function import (
    LogSumExpOptions,
    input_grads_needed,
    product_dtype,
)
from info_nce.engine.op import log_sum_exp
from info_nce.engine.walker import Diagonal, GuideRule, LabelRule, default_block_shape
from info_nce.objectives import InfoNCEObjective, RowObjective, mean_positive_logit

__all__ = [
    "Diagonal",
    "GuideRule",
    "LabelRule",
    "Positives",
    "Problem",
    "Walk",
    "overwritten_after",
    "product_dtype",
    "run",
]

# Storage that the caller overwrites in place after the loss, before its
# backward (a queue's ring, pushed to after scoring): see `overwritten_after`.
# A plain list, which torch.compile traces (a ContextVar it does not); shared
# by threads, where an entry of another thread's can cost a needless copy of
# keys on the same storage, never a missed one.
_OVERWRITTEN: list[Tensor] = []


@contextmanager
def overwritten_after(*storage: Tensor) -> Iterator[None]:
    """Within: keys that view ``storage`` are copied where backward would read them.

    A walk that builds its gradients in forward keeps no key; one that
    recomputes them in backward (``reduction='none'``, the symmetric loss,
    two-pass tiles) keeps its keys, and a key segment on storage that the
    caller overwrites before backward is then kept as a copy (frozen keys
    only). So the loss modules read their queue in place and push to it
    after the loss.
    """
    _OVERWRITTEN.extend(storage)
    try:
        yield
    finally:
        for entry in storage:  # by identity (list.remove would compare tensors)
            del _OVERWRITTEN[next(i for i, x in enumerate(_OVERWRITTEN) if x is entry)]


def _kept_copy(keys: Tensor) -> Tensor:
    """``keys`` (or labels), or a copy if they view storage in `overwritten_after`."""
    storage = _OVERWRITTEN
    if not storage or keys.requires_grad:  # keys with gradient are no ring
        return keys
    pointer = plain_values(keys).untyped_storage().data_ptr()  # inside torch.func: its values
    overwritten = any(s.untyped_storage().data_ptr() == pointer for s in storage)
    return keys.clone() if overwritten else keys


@dataclass(frozen=True)
class Walk:
    """One engine pass: rows against key segments, and how its columns relate to its rows.

    The walk's loss is ``row_scale * row_loss + column_scale * column_term``
    per row (see `info_nce.engine.function.LogSumExpOptions`).
    """

    rows: Tensor  # (R, D) raw
    segments: tuple[Tensor, ...]  # (N_k, D) raw, shared by all rows
    extra: tuple[Tensor, ...] = ()  # (R, E_k) logits of per-row candidates, first in each row
    target_offset: int | None = None  # row i's target: key offset + i of segments[0]
    target_extra: bool = False  # row i's target: its first extra column
    exclusions: tuple[Diagonal, ...] = ()  # keys that are no candidate of their rows
    exclude_target: bool = False  # the target is no candidate (the decoupled and debiased losses)
    exclude_labels: LabelRule | None = None  # keys with the row's label: no candidate
    valid_keys: tuple[Tensor | None, ...] = ()  # per segment: (N_k,) bool, False: no candidate
    # Hardness weighting: these segments' logits (the target's excepted) get
    # raise_strength * s (detached) added, s being the logit times the temperature.
    raised_segments: tuple[int, ...] = ()
    raise_strength: float = 0.0
    # A second row set, row i's partner (query i's positive key), and the
    # segments scored against it: with them a row is pair i's row in several
    # directions, one softmax (the joint partition).
    partner_rows: Tensor | None = None  # (R, D) raw
    partner_segments: tuple[int, ...] = ()
    guide: GuideRule | None = None  # guided false-negative filtering
    # Row i's targets by label: the keys of segments[0] whose label is its
    # own (the sigmoid loss; labels: LabelRule(rows, (keys,))).
    target_labels: LabelRule | None = None
    # Added to every logit by an objective with a bias (the sigmoid loss);
    # a one-element tensor gets a gradient.
    logit_bias: float | Tensor = 0.0
    column_keys: int = 0  # leading keys of segments[0] scored against all rows (symmetric)
    row_scale: float = 1.0
    column_scale: float = 0.0
    objective: RowObjective = field(default_factory=InfoNCEObjective)  # each row's loss


@dataclass(frozen=True)
class Positives:
    """A term subtracted from the loss: ``weight * rows_i . mean(keys with i's label) / t``."""

    rows: Tensor  # (R, D) normalised as in the logits
    keys: tuple[Tensor, ...]  # (N_k, D) key sets, normalised as in the logits
    labels: tuple[Tensor, ...]  # (N_k,) their labels
    offset: int  # row i is key offset + i of the first set
    exclude_self: bool  # row i is not its own positive
    weight: float
    # (R,) each row's number of candidates, for the decoupled loss: a row whose
    # candidates are all positives has no negative, and its term is 0.
    candidates: Tensor | None = None


@dataclass(frozen=True)
class Problem:
    """Everything the engine needs; the loss is the walks' sum minus the positives' terms."""

    walks: tuple[Walk, ...]
    positives: tuple[Positives, ...]
    temperature: float | Tensor
    reduction: Reduction
    normalize: bool
    eps: float
    chunk_size: int | None
    # The similarity products' dtype (`product_dtype` of the caller's inputs,
    # before their float32 upcast; None: the rows').
    product_dtype: torch.dtype | None = None


def run(problem: Problem) -> Tensor:
    """The problem's loss: its walks' terms minus its positives' terms."""
    loss: Tensor | None = None
    for walk in problem.walks:
        term = _walk_loss(walk, problem)
        loss = term if loss is None else loss + term
    for positives in problem.positives:
        logit = mean_positive_logit(
            positives.rows,
            positives.keys,
            positives.labels,
            positives.offset,
            problem.temperature,
            exclude_self=positives.exclude_self,
            candidates=positives.candidates,
        )
        assert loss is not None
        loss = loss - reduce_loss(positives.weight * logit, problem.reduction)
    assert loss is not None
    return loss


def _walk_loss(walk: Walk, problem: Problem) -> Tensor:
    extra = None
    if walk.extra:
        extra = walk.extra[0] if len(walk.extra) == 1 else torch.cat(walk.extra, dim=1)
    temperature = problem.temperature
    # The rows enter no logit of a walk without segments (paired negatives
    # only): no factors to apply then.
    has_keys = bool(walk.segments)
    tensor_temperature = temperature if isinstance(temperature, Tensor) and has_keys else None
    # The Function's segment inputs: the keys, then the partner rows and the bias, if any.
    inputs = walk.segments if walk.partner_rows is None else (*walk.segments, walk.partner_rows)
    bias = walk.logit_bias
    if isinstance(bias, Tensor):
        inputs = (*inputs, bias)
    needs_grad = any(input_grads_needed(walk.rows, extra, tensor_temperature, inputs))
    candidates = sum(len(keys) for keys in walk.segments) + (0 if extra is None else extra.shape[1])
    tileable = walk.objective.tileable and not walk.column_keys and walk.partner_rows is None
    frozen_keys = walk.target_offset is None and not any(k.requires_grad for k in walk.segments)
    block_rows, tile_columns = default_block_shape(
        len(walk.rows),
        candidates,
        tileable=tileable,
        frozen_keys=frozen_keys,
        device=walk.rows.device,
        scale=walk.objective.block_scale,
    )
    if problem.chunk_size is not None:  # the caller's rows per block, complete rows
        block_rows, tile_columns = problem.chunk_size, None
    options = LogSumExpOptions(
        reduction=problem.reduction,
        block_rows=block_rows,
        tile_columns=tile_columns,
        column_keys=walk.column_keys,
        row_scale=walk.row_scale,
        column_scale=walk.column_scale,
        target_offset=walk.target_offset,
        target_extra=walk.target_extra,
        exclusions=walk.exclusions,
        exclude_target=walk.exclude_target,
        exclude_labels=walk.exclude_labels,
        valid_keys=walk.valid_keys,
        raised_segments=walk.raised_segments,
        raise_strength=walk.raise_strength,
        partner_segments=walk.partner_segments,
        guide=walk.guide,
        target_labels=walk.target_labels,
        bias=0.0 if isinstance(bias, Tensor) else bias,
        bias_input=isinstance(bias, Tensor),
        normalize=problem.normalize and has_keys,
        eps=problem.eps,
        temperature=1.0 if isinstance(temperature, Tensor) or not has_keys else temperature,
        product_dtype=problem.product_dtype,
        grads_in_forward=(
            needs_grad
            and problem.reduction != "none"
            and not walk.column_keys
            # Tiles build gradients in forward only for keys without gradient
            # (a queue): a key's gradient needs its rows' final statistics.
            and (tile_columns is None or frozen_keys)
        ),
        objective=walk.objective,
    )
    if needs_grad and not options.grads_in_forward:  # backward reads the keys and labels
        inputs = tuple(_kept_copy(keys) for keys in inputs)
        rule = options.exclude_labels
        if rule is not None:
            labels = tuple(None if x is None else _kept_copy(x) for x in rule.segments)
            options = replace(options, exclude_labels=LabelRule(rule.rows, labels))
    return log_sum_exp(walk.rows, inputs, extra, tensor_temperature, options)
