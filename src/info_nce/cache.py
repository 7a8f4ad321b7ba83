"""Gradient caching: embed a batch in chunks, keep no encoder activations, replay in backward.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup": the loss needs every embedding at once, the encoder's
activations need not. `grad_cache` runs the encoder chunk by chunk without
gradient and returns the embeddings; when the loss's backward reaches them,
each chunk is run again with gradient, under the random state and the
autocast state of its first run, and its slice of the embeddings' gradient
is back-propagated into the encoder. Peak memory is the loss's plus one
chunk's activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from info_nce._validation import check_positive_int

Inputs = Tensor | Mapping[str, Any] | Sequence[Any]
AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class _State:
    """What a chunk's replay must reproduce: random states and autocast settings."""

    cpu_rng: Tensor
    cuda_rng: tuple[tuple[int, Tensor], ...]  # (device index, state) of each device in use
    autocast: tuple[tuple[str, bool, torch.dtype], ...]  # (device type, enabled, dtype)

    @staticmethod
    def capture(devices: list[int]) -> _State:
        cuda = tuple((d, torch.cuda.get_rng_state(d)) for d in devices)
        autocast = tuple(
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in AUTOCAST_DEVICES
        )
        return _State(torch.get_rng_state(), cuda, autocast)

    @contextlib.contextmanager
    def restored(self, devices: list[int]) -> Iterator[None]:
        """Within: the random states as captured (the caller's are put back after)."""
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            torch.set_rng_state(self.cpu_rng)
            for device, state in self.cuda_rng:
                torch.cuda.set_rng_state(state, device)
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            yield


@contextlib.contextmanager
def _running_stats_kept(encoder: Callable[..., Any]) -> Iterator[None]:
    """Within: a replay; after it, every batch norm's running statistics as they were.

    The first run updated them once per chunk; the replay computes the same
    outputs (training mode normalises with the chunk's own statistics) and
    must not update them a second time.
    """
    buffers = []
    if isinstance(encoder, nn.Module):
        for module in encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                stats = (module.running_mean, module.running_var, module.num_batches_tracked)
                buffers += [t for t in stats if t is not None]
    saved = [t.clone() for t in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def _batch_size(inputs: Inputs) -> int:
    """The shared first dimension of the tensors in ``inputs``."""
    tensors = _tensors(inputs)
    if not tensors:
        raise TypeError(
            "inputs must be a tensor, or a dict, tuple or list holding at least one tensor, "
            f"got {type(inputs).__name__}"
        )
    sizes = {name: len(t) for name, t in tensors.items() if t.dim() > 0}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inputs' tensors must share their first dimension, got {sizes}")
    batch = next(iter(sizes.values()))
    if batch == 0:
        raise ValueError(f"inputs must hold at least one row, got {sizes}")
    return batch


def _tensors(inputs: Inputs) -> dict[str, Tensor]:
    if isinstance(inputs, Tensor):
        return {"inputs": inputs}
    if isinstance(inputs, Mapping):
        return {f"inputs[{k!r}]": v for k, v in inputs.items() if isinstance(v, Tensor)}
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return {f"inputs[{i}]": v for i, v in enumerate(inputs) if isinstance(v, Tensor)}
    return {}


def _chunk(inputs: Inputs, rows: slice, leaves: dict[int, Tensor] | None = None) -> Any:
    """The chunk of every tensor (as a leaf needing gradient where ``leaves`` asks)."""

    def cut(value: Any) -> Any:
        if not isinstance(value, Tensor) or value.dim() == 0:
            return value
        part = value[rows]
        if leaves is not None and value.requires_grad:
            part = part.detach().requires_grad_()
            leaves[id(value)] = part
        return part

    if isinstance(inputs, Tensor):
        return cut(inputs)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: cut(v) for k, v in inputs.items()})  # type: ignore[call-arg]
    return type(inputs)(cut(v) for v in inputs)  # type: ignore[call-arg]


def _call(encoder: Callable[..., Any], chunk: Any) -> Any:
    if isinstance(chunk, Mapping):
        return encoder(**chunk)
    if isinstance(chunk, (tuple, list)):
        return encoder(*chunk)
    return encoder(chunk)


def _checked(output: Any, rows: int) -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(f"encoder must return a tensor, got {type(output).__name__}")
    if output.dim() != 2 or len(output) != rows:
        raise ValueError(
            f"encoder must return a ({rows}, D) tensor for a chunk of {rows} rows, "
            f"got shape {tuple(output.shape)}"
        )
    return output


class _GradCache(torch.autograd.Function):
    """Each input's chunked embeddings; backward replays every chunk and back-propagates its slice.

    Several inputs (the columns of one batch through one encoder) share one
    backward, so DDP all-reduces once for all of them, with the last chunk.
    """

    @staticmethod
    def forward(
        ctx: Any,
        encoder: Callable[..., Any],
        columns: list[Inputs],
        chunks: list[list[slice]],
        anchor: Tensor,
        *differentiable: Tensor,
    ) -> tuple[Tensor, ...]:
        tensors = [t for inputs in columns for t in _tensors(inputs).values()]
        devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        if torch.cuda.is_available() and not devices and isinstance(encoder, nn.Module):
            devices = sorted({p.device.index or 0 for p in encoder.parameters() if p.is_cuda})
        states: list[list[_State]] = []
        embeddings = []
        for inputs, column_chunks in zip(columns, chunks, strict=True):
            states.append([])
            outputs = []
            for rows in column_chunks:
                states[-1].append(_State.capture(devices))
                output = _call(encoder, _chunk(inputs, rows))
                outputs.append(_checked(output, rows.stop - rows.start))
            embeddings.append(torch.cat(outputs))  # (B_c, D)
        ctx.encoder, ctx.columns, ctx.chunks = encoder, columns, chunks
        ctx.states, ctx.devices = states, devices
        ctx.differentiable = [id(t) for t in differentiable]
        return tuple(embeddings)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        encoder = ctx.encoder
        no_sync = getattr(encoder, "no_sync", None)
        replays = [(c, n) for c, column in enumerate(ctx.chunks) for n in range(len(column))]
        input_grads: dict[int, list[Tensor]] = {key: [] for key in ctx.differentiable}
        for c, n in replays:
            inputs, rows = ctx.columns[c], ctx.chunks[c][n]
            # DDP all-reduces the accumulated gradients once, with the last chunk.
            sync = contextlib.nullcontext()
            if callable(no_sync) and (c, n) != replays[-1]:
                sync = no_sync()
            leaves: dict[int, Tensor] = {}
            replay = ctx.states[c][n].restored(ctx.devices)
            with sync, replay, _running_stats_kept(encoder), torch.enable_grad():
                chunk = _chunk(inputs, rows, leaves)
                output = _checked(_call(encoder, chunk), rows.stop - rows.start)
                torch.autograd.backward(output, grads[c][rows].to(output.dtype))
            for key, leaf in leaves.items():
                input_grads[key].append(torch.zeros_like(leaf) if leaf.grad is None else leaf.grad)
        return None, None, None, None, *(torch.cat(parts) for parts in input_grads.values())


def cached_embeddings(
    encoder: Callable[..., Any], columns: Sequence[Inputs], *, chunk_size: int
) -> list[Tensor]:
    """`grad_cache` over several inputs through one encoder, with one backward for them all.

    The columns of a batch (queries, documents, negatives) may differ in
    their other dimensions (a tokenizer pads each to its own length); their
    replays share one backward, so a DDP encoder all-reduces once per step,
    not once per column. A tensor may appear in one column only.

    Returns:
        Each column's (B_c, D) embeddings, in order.
    """
    chunk_size = check_positive_int("chunk_size", chunk_size)
    chunks = []
    for inputs in columns:
        batch = _batch_size(inputs)
        chunks.append([slice(a, min(a + chunk_size, batch)) for a in range(0, batch, chunk_size)])
    differentiable = [t for inputs in columns for t in _tensors(inputs).values() if t.requires_grad]
    if len({id(t) for t in differentiable}) < len(differentiable):
        raise ValueError("columns must not share a tensor that needs a gradient")
    # Backward must run even when no input needs a gradient (the parameters
    # do); for a module whose parameters need none, nothing is to replay.
    trainable = not isinstance(encoder, nn.Module) or any(
        p.requires_grad for p in encoder.parameters()
    )
    anchor = torch.empty(0, requires_grad=torch.is_grad_enabled() and trainable)
    outputs = _GradCache.apply(encoder, list(columns), chunks, anchor, *differentiable)  # type: ignore[no-untyped-call]
    return list(cast(tuple[Tensor, ...], outputs))


def grad_cache(encoder: Callable[..., Any], inputs: Inputs, *, chunk_size: int) -> Tensor:
    """The (B, D) embeddings of ``inputs`` under ``encoder``, computed without keeping activations.

    Args:
        encoder: a callable mapping a chunk of the inputs to a (b, D)
            tensor: an ``nn.Module`` or its ``DistributedDataParallel``
            wrapper. A dict of inputs is passed as keyword arguments, a tuple
            or list as positional ones. The batch norms whose running
            statistics the replay keeps and the CUDA devices of the
            parameters (whose random state it restores) are found through
            the module, and a ``no_sync()`` context on the encoder (DDP's,
            or a wrapper's that forwards it) defers the gradient all-reduce
            to the last chunk; a plain function is run as given.
        inputs: a tensor, or a dict/tuple/list whose tensors share their
            first dimension B (a tokenizer's output); other values are
            passed to every chunk unchanged.
        chunk_size: rows per chunk (the last may be smaller).

    Shape:
        - inputs: (B, ...) tensors. output: (B, D).

    Returns:
        The embeddings, concatenated. Their autograd graph holds the inputs
        and what replays each chunk, no encoder activations. In backward,
        each chunk runs again with gradient under the random state (CPU and
        each CUDA device in use) and the autocast state of its first run, so
        dropout draws the same masks, and back-propagates its slice of the
        embeddings' gradient into the encoder's parameters (and into inputs
        that need a gradient). The parameter gradients equal those of the
        plain backward over the same chunks; for an encoder without random
        or batch-dependent layers, those of the full-batch backward.
        BatchNorm in training mode sees each chunk's statistics, as in
        GradCache; its running statistics are updated once per chunk, by
        the first run (the replay leaves them as they were). Without
        gradient mode, or for a module none of whose parameters (and none
        of the inputs) needs a gradient, the embeddings carry no graph and
        nothing is replayed. Under
        ``DistributedDataParallel`` the gradients are all-reduced once per
        backward, with the last chunk.

    Raises:
        ValueError: ``chunk_size`` is not a positive int; the inputs'
            tensors differ in their first dimension or hold no row; the encoder returns a
            tensor that is not (b, D) for a chunk of b rows.
        TypeError: the inputs hold no tensor; the encoder returns no tensor.

    Examples:
        >>> import torch
        >>> from info_nce import grad_cache, info_nce
        >>> from torch import nn
        >>> encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> x, y = torch.randn(64, 8), torch.randn(64, 8)
        >>> query = grad_cache(encoder, x, chunk_size=16)  # (64, 4), no activations kept
        >>> loss = info_nce(query, grad_cache(encoder, y, chunk_size=16))
        >>> loss.backward()
        >>> encoder[0].weight.grad.shape
        torch.Size([16, 8])
    """
    (embeddings,) = cached_embeddings(encoder, [inputs], chunk_size=chunk_size)
    return embeddings
