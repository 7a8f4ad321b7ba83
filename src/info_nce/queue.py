"""`MemoryQueue`: the keys of past batches, for MoCo and cross-batch memory.

A ring buffer of at most ``size`` keys (and, optionally, their labels) held in
persistent buffers, so that a checkpoint resumes it exactly. Only valid
entries are ever handed out: there are no random placeholders while it fills.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from info_nce import _normalize, distributed
from info_nce._autograd import outside_transforms
from info_nce._validation import (
    check_bool,
    check_positive_int,
    check_push,
    check_storage_dtype,
)


class MemoryQueue(nn.Module):
    """A first-in, first-out queue of detached keys: MoCo's queue, cross-batch memory.

    ``push`` appends a batch of keys (detached, L2-normalised unless
    ``normalize=False``, cast to the storage dtype); once ``size`` keys are
    held, each push overwrites the oldest. ``keys`` returns the valid entries,
    oldest first. ``info_nce(query, positive_key, queue.keys)`` is MoCo's loss:
    score the batch against the queue first, then push its keys.

    The entries, their labels, the write position and the fill count are
    persistent buffers: ``state_dict()``/``load_state_dict()`` resume the
    queue exactly, and ``.to(device)`` moves it.

    Args:
        size: the most keys held, a positive int.
        dim: the keys' width, a positive int.
        dtype: keyword-only; the storage dtype (float16/bfloat16 halve the
            memory; the loss still accumulates in float32).
        labels: keyword-only; also store an integer label per key (``push``
            then needs labels, and ``labels`` returns them).
        normalize: keyword-only; L2-normalise keys as they are pushed
            (default). The loss normalises anyway; stored unit vectors make
            the queue independent of the encoder's scale.
        gather_distributed: keyword-only; with an initialised process group of
            W > 1 processes, ``push`` first gathers every rank's batch in rank
            order, so every rank holds the same queue. Ranks may push batches
            of different sizes; every rank must call ``push``.

    Shape:
        - keys (property): (n, dim), n = ``len(queue)`` <= size.
        - labels (property): (n,), or None without ``labels=True``.
        - push: keys (b, dim), labels (b,); any b >= 0.

    Raises:
        ValueError: ``size`` or ``dim`` not a positive int; at ``push``, keys
            not of shape (b, dim) or not on the queue's device, labels missing
            where the queue has them (or the reverse), labels of the wrong
            shape or device.
        TypeError: ``dtype`` not a floating-point dtype, a flag not a bool;
            at ``push``, keys not a floating-point tensor, labels not integers.

    Examples:
        >>> import torch
        >>> from info_nce import MemoryQueue, info_nce
        >>> queue = MemoryQueue(size=6, dim=8)
        >>> query, key = torch.randn(4, 8), torch.randn(4, 8)
        >>> queue.keys.shape  # empty while nothing was pushed
        torch.Size([0, 8])
        >>> loss = info_nce(query, key, queue.keys)  # score first ...
        >>> queue.push(key)  # ... then push
        >>> queue.push(torch.randn(4, 8))
        >>> len(queue), queue.is_full, queue.keys.shape
        (6, True, torch.Size([6, 8]))
    """

    entries: Tensor
    entry_labels: Tensor
    position: Tensor
    count: Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        labels: bool = False,
        normalize: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.size = check_positive_int("size", size)
        self.dim = check_positive_int("dim", dim)
        dtype = check_storage_dtype(dtype)
        self.with_labels = check_bool("labels", labels)
        self.normalize = check_bool("normalize", normalize)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.register_buffer("entries", torch.zeros(size, dim, dtype=dtype))
        if self.with_labels:
            self.register_buffer("entry_labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # the next write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # valid entries
        # A host copy of the count, so that reading the valid entries needs no
        # device sync; refreshed whenever a state dict is loaded.
        self._set_count(0)
        self.register_load_state_dict_post_hook(_refresh_counters)  # type: ignore[no-untyped-call]

    def _set_count(self, count: int) -> None:
        # The host count is the length of an empty CPU tensor: torch.compile
        # treats a tensor's size as dynamic once it changes, where an int
        # attribute of a module is a constant of the graph (one graph per
        # value while the queue fills). The write position stays on the
        # device (`position`), for the same reason: it takes size / gcd(size,
        # b) values.
        self._count_size = torch.empty(count, 0)

    @property
    def _count(self) -> int:
        return self._count_size.shape[0]

    def __len__(self) -> int:
        return self._count

    @property
    def is_full(self) -> bool:
        """Whether the queue holds ``size`` keys."""
        return self._count == self.size

    @property
    def keys(self) -> Tensor:
        """(n, dim) the valid entries, oldest first, detached.

        A view of the storage until the ring first wraps around, and whenever
        the oldest entry sits at the start of the storage; a copy otherwise.
        """
        return self._in_order(self.entries)

    @property
    def labels(self) -> Tensor | None:
        """(n,) the valid entries' labels, oldest first; None without ``labels=True``."""
        return self._in_order(self.entry_labels) if self.with_labels else None

    def unordered(self) -> tuple[Tensor, Tensor | None]:
        """The valid entries (n, dim) and their labels (n,) in storage order: views, no copy.

        Once the ring has wrapped, storage order is not insertion order. A
        loss does not depend on the order of its negatives, so the loss
        modules score against these views and never copy the queue.

        Returns:
            ``(keys, labels)``: (n, dim) views of the entries, and (n,) views
            of their labels, or None without ``labels=True``.

        Examples:
            >>> import torch
            >>> from info_nce import MemoryQueue
            >>> queue = MemoryQueue(size=4, dim=2, normalize=False)
            >>> queue.push(torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
            >>> queue.push(torch.tensor([[4.0, 0.0], [5.0, 0.0]]))  # overwrites the oldest
            >>> queue.keys[:, 0]  # oldest first: a copy
            tensor([2., 3., 4., 5.])
            >>> queue.unordered()[0][:, 0]  # storage order: a view
            tensor([5., 2., 3., 4.])
        """
        labels = self.entry_labels[: self._count] if self.with_labels else None
        return self.entries[: self._count], labels

    def _in_order(self, storage: Tensor) -> Tensor:
        if self._count < self.size:
            return storage[: self._count]
        position = int(self.position)  # once full, where the oldest entry is (a sync)
        if position == 0:
            return storage
        return torch.cat([storage[position:], storage[:position]])

    @torch.no_grad()
    def push(self, keys: Tensor, labels: Tensor | None = None) -> None:
        """Append a batch of keys (and labels), overwriting the oldest once full.

        Args:
            keys: (b, dim) floating-point keys; any b >= 0. They are detached,
                L2-normalised unless the queue was built with
                ``normalize=False``, gathered from all ranks (with
                ``gather_distributed``) and cast to the storage dtype. If more
                than ``size`` arrive, only the newest ``size`` are kept.
            labels: (b,) integer labels, exactly when built with ``labels=True``.
        """
        keys, labels = check_push(
            keys,
            labels,
            dim=self.dim,
            with_labels=self.with_labels,
            device=self.entries.device,
        )
        with outside_transforms("MemoryQueue.push") as values:
            self._push(values(keys.detach()), None if labels is None else values(labels))

    def _push(self, keys: Tensor, labels: Tensor | None) -> None:
        if self.normalize:
            keys = _normalize.unit(keys)
        if self.gather_distributed and distributed.world_size() > 1:
            sizes = distributed.gather_sizes(len(keys), keys.device)
            keys = distributed.all_gather(keys, sizes)
            if labels is not None:
                labels = distributed.all_gather(labels, sizes)
        total = len(keys)
        if total >= self.size:  # only the newest fit: they fill the ring from 0
            keys = keys[total - self.size :]
            labels = None if labels is None else labels[total - self.size :]
            self.position.zero_()
        # Slot of each key: from the write position on, around the ring. (b,)
        slots = torch.arange(len(keys), device=keys.device).add_(self.position)
        slots.remainder_(self.size)
        self.entries.index_copy_(0, slots, keys.to(self.entries.dtype))
        if labels is not None:
            self.entry_labels.index_copy_(0, slots, labels.to(torch.long))
        self.position.add_(len(keys)).remainder_(self.size)
        self._set_count(min(self.size, self._count + total))
        self.count.fill_(self._count)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (the storage is zeroed, the counters set to 0)."""
        self.entries.zero_()
        if self.with_labels:
            self.entry_labels.zero_()
        self._set_count(0)
        self.position.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.entries.dtype}, "
            f"labels={self.with_labels}, normalize={self.normalize}, "
            f"gather_distributed={self.gather_distributed}"
        )


def _refresh_counters(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the host count follows the loaded buffers (both checked)."""
    assert isinstance(module, MemoryQueue)
    position, count = int(module.position), int(module.count)
    if not (0 <= count <= module.size and 0 <= position < module.size):
        raise ValueError(
            f"MemoryQueue state: count must be in [0, size={module.size}] and position in "
            f"[0, size), got count={count}, position={position}"
        )
    module._set_count(count)
