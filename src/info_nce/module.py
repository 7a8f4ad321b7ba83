"""The modules: holders of settings (and a learnable temperature) around the functionals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from info_nce._validation import (
    Anchors,
    Direction,
    HardnessMode,
    MarginStrategy,
    NegativeMode,
    Partition,
    Reduction,
    Variant,
    check_anchors,
    check_bias,
    check_bool,
    check_chunk_size,
    check_directions,
    check_false_negative_filter,
    check_hardness,
    check_negative_mode,
    check_positive_number,
    check_reduction,
    check_shared_mode,
    check_temperature,
    check_variant,
)
from info_nce.engine import overwritten_after
from info_nce.functional import info_nce, nt_xent, siglip_loss
from info_nce.queue import MemoryQueue


class _TemperatureModule(nn.Module):
    """The settings every loss module holds, checked once, and its temperature.

    The temperature is fixed (reassignable, validated) or learnable, CLIP's
    ``logit_scale``.
    """

    def __init__(
        self,
        temperature: float | Tensor,
        reduction: Reduction,
        *,
        normalize: bool,
        learn_temperature: bool,
        max_logit_scale: float,
        chunk_size: int | None,
        gather_distributed: bool,
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.normalize = check_bool("normalize", normalize)
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.learn_temperature = check_bool("learn_temperature", learn_temperature)
        self.max_logit_scale = check_positive_number("max_logit_scale", max_logit_scale)
        self.logit_scale: nn.Parameter | None = None
        self._temperature: float | Tensor = 0.1  # set below
        if not learn_temperature:
            self._set_fixed_temperature(temperature)
        else:
            checked = check_temperature(temperature)  # logit_scale's initial value
            initial = float(checked.detach()) if isinstance(checked, Tensor) else checked
            self._temperature = initial
            if initial * self.max_logit_scale < 1:
                raise ValueError(
                    f"temperature={initial:g} is below 1 / max_logit_scale = "
                    f"{1 / self.max_logit_scale:g}, the floor of a learnable temperature: it "
                    "would start clamped, with no gradient; raise max_logit_scale or the "
                    "temperature"
                )
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / initial)))

    def _set_fixed_temperature(self, value: object) -> None:
        """A fixed temperature: a number, or a tensor used as it is (gradients flow into it).

        An ``nn.Parameter`` is registered under the name ``temperature``, as
        info-nce-pytorch's module (an attribute assignment) registers it:
        ``parameters()`` yields it, the state dict holds it, ``.to`` moves it.
        """
        self._temperature = check_temperature(value)
        self._parameters.pop("temperature", None)
        if isinstance(value, nn.Parameter):
            self._parameters["temperature"] = value

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "temperature":  # the property's setter, also for an nn.Parameter
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def temperature(self) -> float | Tensor:
        """The temperature in use: a float, or a 0-dim tensor (learnable, or given as one).

        A fixed temperature can be reassigned (validated), as in info-nce-pytorch;
        a tensor given as the temperature is used as it is, so gradients flow into
        it. A learnable one is read-only: it is ``exp(-logit_scale)``, clamped.
        """
        if self.logit_scale is None:
            registered = self._parameters.get("temperature")
            return self._temperature if registered is None else registered
        return torch.exp(-self.logit_scale.clamp(max=math.log(self.max_logit_scale)))

    @temperature.setter
    def temperature(self, value: float | Tensor) -> None:
        if self.logit_scale is not None:
            raise AttributeError(
                "temperature is learnable (learn_temperature=True) and read-only; "
                "set logit_scale = log(1 / temperature) instead"
            )
        self._set_fixed_temperature(value)

    def _settings_repr(self, *own: str, rest: tuple[str, ...] = ()) -> str:
        """Every setting as ``name=value``: the temperature, ``own`` (the subclass's), the rest."""
        temperature = self.temperature
        if isinstance(temperature, Tensor):
            temperature = float(temperature.detach().cpu())
        return ", ".join(
            [
                f"temperature={temperature:g}",
                f"reduction={self.reduction!r}",
                *own,
                f"normalize={self.normalize}",
                f"learn_temperature={self.learn_temperature}",
                f"max_logit_scale={self.max_logit_scale:g}",
                f"chunk_size={self.chunk_size}",
                f"gather_distributed={self.gather_distributed}",
                *rest,
            ]
        )


class _LossModule(_TemperatureModule):
    """The InfoNCE family's settings: the objective's variant and a queue.

    A queue, if any, supplies extra unpaired negatives (`_queue_negatives`),
    and takes the batch's keys after the loss (`_push`).
    """

    def __init__(
        self,
        temperature: float | Tensor,
        reduction: Reduction,
        *,
        normalize: bool,
        learn_temperature: bool,
        max_logit_scale: float,
        chunk_size: int | None,
        gather_distributed: bool,
        decoupled: bool,
        false_negative_rate: float,
        hard_negative_beta: float,
        queue: MemoryQueue | None,
    ) -> None:
        super().__init__(
            temperature,
            reduction,
            normalize=normalize,
            learn_temperature=learn_temperature,
            max_logit_scale=max_logit_scale,
            chunk_size=chunk_size,
            gather_distributed=gather_distributed,
        )
        variant = check_variant(
            decoupled, false_negative_rate, hard_negative_beta, normalize=self.normalize
        )
        self.decoupled = variant.decoupled
        self.false_negative_rate = variant.false_negative_rate
        self.hard_negative_beta = variant.hard_negative_beta
        self.queue = check_queue(queue, gather_distributed=self.gather_distributed)

    def _queue_negatives(
        self, query: Tensor, negative_keys: Tensor | None, labels: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The queue's entries and their labels as ``negative_keys``/``negative_labels``.

        Without a queue: the given ``negative_keys`` and no labels.
        """
        if self.queue is None:
            return negative_keys, None
        keys, entry_labels = queue_negatives(self.queue, query, negative_keys, labels)
        if torch.compiler.is_compiling() and self._pushes():
            # Compiled, the push after the loss lands in the same graph, and
            # backward may read the entries: a copy as scored (eagerly the
            # engine copies only what backward keeps, `_reading_queue`).
            keys = keys.clone()
            entry_labels = None if entry_labels is None else entry_labels.clone()
        return keys, entry_labels

    def _reading_queue(self) -> AbstractContextManager[None]:
        """Around the loss: the queue is pushed to before backward (`overwritten_after`)."""
        if self.queue is None or torch.compiler.is_compiling():
            return nullcontext()  # compiled: `_queue_negatives` copies
        storage = [self.queue.entries]
        if self.queue.with_labels:
            storage.append(self.queue.entry_labels)
        return overwritten_after(*storage)

    def _push(self, keys: Tensor, labels: Tensor | None) -> None:
        """After the loss: the batch's keys (and labels) join the queue, in training only."""
        if self.queue is not None and self._pushes():
            self.queue.push(keys, labels if self.queue.with_labels else None)

    def _pushes(self) -> bool:
        """Whether this step pushes to the queue: in training, with gradients."""
        return self.queue is not None and self.training and torch.is_grad_enabled()

    def _settings_repr(self, *own: str, rest: tuple[str, ...] = ()) -> str:
        """The settings of `_TemperatureModule`, then the variant's.

        The queue, a submodule, is shown by `nn.Module`'s repr on a line of its own.
        """
        variant = (
            f"decoupled={self.decoupled}",
            f"false_negative_rate={self.false_negative_rate:g}",
            f"hard_negative_beta={self.hard_negative_beta:g}",
        )
        return super()._settings_repr(*own, rest=(*variant, *rest))


class InfoNCE(_LossModule):
    """InfoNCE loss for contrastive learning (van den Oord et al., 2018).

    Pulls each query towards its positive key and pushes it away from negative
    keys. A drop-in replacement for info-nce-pytorch's ``InfoNCE``; see
    `info_nce.info_nce` for the formula and the options.

    Args:
        temperature: logits are divided by it; a finite number > 0, or a
            one-element floating-point tensor, used as it is (gradients flow
            into it). With ``learn_temperature``, the initial value, at least
            ``1 / max_logit_scale``.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        negative_mode: ``'unpaired'``: negatives (M, D) shared by all queries;
            ``'paired'``: negatives (B, M, D), M per query; ``'shared'``:
            negatives (B, M, D), M per query and all B * M scored against
            every query (sentence-transformers' hard-negative columns).
        symmetric: keyword-only; average with the key-to-query loss (CLIP).
        in_batch_negatives: keyword-only; see `info_nce.info_nce`.
        normalize: keyword-only; L2-normalise the embeddings (default True).
        learn_temperature: keyword-only; make the temperature a parameter. The
            module's only parameter, ``logit_scale``, stores
            ``log(1 / temperature)`` (CLIP's convention), initialised from
            ``temperature``.
        max_logit_scale: keyword-only; with ``learn_temperature``, forward
            clamps ``exp(logit_scale)`` to at most this, so the temperature is
            at least ``1 / max_logit_scale`` (0.01 by default).
        chunk_size: keyword-only; ``None`` picks the faster exact
            implementation, a positive int forces the blockwise engine with
            that many queries per block.
        gather_distributed: keyword-only; with a torch.distributed process
            group, score each rank's queries against all ranks' candidates, with
            gradients that reach the owning rank (see `info_nce.info_nce` for the
            contract).
        decoupled: keyword-only; the decoupled objective (DCL), see
            `info_nce.info_nce`.
        false_negative_rate: keyword-only; the debiased objective's τ⁺, see
            `info_nce.info_nce`.
        hard_negative_beta: keyword-only; the hard-negative objective's β, see
            `info_nce.info_nce`.
        queue: keyword-only; a `MemoryQueue` (a submodule: saved in the
            state dict, moved by ``.to``). ``forward`` then takes no
            ``negative_keys``: it scores the batch against the queue's
            entries as unpaired negatives as the queue was before this batch
            (MoCo; add in-batch negatives with ``in_batch_negatives=True``),
            then pushes this batch's positive keys. It pushes only in
            training mode with gradients enabled, so evaluation never
            changes the queue. For many processes, give the queue
            ``gather_distributed=True`` (not the loss). A queue built with
            ``labels=True`` needs ``labels`` in ``forward``: its entries'
            labels are the loss's ``negative_labels`` (an entry with a
            query's label is one of its positives), and the batch's labels
            are pushed with its keys.
        hardness_mode: keyword-only; ``None``, ``'in_batch_negatives'``,
            ``'hard_negatives'`` or ``'all_negatives'``: which negatives'
            logits hardness weighting raises, see `info_nce.info_nce`.
        hardness_strength: keyword-only; its alpha >= 0.
        directions: keyword-only; a tuple of ``'query_to_key'``,
            ``'key_to_query'``, ``'query_to_query'``, ``'key_to_key'``, see
            `info_nce.info_nce`.
        partition: keyword-only; ``'joint'`` or ``'per_direction'``.
        false_negative_margin: keyword-only; guided false-negative filtering
            (GISTEmbed): candidates more similar to a row's anchor than its
            positive minus the margin are removed, see `info_nce.info_nce`.
            The guide embeddings are ``forward``'s keyword ``guide`` (None:
            the model's own).
        margin_strategy: keyword-only; ``'absolute'`` or ``'relative'``.

    Shape:
        - query: (B, D), B queries of D features.
        - positive_key: (B, D).
        - negative_keys: optional; (M, D) if unpaired, (B, M, D) if paired or shared.
          Without it, the other rows' positive keys are the negatives.
        - labels: optional, keyword-only, (B,) integers.
        - negative_mask: optional, keyword-only, (B, M) bool (paired or shared).
        - guide: optional, keyword-only, guide embeddings (B, G), (B, G)
          and, with negatives, their shape with G features.
        - output: scalar, or (B,) if ``reduction='none'``.

    Returns:
        ``forward`` returns the loss: float32 for float16/bfloat16 inputs,
        else the inputs' dtype.

    Raises:
        ValueError, TypeError: invalid settings, at construction; invalid
            inputs, at the call.

    Examples:
        >>> import torch
        >>> from info_nce import InfoNCE
        >>> loss = InfoNCE(negative_mode="unpaired")
        >>> query, positive_key = torch.randn(32, 128), torch.randn(32, 128)
        >>> negative_keys = torch.randn(48, 128)
        >>> loss(query, positive_key, negative_keys).shape
        torch.Size([])
        >>> clip = InfoNCE(temperature=0.07, symmetric=True, learn_temperature=True)
        >>> clip(query, positive_key).backward()
        >>> clip.logit_scale.grad is not None
        True
        >>> from info_nce import MemoryQueue
        >>> moco = InfoNCE(temperature=0.07, queue=MemoryQueue(size=4096, dim=128))
        >>> moco(query, positive_key).item()  # the queue is empty: no negatives yet
        0.0
        >>> len(moco.queue)  # this batch's keys were pushed after scoring
        32
    """

    def __init__(
        self,
        temperature: float | Tensor = 0.1,
        reduction: Reduction = "mean",
        negative_mode: NegativeMode = "unpaired",
        *,
        symmetric: bool = False,
        in_batch_negatives: bool | None = None,
        normalize: bool = True,
        learn_temperature: bool = False,
        max_logit_scale: float = 100.0,
        chunk_size: int | None = None,
        gather_distributed: bool = False,
        decoupled: bool = False,
        false_negative_rate: float = 0.0,
        hard_negative_beta: float = 0.0,
        queue: MemoryQueue | None = None,
        hardness_mode: HardnessMode | None = None,
        hardness_strength: float = 0.0,
        directions: Sequence[Direction] | None = None,
        partition: Partition | None = None,
        false_negative_margin: float | None = None,
        margin_strategy: MarginStrategy = "absolute",
    ) -> None:
        super().__init__(
            temperature,
            reduction,
            normalize=normalize,
            learn_temperature=learn_temperature,
            max_logit_scale=max_logit_scale,
            chunk_size=chunk_size,
            gather_distributed=gather_distributed,
            decoupled=decoupled,
            false_negative_rate=false_negative_rate,
            hard_negative_beta=hard_negative_beta,
            queue=queue,
        )
        self.negative_mode = check_negative_mode(negative_mode)
        self.symmetric = check_bool("symmetric", symmetric)
        if in_batch_negatives is not None:
            check_bool("in_batch_negatives", in_batch_negatives)
        self.in_batch_negatives = in_batch_negatives
        variant = Variant(self.decoupled, self.false_negative_rate, self.hard_negative_beta)
        check_shared_mode(self.negative_mode, variant)
        check_hardness(hardness_mode, hardness_strength, labels=None, variant=variant)
        self.hardness_mode = hardness_mode
        self.hardness_strength = float(hardness_strength)
        check_directions(
            directions, partition, symmetric=self.symmetric, labels=None, variant=variant
        )
        self.directions = None if directions is None else tuple(directions)
        self.partition = partition
        check_false_negative_filter(
            false_negative_margin,
            margin_strategy,
            None,
            query=torch.empty(0, 1),
            negative_keys=None,
            labels=None,
            variant=variant,
        )
        self.false_negative_margin = (
            None if false_negative_margin is None else float(false_negative_margin)
        )
        self.margin_strategy = margin_strategy

    def forward(
        self,
        query: Tensor,
        positive_key: Tensor,
        negative_keys: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        negative_mask: Tensor | None = None,
        guide: Sequence[Tensor] | None = None,
    ) -> Tensor:
        negative_mode = "unpaired" if self.queue is not None else self.negative_mode
        negative_keys, negative_labels = self._queue_negatives(query, negative_keys, labels)
        with self._reading_queue():
            loss = info_nce(
                query,
                positive_key,
                negative_keys,
                temperature=self.temperature,
                reduction=self.reduction,
                negative_mode=negative_mode,
                symmetric=self.symmetric,
                in_batch_negatives=self.in_batch_negatives,
                labels=labels,
                negative_labels=negative_labels,
                negative_mask=negative_mask,
                normalize=self.normalize,
                chunk_size=self.chunk_size,
                gather_distributed=self.gather_distributed,
                decoupled=self.decoupled,
                false_negative_rate=self.false_negative_rate,
                hard_negative_beta=self.hard_negative_beta,
                hardness_mode=self.hardness_mode,
                hardness_strength=self.hardness_strength,
                directions=self.directions,
                partition=self.partition,
                false_negative_margin=self.false_negative_margin,
                margin_strategy=self.margin_strategy,
                guide=guide,
            )
        self._push(positive_key, labels)  # after scoring: the next batch's negatives
        return loss

    def extra_repr(self) -> str:
        settings = [
            f"negative_mode={self.negative_mode!r}",
            f"symmetric={self.symmetric}",
            f"in_batch_negatives={self.in_batch_negatives}",
        ]
        if self.directions is not None or self.partition is not None:
            settings += [f"directions={self.directions!r}", f"partition={self.partition!r}"]
        if self.false_negative_margin is not None:
            settings += [
                f"false_negative_margin={self.false_negative_margin:g}",
                f"margin_strategy={self.margin_strategy!r}",
            ]
        if self.hardness_mode is not None:
            settings += [
                f"hardness_mode={self.hardness_mode!r}",
                f"hardness_strength={self.hardness_strength:g}",
            ]
        return self._settings_repr(*settings)


class NTXent(_LossModule):
    """NT-Xent loss over V views (SimCLR, Chen et al. 2020; SupCon with labels).

    Every embedding is an anchor against all the others, itself excluded; its
    positives are the other views of its sample (and, with labels, of its
    label). See `info_nce.nt_xent` for the formula and the options.

    Args:
        temperature: logits are divided by it; a finite number > 0, or a
            one-element floating-point tensor, used as it is (gradients flow
            into it). With ``learn_temperature``, the initial value, at least
            ``1 / max_logit_scale``.
        reduction: ``'mean'`` over the anchors, ``'sum'`` or ``'none'``.
        anchors: keyword-only; ``'all'`` or ``'first'`` (only view 0's embeddings).
        normalize: keyword-only; L2-normalise the embeddings (default True).
        learn_temperature: keyword-only; make the temperature a parameter,
            ``logit_scale = log(1 / temperature)``, as in `InfoNCE`.
        max_logit_scale: keyword-only; with ``learn_temperature``, the
            temperature is at least ``1 / max_logit_scale``.
        chunk_size: keyword-only; ``None`` picks the faster exact
            implementation, a positive int forces the blockwise engine.
        gather_distributed: keyword-only; score each rank's anchors against all
            ranks' embeddings (see `info_nce.nt_xent`).
        decoupled: keyword-only; the decoupled objective (DCL), see
            `info_nce.nt_xent`.
        false_negative_rate: keyword-only; the debiased objective's τ⁺, see
            `info_nce.nt_xent`.
        hard_negative_beta: keyword-only; the hard-negative objective's β, see
            `info_nce.nt_xent`.
        queue: keyword-only; a `MemoryQueue`, as in `InfoNCE`: every anchor
            is scored against the queue's entries as extra negatives (its
            ``negative_keys``), as the queue was before this batch; then the
            last view is pushed (in training mode with gradients enabled).

    Shape:
        - views: V tensors (B, D) as positional arguments, or one (V, B, D) tensor.
        - labels: optional, keyword-only, (B,) integers.
        - output: scalar; ``reduction='none'``: (V, B), or (B,) with ``anchors='first'``.

    Returns:
        ``forward`` returns the loss: float32 for float16/bfloat16 views,
        else the views' dtype.

    Raises:
        ValueError, TypeError: invalid settings, at construction; invalid
            inputs, at the call.

    Examples:
        >>> import torch
        >>> from info_nce import NTXent
        >>> loss = NTXent(temperature=0.5)
        >>> z1, z2 = torch.randn(32, 128), torch.randn(32, 128)
        >>> loss(z1, z2).shape
        torch.Size([])
        >>> loss(torch.randn(3, 32, 128), labels=torch.randint(0, 4, (32,))).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float | Tensor = 0.1,
        reduction: Reduction = "mean",
        *,
        anchors: Anchors = "all",
        normalize: bool = True,
        learn_temperature: bool = False,
        max_logit_scale: float = 100.0,
        chunk_size: int | None = None,
        gather_distributed: bool = False,
        decoupled: bool = False,
        false_negative_rate: float = 0.0,
        hard_negative_beta: float = 0.0,
        queue: MemoryQueue | None = None,
    ) -> None:
        super().__init__(
            temperature,
            reduction,
            normalize=normalize,
            learn_temperature=learn_temperature,
            max_logit_scale=max_logit_scale,
            chunk_size=chunk_size,
            gather_distributed=gather_distributed,
            decoupled=decoupled,
            false_negative_rate=false_negative_rate,
            hard_negative_beta=hard_negative_beta,
            queue=queue,
        )
        self.anchors = check_anchors(anchors)

    def forward(self, *views: Tensor, labels: Tensor | None = None) -> Tensor:
        stacked: Tensor | Sequence[Tensor] = views[0] if len(views) == 1 else views
        last_view = views[-1] if len(views) > 1 else views[0][-1]  # (B, D)
        negative_keys, negative_labels = self._queue_negatives(last_view, None, labels)
        with self._reading_queue():
            loss = nt_xent(
                stacked,
                labels,
                temperature=self.temperature,
                reduction=self.reduction,
                anchors=self.anchors,
                normalize=self.normalize,
                chunk_size=self.chunk_size,
                gather_distributed=self.gather_distributed,
                decoupled=self.decoupled,
                false_negative_rate=self.false_negative_rate,
                hard_negative_beta=self.hard_negative_beta,
                negative_keys=negative_keys,
                negative_labels=negative_labels,
            )
        self._push(last_view, labels)  # after scoring: the next batch's negatives
        return loss

    def extra_repr(self) -> str:
        return self._settings_repr(f"anchors={self.anchors!r}")


class SigLIPLoss(_TemperatureModule):
    """SigLIP's sigmoid loss (Zhai et al. 2023), with its learnable temperature and bias.

    Every (query, key) pair is scored alone: ``-log sigmoid(z)`` for a
    positive pair and ``-log sigmoid(-z)`` for a negative one, ``z`` being
    ``cos(q_i, k_j) / temperature + bias``. See `info_nce.siglip_loss` for
    the formula and the options.

    By default both are learnable and start as SigLIP starts them: the
    parameter ``logit_scale = log(1 / temperature)`` at log 10 (as `InfoNCE`
    stores a learnable temperature, clamped so that the temperature is at
    least ``1 / max_logit_scale``) and the parameter ``bias`` at -10.

    Args:
        temperature: the initial temperature (learnable), or the fixed one: a
            finite number > 0, or a one-element tensor used as it is
            (gradients flow into it). Default 0.1, a scale of 10.
        bias: the initial bias (learnable), or the fixed one: a finite number,
            or a one-element tensor used as it is. Default -10.
        learn_temperature: keyword-only; make the temperature the parameter
            ``logit_scale`` (default True).
        learn_bias: keyword-only; make the bias the parameter ``bias``
            (default True).
        max_logit_scale: keyword-only; forward clamps ``exp(logit_scale)`` to
            at most this (100 by default: the temperature is at least 0.01).
        reduction: keyword-only; ``'mean'`` (the sum over all pairs divided
            by the number of queries), ``'sum'`` or ``'none'``.
        normalize: keyword-only; L2-normalise the embeddings (default).
        chunk_size: keyword-only; see `info_nce.siglip_loss`.
        gather_distributed: keyword-only; score this rank's queries against
            all ranks' keys (see `info_nce.siglip_loss`).

    Shape:
        - query: (B, D), B queries of D features. key: (B, D).
        - labels: (B,). negative_keys: (M, D), M negatives.
        - output: scalar, or (B,) if ``reduction='none'``.

    Raises:
        TypeError: a setting of the wrong type (a flag that is not a bool, a
            temperature or bias that is not a number or one-element tensor).
        ValueError: a setting out of its range (an unknown reduction, a
            temperature that is not finite and > 0 or, learnable, below
            ``1 / max_logit_scale``, a bias that is not finite). Forward
            raises as `info_nce.siglip_loss` does.

    Examples:
        >>> import torch
        >>> from info_nce import SigLIPLoss
        >>> loss_fn = SigLIPLoss()
        >>> round(loss_fn.temperature.item(), 6), loss_fn.bias.item()
        (0.1, -10.0)
        >>> image = torch.randn(32, 128, requires_grad=True)
        >>> text = torch.randn(32, 128, requires_grad=True)
        >>> loss = loss_fn(image, text)
        >>> loss.backward()
        >>> loss_fn.logit_scale.grad is not None and loss_fn.bias.grad is not None
        True
        >>> sorted(loss_fn.state_dict())
        ['bias', 'logit_scale']
    """

    bias: float | Tensor

    def __init__(
        self,
        temperature: float | Tensor = 0.1,
        bias: float | Tensor = -10.0,
        *,
        learn_temperature: bool = True,
        learn_bias: bool = True,
        max_logit_scale: float = 100.0,
        reduction: Reduction = "mean",
        normalize: bool = True,
        chunk_size: int | None = None,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature,
            reduction,
            normalize=normalize,
            learn_temperature=learn_temperature,
            max_logit_scale=max_logit_scale,
            chunk_size=chunk_size,
            gather_distributed=gather_distributed,
        )
        self.learn_bias = check_bool("learn_bias", learn_bias)
        checked = check_bias(bias)
        if learn_bias:
            initial = float(checked.detach()) if isinstance(checked, Tensor) else checked
            self.bias = nn.Parameter(torch.tensor(initial))
        else:
            self.bias = bias if isinstance(bias, Tensor) else checked

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        labels: Tensor | None = None,
        negative_keys: Tensor | None = None,
    ) -> Tensor:
        return siglip_loss(
            query,
            key,
            self.temperature,
            self.bias,
            self.reduction,
            labels=labels,
            negative_keys=negative_keys,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        bias = self.bias
        value = float(bias.detach().cpu()) if isinstance(bias, Tensor) else bias
        return self._settings_repr(f"bias={value:g}", f"learn_bias={self.learn_bias}")


def check_queue(queue: object, *, gather_distributed: bool) -> MemoryQueue | None:
    """The ``queue`` setting: None, or a `MemoryQueue` on a loss that does not gather."""
    if queue is None:
        return None
    if not isinstance(queue, MemoryQueue):
        raise TypeError(f"queue must be a MemoryQueue or None, got {type(queue).__name__}")
    if gather_distributed:
        # The loss would gather the queue's entries like any unpaired negatives,
        # though a gathering queue holds every rank's keys already.
        raise ValueError(
            "queue= does not combine with the loss's gather_distributed=True yet; got both. "
            "Build the queue with MemoryQueue(..., gather_distributed=True) instead: every "
            "rank then scores its batch against the same, global queue (MoCo)"
        )
    return queue


def queue_negatives(
    queue: MemoryQueue, query: Tensor, negative_keys: Tensor | None, labels: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The queue's entries as unpaired negatives in the query's dtype, and their labels.

    The entries are read in storage order, without a copy (the loss does not
    depend on the order of its negatives), unless the query's dtype differs
    from the storage dtype.
    """
    if negative_keys is not None:
        raise ValueError(
            "a loss module built with queue= takes its negatives from the queue: pass no "
            f"negative_keys, got a tensor of shape {tuple(negative_keys.shape)}"
        )
    if query.dim() == 2 and query.shape[1] != queue.dim:
        raise ValueError(
            f"queue holds keys of dim {queue.dim}, but <query> has shape {tuple(query.shape)}"
        )
    keys, entry_labels = queue.unordered()
    if queue.with_labels and labels is None:
        raise ValueError(
            "this loss's queue holds labels (MemoryQueue(labels=True)): forward needs "
            "labels=, got None"
        )
    keys = keys if keys.dtype == query.dtype else keys.to(query.dtype)
    return keys, entry_labels
