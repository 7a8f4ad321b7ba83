"""The engine as torch.library custom ops, for torch.compile.

Traced by Dynamo, the walker's Python loops would unroll into a graph that
grows with the number of blocks (compile time in minutes for large batches)
and its in-place ``out=`` products would be rewritten into copies (a
compiled step measured 1.6x the eager one). As custom ops the engine is one
opaque node of the compiled graph: ``info_nce::log_sum_exp`` (forward:
the loss and what backward needs) and ``info_nce::log_sum_exp_backward``
(the gradient pass), each running today's walker, with fake (meta)
implementations for their output shapes and the autograd formula linking
them. A GPU kernel can later register as these ops' CUDA implementation.

Eagerly the engine runs as the `LogSumExp` autograd Function (which
torch.func understands); both call the same `forward_outputs` and
`backward_grads`.

An op takes only tensors, lists and plain values, so the options (a frozen
dataclass) travel as a string key into `_OPTIONS`: equal options give the
same key, so steps reuse one compiled graph. The label tensors of a
`walker.LabelRule`, the key masks and the guide's travel as op inputs.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from info_nce.engine import function as fn
from info_nce.engine import walker
from info_nce.engine.function import LogSumExpOptions

# Options by key: their `LogSumExpOptions.parts`, keyed by its repr.
_OPTIONS: dict[str, tuple[Any, ...]] = {}


@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def _key(parts: tuple[Any, ...]) -> str:
    """The key of the options with these `LogSumExpOptions.parts` (registered)."""
    key = repr(parts)
    if key not in _OPTIONS:
        _OPTIONS[key] = parts
    return key


def _options(
    key: str,
    label_rows: Tensor | None,
    label_segments: list[Tensor | None],
    rule_tensors: list[Tensor],
) -> LogSumExpOptions:
    """The options of ``key`` (a fresh objective: no state across calls), with their tensors.

    ``rule_tensors`` are `LogSumExpOptions.rule_tensors`: key masks, guide.
    """
    rule = None if label_rows is None else walker.LabelRule(label_rows, tuple(label_segments))
    return LogSumExpOptions.from_parts(_OPTIONS[key], rule, rule_tensors)


def _present(x: Tensor | None, like: Tensor) -> Tensor:
    """An op returns tensors only: an empty one stands for None."""
    return like.new_empty(0) if x is None else x


def _unaliased(outputs: list[Tensor]) -> list[Tensor]:
    """A copy of each output that shares memory with an earlier one (an op's may not).

    The rows' and the keys' gradients are one allocation.
    """
    seen: set[int] = set()
    result = []
    for x in outputs:
        pointer = x.untyped_storage().data_ptr()
        if x.numel() and pointer in seen:
            x = x.clone()
        seen.add(pointer)
        result.append(x)
    return result


def _absent(x: Tensor) -> Tensor | None:
    """None for the empty stand-in of `_present` (a real output is never 1-D and empty)."""
    return None if x.numel() == 0 and x.dim() == 1 else x


def _forward_layout(
    rows: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    segments: list[Tensor],
    options: LogSumExpOptions,
    needs_grad: list[bool],
) -> list[Tensor]:
    """Empty tensors shaped like `forward_outputs`'s outputs (the fake implementation)."""
    loss = rows.new_empty(() if options.reduction != "none" else (len(rows),))
    if not options.grads_in_forward:
        row_stat = rows.new_empty(len(rows), options.objective.num_stats)
        columns = rows.new_empty(options.column_keys) if options.column_keys else rows.new_empty(0)
        return [loss, row_stat, columns]
    return [loss, *_gradient_layout(rows, extra, temperature, segments, needs_grad)]


def _gradient_layout(
    rows: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    segments: list[Tensor],
    needs_grad: list[bool],
) -> list[Tensor]:
    """Empty tensors shaped like the gradients (empty where None)."""
    row_grads = (needs_grad[0] or needs_grad[2]) and bool(segments)
    grad_rows = torch.empty_like(rows) if row_grads else rows.new_empty(0)
    grad_extra = rows.new_empty(0) if extra is None else torch.empty_like(extra)
    grad_temperature = rows.new_empty(0)
    if needs_grad[2] and row_grads and temperature is not None:
        grad_temperature = torch.empty_like(temperature)
    grad_segments = [
        torch.empty_like(keys) if flag else rows.new_empty(0)
        for keys, flag in zip(segments, needs_grad[3:], strict=True)
    ]
    return [grad_rows, grad_extra, grad_temperature, *grad_segments]


@torch.library.custom_op("info_nce::log_sum_exp", mutates_args=())
def log_sum_exp_op(
    rows: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    segments: list[Tensor],
    label_rows: Tensor | None,
    label_segments: list[Tensor | None],
    rule_tensors: list[Tensor],
    options: str,
    needs_grad: list[bool],
) -> list[Tensor]:
    """`fn.forward_outputs` as an op: the loss, then the kept tensors (empty for None)."""
    resolved = _options(options, label_rows, label_segments, rule_tensors)
    with torch.no_grad(), torch.autocast(rows.device.type, enabled=False):
        outputs = fn.forward_outputs(
            rows, extra, temperature, resolved, tuple(needs_grad), tuple(segments)
        )
    return _unaliased([_present(x, rows) for x in outputs])


@log_sum_exp_op.register_fake
def _(
    rows: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    segments: list[Tensor],
    label_rows: Tensor | None,
    label_segments: list[Tensor | None],
    rule_tensors: list[Tensor],
    options: str,
    needs_grad: list[bool],
) -> list[Tensor]:
    resolved = _options(options, label_rows, label_segments, rule_tensors)
    return _forward_layout(rows, extra, temperature, segments, resolved, needs_grad)


@torch.library.custom_op("info_nce::log_sum_exp_backward", mutates_args=())
def log_sum_exp_backward_op(
    grad_output: Tensor,
    rows: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    segments: list[Tensor],
    label_rows: Tensor | None,
    label_segments: list[Tensor | None],
    rule_tensors: list[Tensor],
    row_stat: Tensor,
    column_lse: Tensor,
    options: str,
    needs_grad: list[bool],
) -> list[Tensor]:
    """`fn.backward_grads` (the gradient pass) as an op: the gradients, empty for None."""
    resolved = _options(options, label_rows, label_segments, rule_tensors)
    kept = (row_stat, _absent(column_lse))
    inputs = (rows, extra, temperature, *segments)
    with torch.no_grad(), torch.autocast(rows.device.type, enabled=False):
        grads = fn.backward_grads(resolved, grad_output, kept, inputs, tuple(needs_grad), len(rows))
    return _unaliased([_present(g, rows) for g in grads])


@log_sum_exp_backward_op.register_fake
def _(
    grad_output: Tensor,
    rows: Tensor,
    extra: Tensor | None,
    temperature: Tensor | None,
    segments: list[Tensor],
    label_rows: Tensor | None,
    label_segments: list[Tensor | None],
    rule_tensors: list[Tensor],
    row_stat: Tensor,
    column_lse: Tensor,
    options: str,
    needs_grad: list[bool],
) -> list[Tensor]:
    return _gradient_layout(rows, extra, temperature, segments, needs_grad)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    rows, extra, temperature, segments, label_rows, label_segments, rules, key, needs_grad = inputs
    ctx.key, ctx.needs_grad, ctx.num_rows = key, needs_grad, len(rows)
    ctx.num_segments = len(segments)
    ctx.num_labels = len(label_segments)
    ctx.has = (extra is not None, temperature is not None, label_rows is not None)
    labels = [x for x in (label_rows, *label_segments) if x is not None]
    ctx.label_present = [x is not None for x in label_segments]
    ctx.num_rule_tensors = len(rules)
    inputs_kept = [x for x in (rows, extra, temperature) if x is not None]
    ctx.save_for_backward(*output[1:], *inputs_kept, *segments, *labels, *rules)


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    grad_output = grads[0]
    options = LogSumExpOptions.from_parts(_OPTIONS[ctx.key], None)  # its tensors: saved
    saved = list(ctx.saved_tensors)
    num_kept = 3 + ctx.num_segments if options.grads_in_forward else 2
    kept, rest = saved[:num_kept], saved[num_kept:]
    has_extra, has_temperature, has_labels = ctx.has
    rows = rest.pop(0)
    extra = rest.pop(0) if has_extra else None
    temperature = rest.pop(0) if has_temperature else None
    segments, rest = rest[: ctx.num_segments], rest[ctx.num_segments :]
    label_rows = rest.pop(0) if has_labels else None
    label_segments = [rest.pop(0) if flag else None for flag in ctx.label_present]
    rule_tensors = rest[: ctx.num_rule_tensors]
    # labels, rule tensors, options, needs_grad
    nones = (None, [None] * ctx.num_labels, [None] * ctx.num_rule_tensors, None, None)
    if grad_output is None:
        return None, None, None, [None] * ctx.num_segments, *nones
    if options.grads_in_forward:  # the gradients are built: scale them (traced ops)
        found = fn.backward_grads(
            options, grad_output, tuple(_absent(k) for k in kept), (), (), ctx.num_rows
        )
    else:
        computed = log_sum_exp_backward_op(
            grad_output,
            rows,
            extra,
            temperature,
            segments,
            label_rows,
            label_segments,
            rule_tensors,
            kept[0],
            kept[1],
            ctx.key,
            ctx.needs_grad,
        )
        found = tuple(_absent(g) for g in computed)
    grad_rows, grad_extra, grad_temperature, *grad_segments = found
    return grad_rows, grad_extra, grad_temperature, list(grad_segments), *nones


log_sum_exp_op.register_autograd(_backward, setup_context=_setup_context)


def log_sum_exp(
    rows: Tensor,
    segments: tuple[Tensor, ...],
    extra: Tensor | None,
    temperature: Tensor | None,
    options: LogSumExpOptions,
) -> Tensor:
    """`fn.log_sum_exp`: eagerly the `LogSumExp` Function, compiled the custom op."""
    if not torch.compiler.is_compiling():
        return fn.log_sum_exp(rows, segments, extra, temperature, options)
    needs_grad = list(fn.input_grads_needed(rows, extra, temperature, segments))
    rule = options.exclude_labels
    label_rows = None if rule is None else rule.rows
    label_segments = [] if rule is None else list(rule.segments)
    outputs = log_sum_exp_op(
        rows,
        extra,
        temperature,
        list(segments),
        label_rows,
        label_segments,
        options.rule_tensors(),
        _key(options.parts()),
        needs_grad,
    )
    return cast(Tensor, outputs[0])
