"""The engine's autograd Functions: `LogSumExp` over the walker, and `PairedLogits`.

The Functions only save, call the walker and scale; the math lives in plain
functions (`walker`, `scales`, `columns`, the objectives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from info_nce._autograd import (
    DENSE_HINT,
    guard_backward,
    refuse_derivative,
    refuse_transforms,
    refuse_vmap,
)
from info_nce._validation import Reduction, reduce_loss
from info_nce.engine import scales as sc
from info_nce.engine import walker
from info_nce.objectives import InfoNCEObjective, RowObjective

# How the errors of `info_nce._autograd` name the Functions.
_LOGSUMEXP = "the blockwise engine (LogSumExp)"
_PAIREDLOGITS = "the blockwise engine (PairedLogits)"


@dataclass(frozen=True)
class LogSumExpOptions:
    """Settings of `LogSumExp`.

    The output is ``reduce(row_scale * row_loss + column_scale * column_term)``
    over the B rows, where ``row_loss`` is the objective's (InfoNCE: the row's
    log-sum-exp minus its target logit, if it has one) and ``column_term`` is
    key j's log-sum-exp over all rows minus, with targets, its target logit
    (column j pairs with row j, so ``column_keys`` is 0 or B).

    Attributes:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        block_rows: rows per logits block.
        tile_columns: columns per tile of long rows (None: complete rows;
            see `walker.Layout`).
        column_keys: leading keys of the first segment that get column
            statistics (0: one direction).
        row_scale: weight of the row loss (1, or 1/2 in the symmetric loss).
        column_scale: weight of the column term.
        target_offset: row i's positive is key ``target_offset + i`` of the
            first segment (None: see ``target_extra``).
        target_extra: row i's positive is its first extra column.
        exclusions: keys of the first segment that are no candidate of
            their rows (`walker.Diagonal` rules).
        exclude_target: the target is no candidate (its logit still enters
            the objective).
        exclude_labels: keys with the row's label are no candidate
            (`walker.LabelRule`).
        valid_keys: per segment, None or (N_k,) bool: False marks a key
            that is no candidate of any row.
        raised_segments: segments whose logits, the target's excepted, are
            raised by ``raise_strength * s`` (detached; ``s`` the logit
            times the temperature): hardness weighting.
        raise_strength: alpha of the hardness weighting.
        partner_segments: segments scored against the partner rows, the
            last of the Function's segment inputs (see `walker.Layout`).
        guide: guided false-negative filtering (`walker.GuideRule`).
        target_labels: row i's positives are the first segment's keys with
            its label (`walker.Layout`; the sigmoid loss).
        bias: the logits' bias when no bias tensor is given (objectives with
            a ``bias_stat``).
        bias_input: the bias is a tensor, the last of the Function's segment
            inputs (after the partner rows), and gets a gradient.
        normalize: L2-normalise the rows and the keys (by their norms, at
            least ``eps``).
        eps: smallest norm divided by, as in `F.normalize`.
        temperature: the temperature when no temperature tensor is given.
        product_dtype: the dtype of the matrix products (under autocast, its
            dtype; None: the inputs'), see `walker.Layout`.
        grads_in_forward: build the gradients during forward (scalar
            reduction, no columns, an input needs a gradient).
        objective: the loss of each row's logits.
    """

    reduction: Reduction
    block_rows: int
    tile_columns: int | None = None
    column_keys: int = 0
    row_scale: float = 1.0
    column_scale: float = 0.0
    target_offset: int | None = None
    target_extra: bool = False
    exclusions: tuple[walker.Diagonal, ...] = ()
    exclude_target: bool = False
    exclude_labels: walker.LabelRule | None = None
    normalize: bool = False
    eps: float = 1e-12
    temperature: float = 1.0
    product_dtype: torch.dtype | None = None
    grads_in_forward: bool = False
    objective: RowObjective = field(default_factory=InfoNCEObjective)
    valid_keys: tuple[Tensor | None, ...] = ()
    raised_segments: tuple[int, ...] = ()
    raise_strength: float = 0.0
    partner_segments: tuple[int, ...] = ()
    guide: walker.GuideRule | None = None
    target_labels: walker.LabelRule | None = None
    bias: float = 0.0
    bias_input: bool = False

    def parts(self) -> tuple[Any, ...]:
        """Every setting as plain values, without label or mask tensors (`from_parts` rebuilds)."""
        rule = self.exclude_labels
        return (
            self.reduction,
            self.block_rows,
            self.tile_columns,
            self.column_keys,
            self.row_scale,
            self.column_scale,
            self.target_offset,
            self.target_extra,
            tuple((d.key_offset, d.start, d.stop, d.segment, d.width) for d in self.exclusions),
            self.exclude_target,
            None if rule is None else len(rule.segments),
            self.normalize,
            self.eps,
            self.temperature,
            self.product_dtype,
            self.grads_in_forward,
            type(self.objective),
            self.objective.parts(),
            tuple(mask is not None for mask in self.valid_keys),
            self.raised_segments,
            self.raise_strength,
            self.partner_segments,
            None if self.guide is None else self.guide.structure(),
            self.target_labels is not None,
            self.bias,
            self.bias_input,
        )

    def rule_tensors(self) -> list[Tensor]:
        """The key masks that exist, the guide's tensors, the target labels (`from_parts`)."""
        masks = [mask for mask in self.valid_keys if mask is not None]
        guide = [] if self.guide is None else self.guide.tensors()
        labels = self.target_labels
        targets = (
            [] if labels is None else [labels.rows, *(x for x in labels.segments if x is not None)]
        )
        return masks + guide + targets

    @staticmethod
    def from_parts(
        parts: tuple[Any, ...],
        labels: walker.LabelRule | None,
        rule_tensors: list[Tensor] | None = None,
    ) -> LogSumExpOptions:
        """The options of `parts`, with their label rule and `rule_tensors` (None: none)."""
        (reduction, block_rows, tile_columns, column_keys, row_scale, column_scale) = parts[:6]
        (target_offset, target_extra, exclusions, exclude_target, _, normalize) = parts[6:12]
        (eps, temperature, product_dtype, grads_in_forward, objective_type, settings) = parts[12:18]
        masks_present, raised_segments, raise_strength, partner_segments, guide = parts[18:23]
        has_target_labels, bias, bias_input = parts[23:]
        valid_keys: tuple[Tensor | None, ...] = ()
        guide_rule = target_labels = None
        if rule_tensors is not None:
            tensors = list(rule_tensors)
            valid_keys = tuple(tensors.pop(0) if flag else None for flag in masks_present)
            if has_target_labels:  # the last two: the rows' labels, the keys'
                target_labels = walker.LabelRule(tensors[-2], (tensors[-1],))
                tensors = tensors[:-2]
            if guide is not None:
                guide_rule = walker.GuideRule.from_tensors(guide, tensors)
        return LogSumExpOptions(
            reduction=reduction,
            block_rows=block_rows,
            tile_columns=tile_columns,
            column_keys=column_keys,
            row_scale=row_scale,
            column_scale=column_scale,
            target_offset=target_offset,
            target_extra=target_extra,
            exclusions=tuple(walker.Diagonal(*rule) for rule in exclusions),
            exclude_target=exclude_target,
            exclude_labels=labels,
            normalize=normalize,
            eps=eps,
            temperature=temperature,
            product_dtype=product_dtype,
            grads_in_forward=grads_in_forward,
            objective=objective_type(*settings),
            valid_keys=valid_keys,
            raised_segments=raised_segments,
            raise_strength=raise_strength,
            partner_segments=partner_segments,
            guide=guide_rule,
            target_labels=target_labels,
            bias=bias,
            bias_input=bias_input,
        )

    def raise_factor(self, temperature: Tensor | None) -> Tensor | float:
        """``1 + alpha * t``: the raised logits' factor (``s / t + alpha * s``), detached."""
        if not self.raised_segments:
            return 1.0
        if temperature is None:
            return 1.0 + self.raise_strength * self.temperature
        return 1.0 + self.raise_strength * temperature.detach().reshape(())

    def layout(self, bias: Tensor | None) -> walker.Layout:
        """The walker's rules, with the bias tensor (detached) or the options' bias."""
        return walker.Layout(
            block_rows=self.block_rows,
            tile_columns=self.tile_columns,
            column_keys=self.column_keys,
            target_offset=self.target_offset,
            target_extra=self.target_extra,
            exclusions=self.exclusions,
            exclude_target=self.exclude_target,
            exclude_labels=self.exclude_labels,
            product_dtype=self.product_dtype,
            valid_keys=self.valid_keys,
            raised_segments=self.raised_segments,
            partner_segments=self.partner_segments,
            guide=self.guide,
            target_labels=self.target_labels,
            logit_bias=self.bias if bias is None else bias.detach().reshape(()),
        )


class LogSumExp(torch.autograd.Function):
    """Autograd Function: the reduced row loss (and column term) of rows against key segments.

    ``apply(rows, extra, temperature, options, needs_grad, *segments)``
    returns the loss and what backward needs (see `log_sum_exp`). Inputs are
    the raw rows and keys: normalisation and temperature are applied inside
    (see `walker`) and differentiated in place, so no scaled copy of either
    exists. ``needs_grad`` says which of ``(rows, extra, temperature,
    *segments)`` get a gradient: forward builds only those (a segment that
    needs none costs no gradient product). Forward takes no ``ctx``
    (`setup_context` saves), so the Function works under torch.func.
    """

    @staticmethod
    def forward(
        rows: Tensor,
        extra: Tensor | None,
        temperature: Tensor | None,
        options: LogSumExpOptions,
        needs_grad: tuple[bool, ...],
        *segments: Tensor,
    ) -> tuple[Tensor | None, ...]:
        return forward_outputs(rows, extra, temperature, options, needs_grad, segments)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        rows, extra, temperature, options, _, *segments = inputs
        _, *kept = output  # the saved statistics, or the gradients built in forward
        ctx.options = options
        ctx.num_rows = len(rows)
        ctx.num_kept = len(kept)
        ctx.mark_non_differentiable(*(t for t in kept if t is not None))
        ctx.set_materialize_grads(False)  # no zeros for the outputs that are no loss
        inputs = (rows, extra, temperature, *segments)
        if options.grads_in_forward:
            # Backward reads no input; those that need a gradient (alive
            # anyway) are what a gradient that must refuse a derivative hangs
            # off. Frozen keys (a queue's ring) are not kept.
            inputs = tuple(x for x in inputs if x is not None and x.requires_grad)
        ctx.save_for_backward(*kept, *inputs)

    vmap = refuse_vmap(_LOGSUMEXP, DENSE_HINT)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if grad_output is None:  # no gradient reaches the loss (the other outputs take none)
            return (None,) * (5 + len(ctx.needs_input_grad[5:]))
        refuse = guard_backward(_LOGSUMEXP, DENSE_HINT)
        saved = ctx.saved_tensors
        kept, inputs = saved[: ctx.num_kept], saved[ctx.num_kept :]
        with torch.no_grad(), _autocast_off(grad_output):
            grads = backward_grads(
                ctx.options,
                grad_output,
                kept,
                inputs,
                ctx.needs_input_grad[:3] + ctx.needs_input_grad[5:],
                ctx.num_rows,
            )
        grad_rows, grad_extra, grad_temperature, *grad_segments = grads
        grads = (grad_rows, grad_extra, grad_temperature, None, None, *grad_segments)
        return refuse_derivative(_LOGSUMEXP, grads, saved, DENSE_HINT) if refuse else grads


def forward_outputs(
    rows: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    options: LogSumExpOptions,
    needs_grad: tuple[bool, ...],
    segments: tuple[Tensor, ...],
) -> tuple[Tensor | None, ...]:
    """`LogSumExp`'s forward: the loss, then what backward needs.

    With ``options.grads_in_forward``: ``(loss, grad_rows, grad_extra,
    grad_temperature, *grad_segments)``, the gradients of the unscaled loss
    (None where not needed); otherwise ``(loss, row_stat, column_lse)``.
    ``needs_grad`` says which of ``(rows, extra, temperature, *segments)``
    need a gradient.
    """
    walk = _WalkInputs.of(segments, options, needs_grad)
    segments, partner, bias = walk.keys, walk.partner, walk.bias
    row_grads = needs_grad[0] or needs_grad[2]  # the temperature's comes from the rows'
    partner_grads = partner is not None and (walk.partner_grad or needs_grad[2])
    factors = _factors(rows, segments, temperature, options)
    partner_factors = None if partner is None else _factors(partner, (), temperature, options)
    # A scaled copy of the keys saves two passes over every logits block.
    # It never sets the peak in the one-pass walk: backward holds the saved
    # gradients and their rescaled copies, (B + N) * D twice.
    scaled_copy = (
        options.normalize
        and not options.tile_columns
        and (options.grads_in_forward or scaled_key_copies(rows))
    )
    walked, column_scales = _walked_keys(segments, factors, scaled_copy)
    result = walker.statistics_pass(
        rows,
        walked,
        extra,
        options.objective,
        options.layout(bias),
        row_scales=factors.rows,
        column_scales=column_scales,
        compute_grads=options.grads_in_forward,
        segment_grads=walk.key_grads,
        row_grads=row_grads,
        raise_factor=options.raise_factor(temperature),
        partner=partner,
        partner_scales=None if partner_factors is None else partner_factors.rows,
        partner_grads=partner_grads,
    )
    assert result.row_loss is not None
    output = options.row_scale * result.row_loss  # (B,)
    if result.column_lse is not None:
        column_term = result.column_lse
        if result.target_logit is not None:
            column_term = column_term - result.target_logit
        output = output + options.column_scale * column_term
    loss = reduce_loss(output, options.reduction)
    if not options.grads_in_forward:
        return loss, result.row_stat, result.column_lse
    if scaled_copy:
        _unscaled_grads_(result, factors)
    grad_temperature = _input_grads(rows, segments, result, factors, options, needs_grad[2])
    grad_partner, grad_temperature = _partner_grads(
        walk, result, partner_factors, options, needs_grad[2], grad_temperature
    )
    grad_segments = result.grad_segments + ([] if partner is None else [grad_partner])
    if bias is not None:
        grad_segments.append(_bias_grad(result.row_stat, options, None) if walk.bias_grad else None)
    return loss, result.grad_rows, result.grad_extra, grad_temperature, *grad_segments


def backward_grads(
    options: LogSumExpOptions,
    grad_output: Tensor,
    kept: tuple[Tensor | None, ...],
    inputs: tuple[Tensor | None, ...],
    needs_grad: tuple[bool, ...],
    num_rows: int,
) -> tuple[Tensor | None, ...]:
    """`LogSumExp`'s backward: ``(grad_rows, grad_extra, grad_temperature, *grad_segments)``.

    ``kept`` is what `forward_outputs` returned after the loss; ``inputs``
    are ``(rows, extra, temperature, *segments)`` (only read without
    ``grads_in_forward``); ``needs_grad`` as in `forward_outputs`. Grad mode off.
    """
    if options.grads_in_forward:
        scale = _scalar_scale(grad_output, options, num_rows)
        return tuple(None if grad is None else grad * scale for grad in kept)
    row_stat, column_lse = kept
    rows, extra, temperature, *segment_list = inputs
    walk = _WalkInputs.of(cast(tuple[Tensor, ...], tuple(segment_list)), options, needs_grad)
    segments, partner, bias = walk.keys, walk.partner, walk.bias
    assert row_stat is not None
    assert rows is not None
    row_weight: Tensor | None = None
    column_weight: Tensor | float
    if options.reduction == "none":
        row_weight = options.row_scale * grad_output  # (B,)
        column_weight = options.column_scale * grad_output  # (B,): column j pairs with row j
    else:
        # Every row weighs alike: weigh the columns relative to the rows and
        # scale the gradients once instead of every (R, N) block.
        column_weight = options.column_scale / options.row_scale
    factors = _factors(rows, segments, temperature, options)
    partner_factors = None if partner is None else _factors(partner, (), temperature, options)
    scaled_copy = options.normalize and not options.tile_columns and scaled_key_copies(rows)
    walked, column_scales = _walked_keys(segments, factors, scaled_copy)
    result = walker.gradient_pass(
        rows,
        walked,
        extra,
        options.objective,
        options.layout(bias),
        walker.BlockPass(row_stat=row_stat, column_lse=column_lse),
        row_scales=factors.rows,
        column_scales=column_scales,
        row_weight=row_weight,
        column_weight=column_weight,
        segment_grads=walk.key_grads,
        row_grads=needs_grad[0] or needs_grad[2],
        raise_factor=options.raise_factor(temperature),
        partner=partner,
        partner_scales=None if partner_factors is None else partner_factors.rows,
        partner_grads=partner is not None and (walk.partner_grad or needs_grad[2]),
    )
    if scaled_copy:
        _unscaled_grads_(result, factors)
    grad_temperature = _input_grads(rows, segments, result, factors, options, needs_grad[2])
    grad_partner, grad_temperature = _partner_grads(
        walk, result, partner_factors, options, needs_grad[2], grad_temperature
    )
    grad_segments = result.grad_segments + ([] if partner is None else [grad_partner])
    if bias is not None:
        grad_bias = _bias_grad(row_stat, options, row_weight) if walk.bias_grad else None
        grad_segments.append(None if grad_bias is None else grad_bias.reshape(bias.shape))
    grads = (result.grad_rows, result.grad_extra, grad_temperature, *grad_segments)
    if row_weight is None:
        scale = _scalar_scale(grad_output, options, len(rows))
        grads = tuple(None if grad is None else grad.mul_(scale) for grad in grads)
    grad_rows, grad_extra, grad_temperature, *grad_segments = grads
    if grad_temperature is not None and temperature is not None:
        grad_temperature = grad_temperature.reshape(temperature.shape)
    return grad_rows, grad_extra, grad_temperature, *grad_segments


@dataclass(frozen=True)
class _WalkInputs:
    """The Function's segment inputs by kind, and which of them need a gradient.

    They are the key segments, then the partner rows (``partner_segments``),
    then the bias (``bias_input``).
    """

    keys: tuple[Tensor, ...]
    partner: Tensor | None
    bias: Tensor | None
    key_grads: tuple[bool, ...]
    partner_grad: bool
    bias_grad: bool

    @staticmethod
    def of(
        segments: tuple[Tensor, ...], options: LogSumExpOptions, needs_grad: tuple[bool, ...]
    ) -> _WalkInputs:
        """Split ``segments``; ``needs_grad`` as ``(rows, extra, temperature, *segments)``."""
        flags = needs_grad[3:]
        count = len(segments) - bool(options.partner_segments) - options.bias_input
        partner = segments[count] if options.partner_segments else None
        partner_grad = bool(options.partner_segments) and flags[count]
        bias = segments[-1] if options.bias_input else None
        bias_grad = options.bias_input and flags[-1]
        return _WalkInputs(
            segments[:count], partner, bias, tuple(flags[:count]), partner_grad, bias_grad
        )


def _bias_grad(row_stat: Tensor, options: LogSumExpOptions, row_weight: Tensor | None) -> Tensor:
    """The bias's gradient: the rows' ``d loss / d bias`` (a statistic), weighted and summed.

    Without ``row_weight`` (a scalar reduction) the gradient of the unscaled
    row losses' sum, which backward scales as it does every gradient.
    """
    index = options.objective.bias_stat
    assert index is not None, "a bias needs an objective that has one"
    per_row = row_stat[:, index]  # (B,)
    return per_row.sum() if row_weight is None else torch.dot(per_row, row_weight)


def _partner_grads(
    walk: _WalkInputs,
    result: walker.BlockPass,
    factors: sc.Scales | None,
    options: LogSumExpOptions,
    temperature_grad: bool,
    grad_temperature: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """The partner rows' gradient (None unless asked for) and the temperature's, both rows' share.

    As `_input_grads` does for the rows, in place.
    """
    if walk.partner is None or result.grad_partner is None:
        return None, grad_temperature
    assert factors is not None
    share = sc.input_grads_(
        walk.partner,
        (),
        result.grad_partner,
        [],
        factors,
        eps=options.eps,
        temperature_grad=temperature_grad,
    )
    if share is not None:
        grad_temperature = share if grad_temperature is None else grad_temperature + share
    return (result.grad_partner if walk.partner_grad else None), grad_temperature


def scaled_key_copies(rows: Tensor) -> bool:
    """Whether every pass walks scaled copies of normalised keys: off the CPU.

    The one-pass walk always does. The copy, (N, D) per segment, saves the
    passes of the column scales over every logits block (before and after
    each block's gradient). On an accelerator those passes cost more than
    the copy's memory; on the CPU the gradient pass sets the step's peak
    memory, which the copy would raise.
    """
    return rows.device.type != "cpu"


def _walked_keys(
    segments: tuple[Tensor, ...], factors: sc.Scales, scaled: bool
) -> tuple[tuple[Tensor, ...], list[Tensor | None]]:
    """The keys a pass walks and their column scales: with ``scaled``, copies times the scales."""
    if not scaled:
        return segments, factors.columns
    walked = tuple(
        keys if s is None else keys * s.unsqueeze(1)
        for keys, s in zip(segments, factors.columns, strict=True)
    )
    return walked, [None] * len(segments)


def _unscaled_grads_(result: walker.BlockPass, factors: sc.Scales) -> None:
    """In place: the scaled copies' gradients (`_walked_keys`), to the keys' at fixed scales."""
    for grad, s in zip(result.grad_segments, factors.columns, strict=True):
        if grad is not None and s is not None:
            grad.mul_(s.unsqueeze(1))


def _factors(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    temperature: Tensor | None,
    options: LogSumExpOptions,
) -> sc.Scales:
    """The row and column factors, with the temperature tensor or the options' one."""
    t = options.temperature if temperature is None else temperature
    return sc.scales(rows, segments, t, normalize=options.normalize, eps=options.eps)


def _input_grads(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    result: walker.BlockPass,
    factors: sc.Scales,
    options: LogSumExpOptions,
    temperature_grad: bool,
) -> Tensor | None:
    """The rows' and segments' gradients through their scales, in place; the temperature's."""
    if result.grad_rows is None:  # no rows' gradient asked for, or the rows are in no logit
        temperature_grad = False
    return sc.input_grads_(
        rows,
        segments,
        result.grad_rows,
        result.grad_segments,
        factors,
        eps=options.eps,
        temperature_grad=temperature_grad,
    )


def _scalar_scale(grad_output: Tensor, options: LogSumExpOptions, num_rows: int) -> Tensor:
    """The weight of every row's loss under a scalar reduction."""
    scale = grad_output * options.row_scale
    # max(1, ...): a rank with no rows (an empty share of a gathered batch) has zero gradients.
    return scale / max(1, num_rows) if options.reduction == "mean" else scale


def input_grads_needed(
    rows: Tensor, extra: Tensor | None, temperature: Tensor | None, segments: tuple[Tensor, ...]
) -> tuple[bool, ...]:
    """Which of ``(rows, extra, temperature, *segments)`` get a gradient (none in no-grad mode)."""
    grad_mode = torch.is_grad_enabled()
    inputs = (rows, extra, temperature, *segments)
    return tuple(grad_mode and x is not None and x.requires_grad for x in inputs)


def log_sum_exp(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    extra: Tensor | None,
    temperature: Tensor | None,
    options: LogSumExpOptions,
) -> Tensor:
    """The reduced loss of `LogSumExpOptions` through `LogSumExp`.

    Same as, with ``x = unit(rows) / t``, ``y = unit(cat(segments))`` (no
    ``unit`` without ``normalize``; ``t`` the temperature tensor, or the
    options' one), ``logits = cat([extra, x @ y.T], 1)`` (B, E + N) with the
    excluded entries at -inf, and ``target_i`` each row's target logit (or 0):
    ``row_scale * (logits.logsumexp(1) - target) + column_scale *
    (logits[:, E:E + C].logsumexp(0) - target)``, reduced, without the logits
    matrix or the normalised copies.
    """
    refuse_transforms(_LOGSUMEXP, DENSE_HINT)
    needs_grad = input_grads_needed(rows, extra, temperature, segments)
    # Without any gradient the Function's bookkeeping is moot: its forward alone.
    function = LogSumExp.apply if any(needs_grad) else LogSumExp.forward
    with _autocast_off(rows):  # the products' dtype is the options' (autocast's, if it was on)
        outputs = function(rows, extra, temperature, options, needs_grad, *segments)
    return cast(Tensor, outputs[0])


def product_dtype(like: Tensor) -> torch.dtype | None:
    """The similarity products' dtype for inputs like ``like`` (before any float32 upcast).

    The library's precision policy: the similarity products (logits, and
    the products of d loss / d logits with rows and keys) run in this dtype;
    the statistics, the loss and gradient accumulation in float32 (None:
    the products in the rows' dtype too).

    * Under autocast: autocast's dtype on ``like``'s device, for float32,
      float16 and bfloat16 inputs (float64 is never autocast).
    * Outside it, float16 and bfloat16 inputs on an accelerator keep their
      dtype for the products (tensor cores, float32 accumulation). On the
      CPU, whose 16-bit products are no faster, they run in float32.
    """
    device = like.device.type
    half = like.dtype in (torch.float16, torch.bfloat16)
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device) if half or like.dtype == torch.float32 else None
    return like.dtype if half and device != "cpu" else None


def _autocast_off(like: Tensor) -> torch.autocast:
    """Autocast off on ``like``'s device: the Functions round to their product dtype themselves."""
    return torch.autocast(like.device.type, enabled=False)


@dataclass(frozen=True)
class PairedOptions:
    """Settings of `PairedLogits`.

    Attributes:
        normalize_negatives: divide each negative's logit by its norm (the
            negatives arrive unnormalised).
        eps: smallest norm divided by, as in `F.normalize`.
        product_dtype: the dtype of the (batched) products (autocast's;
            None: the inputs'); norms and logits stay in the inputs' dtype.
    """

    normalize_negatives: bool
    eps: float
    product_dtype: torch.dtype | None = None


class PairedLogits(torch.autograd.Function):
    """Autograd Function: logits (B, M) of each query against its own negatives (B, M, D).

    ``query[i] . negative_keys[i, j] / max(|negative_keys[i, j]|, eps)`` (no
    division without normalisation), with no (B, M, D) temporary in forward.
    """

    @staticmethod
    def forward(query: Tensor, negative_keys: Tensor, options: PairedOptions) -> tuple[Tensor, ...]:
        dtype = options.product_dtype or query.dtype
        # (B, M) dot products
        logits = torch.bmm(negative_keys.to(dtype), query.unsqueeze(2).to(dtype)).squeeze(2)
        logits = logits.to(query.dtype)
        if not options.normalize_negatives:
            return (logits,)
        norms = torch.linalg.vector_norm(negative_keys, dim=2)  # (B, M)
        logits.div_(norms.clamp_min(options.eps))
        return logits, norms

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        query, negative_keys, options = inputs
        logits, *norms = output
        ctx.options = options
        ctx.mark_non_differentiable(*norms)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, negative_keys, logits, *norms)

    vmap = refuse_vmap(_PAIREDLOGITS, DENSE_HINT)

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if grad_logits is None:  # no gradient reaches the logits (the norms take none)
            return None, None, None
        refuse = guard_backward(_PAIREDLOGITS, DENSE_HINT)
        saved = ctx.saved_tensors
        with torch.no_grad(), _autocast_off(grad_logits):
            grads = PairedLogits.gradients(ctx, grad_logits, saved)
        return refuse_derivative(_PAIREDLOGITS, grads, saved, DENSE_HINT) if refuse else grads

    @staticmethod
    def gradients(
        ctx: Any, grad_logits: Tensor, saved: tuple[Tensor, ...]
    ) -> tuple[Tensor | None, ...]:
        """Backward's gradients (grad mode off)."""
        options: PairedOptions = ctx.options
        query, negatives, logits, *saved_norms = saved
        norms = saved_norms[0] if saved_norms else None
        grad_dots = grad_logits  # (B, M) gradient of the raw dot products
        if norms is not None:
            inverse_norms = norms.clamp_min(options.eps).reciprocal()  # (B, M)
            grad_dots = grad_logits * inverse_norms
        needs_query, needs_negatives, _ = ctx.needs_input_grad
        grad_query = grad_negatives = None
        if needs_query:
            dtype = options.product_dtype or query.dtype
            grad_query = torch.bmm(grad_dots.unsqueeze(1).to(dtype), negatives.to(dtype))
            grad_query = grad_query.squeeze(1).to(query.dtype)  # (B, D)
        if needs_negatives:
            if norms is not None:
                # d(x / |x|) / dx = (I - x x^T / |x|^2) / |x|; no radial term where |x| < eps.
                radial = -(grad_dots * logits * inverse_norms) * (norms > options.eps)  # (B, M)
                grad_negatives = negatives * radial.unsqueeze(2)  # (B, M, D)
            else:
                grad_negatives = torch.zeros_like(negatives)
            grad_negatives.baddbmm_(grad_dots.unsqueeze(2), query.unsqueeze(1))
        return grad_query, grad_negatives, None


def paired_logits(query: Tensor, negative_keys: Tensor, options: PairedOptions) -> Tensor:
    """(B, M) logits of each query against its own negatives through `PairedLogits`."""
    refuse_transforms(_PAIREDLOGITS, DENSE_HINT)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or negative_keys.requires_grad)
    function = PairedLogits.apply if needs_grad else PairedLogits.forward  # as in `log_sum_exp`
    with _autocast_off(query):  # the products' dtype is the options' (autocast's, if it was on)
        outputs = function(query, negative_keys, options)
    return cast(Tensor, outputs[0])
