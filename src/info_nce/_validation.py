"""Every input check of the public API, in one place and one message style.

Messages name the argument, say what was expected and what was given. Where
info-nce-pytorch had a message, its wording is kept (without the typo).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Literal, cast, get_args

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
NegativeMode = Literal["unpaired", "paired", "shared"]
HardnessMode = Literal["in_batch_negatives", "hard_negatives", "all_negatives"]
Direction = Literal["query_to_key", "key_to_query", "query_to_query", "key_to_key"]
Partition = Literal["joint", "per_direction"]
MarginStrategy = Literal["absolute", "relative"]
Anchors = Literal["all", "first"]

REDUCTIONS: tuple[str, ...] = get_args(Reduction)
NEGATIVE_MODES: tuple[str, ...] = get_args(NegativeMode)
HARDNESS_MODES: tuple[str, ...] = get_args(HardnessMode)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
PARTITIONS: tuple[str, ...] = get_args(Partition)
MARGIN_STRATEGIES: tuple[str, ...] = get_args(MarginStrategy)
ANCHORS: tuple[str, ...] = get_args(Anchors)
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reduce_loss(values: Tensor, reduction: Reduction) -> Tensor:
    """Apply ``reduction`` to per-sample values: their mean, their sum, or the values.

    The mean of no values is 0 (a rank with an empty batch under
    ``gather_distributed``), not NaN.
    """
    if reduction == "mean":
        return values.mean() if values.numel() else values.sum()
    if reduction == "sum":
        return values.sum()
    return values


def _choices(options: tuple[str, ...]) -> str:
    return ", ".join(repr(option) for option in options)


def check_reduction(reduction: object) -> Reduction:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {_choices(REDUCTIONS)}, got {reduction!r}")
    return cast(Reduction, reduction)


def check_negative_mode(negative_mode: object) -> NegativeMode:
    if not isinstance(negative_mode, str) or negative_mode not in NEGATIVE_MODES:
        raise ValueError(
            f"negative_mode must be one of {_choices(NEGATIVE_MODES)}, got {negative_mode!r}"
        )
    return cast(NegativeMode, negative_mode)


def check_anchors(anchors: object) -> Anchors:
    if not isinstance(anchors, str) or anchors not in ANCHORS:
        raise ValueError(f"anchors must be one of {_choices(ANCHORS)}, got {anchors!r}")
    return cast(Anchors, anchors)


def check_temperature(temperature: object) -> float | Tensor:
    """A finite number > 0, or a floating-point tensor of one such element."""
    if isinstance(temperature, Tensor):
        return _check_scalar_tensor("temperature", temperature, positive=True)
    return check_positive_number("temperature", temperature)


def check_bias(bias: object) -> float | Tensor:
    """A finite real number, or a floating-point tensor of one such element."""
    if isinstance(bias, Tensor):
        return _check_scalar_tensor("bias", bias, positive=False)
    number = _check_real("bias", bias)
    if not math.isfinite(number):
        raise ValueError(f"bias must be a finite number, got {bias!r}")
    return number


def _check_scalar_tensor(name: str, value: Tensor, *, positive: bool) -> Tensor:
    """A one-element floating-point tensor, finite (and > 0 if ``positive``), as 0-dim."""
    if not value.is_floating_point() or value.numel() != 1:
        raise TypeError(
            f"{name} must be a number or a floating-point tensor with one element, "
            f"got a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
        )
    condition = "finite and > 0" if positive else "finite"
    valid = torch.isfinite(value).all()
    if positive:
        valid = valid & (value > 0).all()
    if torch.compiler.is_compiling() or value.device.type != "cpu":
        # Compiled: an assert op in the graph (a RuntimeError when it
        # fails), no graph break. On an accelerator: a device-side assert,
        # no host sync per step (it stops the process when it fails).
        torch._assert_async(valid, f"{name} must be {condition}")
    elif not bool(valid):  # on the CPU a host sync is free
        raise ValueError(f"{name} must be {condition}, got {value.detach().cpu().item()!r}")
    return value.reshape(())


def check_positive_number(name: str, value: object) -> float:
    """A finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_in_batch_negatives(
    in_batch_negatives: object,
    negative_keys: Tensor | None,
    labels: Tensor | None,
    negative_mode: NegativeMode = "unpaired",
) -> bool:
    """Resolve ``in_batch_negatives``: None means the seed's behaviour, or True with labels.

    In shared mode (not the seed's) None means True, as sentence-transformers
    scores every query against the batch's positive keys too.
    """
    if in_batch_negatives is not None:
        check_bool("in_batch_negatives", in_batch_negatives)
    if in_batch_negatives is None:
        shared = negative_keys is not None and negative_mode == "shared"
        return negative_keys is None or labels is not None or shared
    if not in_batch_negatives and negative_keys is None:
        raise ValueError(
            "in_batch_negatives=False needs explicit <negative_keys>, got negative_keys=None: "
            "a query would have no negatives"
        )
    if not in_batch_negatives and labels is not None:
        raise ValueError(
            "labels need in-batch candidates (positives come from the batch), "
            "got in_batch_negatives=False"
        )
    return bool(in_batch_negatives)


def check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return chunk_size


def _check_tensor(name: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"<{name}> must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOATING_DTYPES:
        raise TypeError(
            f"<{name}> must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {tensor.dtype}"
        )
    return tensor


def _check_dim(name: str, tensor: Tensor, dim: int, layout: str, condition: str = "") -> None:
    if tensor.dim() != dim:
        raise ValueError(
            f"<{name}> must have {dim} dimensions{condition} {layout}, "
            f"got {tensor.dim()} with shape {tuple(tensor.shape)}."
        )


def check_inputs(
    query: object,
    positive_key: object,
    negative_keys: object,
    negative_mode: NegativeMode,
    *,
    allow_empty: bool = False,
    key_name: str = "positive_key",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check the embeddings' types, shapes, dtypes and devices; return them typed.

    ``allow_empty``: B = 0 is allowed (a rank whose share of the batch is
    empty still takes part in the gathering). ``key_name``: what the
    messages call the second argument (`siglip_loss`'s ``key``).
    """
    query = _check_tensor("query", query)
    positive_key = _check_tensor(key_name, positive_key)
    named = [("query", query), (key_name, positive_key)]
    _check_dim("query", query, 2, "(B, D)")
    _check_dim(key_name, positive_key, 2, "(B, D)")
    if negative_keys is not None:
        negative_keys = _check_tensor("negative_keys", negative_keys)
        named.append(("negative_keys", negative_keys))
        if negative_mode == "unpaired":
            _check_dim(
                "negative_keys", negative_keys, 2, "(M, D)", " if <negative_mode> == 'unpaired'"
            )
        else:
            _check_dim(
                "negative_keys",
                negative_keys,
                3,
                "(B, M, D)",
                f" if <negative_mode> == {negative_mode!r}",
            )

    for name, tensor in named[1:]:
        _check_like(name, tensor, "query", query)

    if len(query) == 0 and not allow_empty:
        raise ValueError(f"<query> must hold at least one sample, got shape {tuple(query.shape)}")
    if query.shape[-1] == 0:
        raise ValueError(
            f"<query> must have at least one component (D >= 1), got shape {tuple(query.shape)}"
        )
    if len(query) != len(positive_key):
        raise ValueError(
            f"<query> and <{key_name}> must have the same number of samples, "
            f"got {len(query)} and {len(positive_key)}."
        )
    rows_of_negatives = len(query) if negative_keys is None else len(negative_keys)
    if negative_mode != "unpaired" and rows_of_negatives != len(query):
        raise ValueError(
            f"If negative_mode == {negative_mode!r}, then <negative_keys> must have the same "
            f"number of samples as <query>, got {rows_of_negatives} and {len(query)}."
        )
    for name, tensor in named[1:]:
        if tensor.shape[-1] != query.shape[-1]:
            raise ValueError(
                f"Vectors of <query> and <{name}> should have the same number of components, "
                f"got {query.shape[-1]} and {tensor.shape[-1]}."
            )
    return query, positive_key, negative_keys


def check_view_negatives(negative_keys: object, views: Tensor) -> Tensor | None:
    """NT-Xent's extra negatives: None, or (M, D) of the views' dtype, device and D."""
    if negative_keys is None:
        return None
    negatives = _check_tensor("negative_keys", negative_keys)
    _check_dim("negative_keys", negatives, 2, "(M, D)")
    _check_like("negative_keys", negatives, "views", views)
    if negatives.shape[1] != views.shape[-1]:
        raise ValueError(
            f"<negative_keys> must have shape (M, D) = (M, {views.shape[-1]}), "
            f"got shape {tuple(negatives.shape)}"
        )
    return negatives


def _check_like(name: str, tensor: Tensor, reference_name: str, reference: Tensor) -> None:
    """``tensor`` has the dtype and the device of ``reference``."""
    if tensor.dtype != reference.dtype:
        raise TypeError(
            f"<{name}> must have the same dtype as <{reference_name}> ({reference.dtype}), "
            f"got {tensor.dtype}"
        )
    if tensor.device != reference.device:
        raise ValueError(
            f"<{name}> must be on the same device as <{reference_name}> ({reference.device}), "
            f"got {tensor.device}"
        )


def check_labels(labels: object, query: Tensor) -> Tensor | None:
    if labels is None:
        return None
    return _check_label_tensor(
        labels, "B", len(query), query.device, "the same device as <query>", "or None"
    )


def check_negative_labels(
    negative_labels: object,
    labels: Tensor | None,
    negative_keys: Tensor | None,
    negative_mode: NegativeMode,
) -> Tensor | None:
    """(M,) integer labels of unpaired negatives, which need the queries' labels."""
    if negative_labels is None:
        return None
    if labels is None:
        raise ValueError(
            "negative_labels need labels (the queries' labels they are compared with), "
            "got labels=None"
        )
    if negative_keys is None:
        raise ValueError(
            "negative_labels need unpaired <negative_keys> (M, D), got negative_keys=None"
        )
    if negative_mode != "unpaired":
        raise ValueError(
            "negative_labels need unpaired negatives (negative_mode='unpaired'), "
            f"got negative_mode={negative_mode!r}"
        )
    return _check_label_tensor(
        negative_labels,
        "M",
        len(negative_keys),
        negative_keys.device,
        "the same device as <negative_keys>",
        "or None",
        name="negative_labels",
    )


def _check_label_tensor(
    labels: object,
    rows: str,
    length: int,
    device: torch.device,
    where: str,
    also: str = "",
    *,
    name: str = "labels",
) -> Tensor:
    """(length,) integer labels on ``device``; ``rows`` names the length, ``where`` the device."""
    if not isinstance(labels, Tensor):
        allowed = f"a torch.Tensor {also}".rstrip()
        raise TypeError(f"{name} must be {allowed}, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != (length,):
        raise ValueError(
            f"{name} must have shape ({rows},) = ({length},), got shape {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"{name} must be on {where} ({device}), got {labels.device}")
    return labels


def check_negative_mask(
    negative_mask: object,
    negative_keys: Tensor | None,
    negative_mode: NegativeMode,
) -> Tensor | None:
    if negative_mask is None:
        return None
    if negative_keys is None or negative_mode == "unpaired":
        raise ValueError(
            "negative_mask is only for paired or shared negatives (negative_mode='paired' or "
            f"'shared' with <negative_keys> (B, M, D)), got negative_mode={negative_mode!r} and "
            f"negative_keys={'None' if negative_keys is None else tuple(negative_keys.shape)}"
        )
    if not isinstance(negative_mask, Tensor):
        raise TypeError(
            f"negative_mask must be a bool torch.Tensor, got {type(negative_mask).__name__}"
        )
    if negative_mask.dtype != torch.bool:
        raise TypeError(f"negative_mask must be a bool tensor, got dtype {negative_mask.dtype}")
    expected = tuple(negative_keys.shape[:2])
    if tuple(negative_mask.shape) != expected:
        raise ValueError(
            f"negative_mask must have shape (B, M) = {expected}, "
            f"got shape {tuple(negative_mask.shape)}"
        )
    if negative_mask.device != negative_keys.device:
        raise ValueError(
            f"negative_mask must be on the same device as <negative_keys> "
            f"({negative_keys.device}), got {negative_mask.device}"
        )
    return negative_mask


def check_views(views: object, *, allow_empty: bool = False) -> Tensor:
    """NT-Xent's views, a (V, B, D) tensor or V >= 2 tensors (B, D), as one (V, B, D) tensor.

    ``allow_empty``: B = 0 is allowed (see `check_inputs`).
    """
    if isinstance(views, Tensor):
        stacked = _check_tensor("views", views)
        _check_dim("views", stacked, 3, "(V, B, D)", " when a tensor")
    elif isinstance(views, Sequence) and not isinstance(views, str):
        tensors = [_check_tensor(f"views[{v}]", view) for v, view in enumerate(views)]
        for v, view in enumerate(tensors):
            _check_dim(f"views[{v}]", view, 2, "(B, D)")
        for v, view in enumerate(tensors[1:], start=1):
            if view.dtype != tensors[0].dtype:
                raise TypeError(
                    f"<views[{v}]> must have the same dtype as <views[0]> ({tensors[0].dtype}), "
                    f"got {view.dtype}"
                )
            if view.device != tensors[0].device:
                raise ValueError(
                    f"<views[{v}]> must be on the same device as <views[0]> "
                    f"({tensors[0].device}), got {view.device}"
                )
            if view.shape != tensors[0].shape:
                raise ValueError(
                    f"<views[{v}]> must have the shape of <views[0]> {tuple(tensors[0].shape)}, "
                    f"got {tuple(view.shape)}"
                )
        if len(tensors) < 2:
            raise ValueError(f"views must hold at least 2 views, got {len(tensors)}")
        stacked = torch.stack(tensors)
    else:
        raise TypeError(
            "views must be a (V, B, D) torch.Tensor or a sequence of (B, D) tensors, "
            f"got {type(views).__name__}"
        )
    num_views, batch, dim = stacked.shape
    if num_views < 2:
        raise ValueError(f"views must hold at least 2 views, got shape {tuple(stacked.shape)}")
    if (batch == 0 and not allow_empty) or dim == 0:
        raise ValueError(
            "views must hold at least one sample (B >= 1) of at least one component (D >= 1), "
            f"got shape {tuple(stacked.shape)}"
        )
    return stacked


@dataclass(frozen=True)
class Variant:
    """Which row objective the losses use: InfoNCE's, the decoupled one, or the debiased one."""

    decoupled: bool = False
    false_negative_rate: float = 0.0  # tau+ of Chuang et al., in [0, 1)
    hard_negative_beta: float = 0.0  # beta of Robinson et al., >= 0

    @property
    def debiased(self) -> bool:
        """The debiased estimator of the negatives (with or without hard-negative weights)."""
        return self.false_negative_rate > 0 or self.hard_negative_beta > 0


@dataclass(frozen=True)
class Hardness:
    """Which negatives of the query-to-key row get ``strength * stopgrad(s)`` added to their logit.

    ``hard``: the explicit negatives that belong to the query (its paired or
    shared ones, every unpaired one); ``in_batch``: the other candidates
    (other rows' positive keys and, in shared mode, their negatives).
    """

    in_batch: bool = False
    hard: bool = False
    strength: float = 0.0  # alpha >= 0

    @property
    def active(self) -> bool:
        return self.strength > 0 and (self.in_batch or self.hard)


def check_hardness(
    hardness_mode: object,
    hardness_strength: object,
    *,
    labels: Tensor | None,
    variant: Variant,
) -> Hardness:
    """``hardness_mode`` and ``hardness_strength``: a known mode, alpha >= 0, no labels."""
    strength = _check_real("hardness_strength", hardness_strength)
    if not (math.isfinite(strength) and strength >= 0.0):
        raise ValueError(
            f"hardness_strength must be a finite number >= 0, got {hardness_strength!r}"
        )
    if hardness_mode is None:
        if strength:
            raise ValueError(
                f"hardness_strength={strength!r} needs a hardness_mode (one of "
                f"{_choices(HARDNESS_MODES)}), got hardness_mode=None"
            )
        return Hardness()
    if not isinstance(hardness_mode, str) or hardness_mode not in HARDNESS_MODES:
        raise ValueError(
            f"hardness_mode must be None or one of {_choices(HARDNESS_MODES)}, "
            f"got {hardness_mode!r}"
        )
    if labels is not None:
        raise ValueError(
            f"hardness_mode={hardness_mode!r} weighs the negatives of one positive per query "
            "and does not combine with labels, got labels"
        )
    _infonce_objective_only(f"hardness_mode={hardness_mode!r}", variant)
    return Hardness(
        in_batch=hardness_mode != "hard_negatives",
        hard=hardness_mode != "in_batch_negatives",
        strength=strength,
    )


@dataclass(frozen=True)
class Directions:
    """The directions of a joint partition besides query-to-key (all False: none).

    Pair i's loss is one cross-entropy over the union of its rows' logits in
    the selected directions, its target the query-to-key positive.
    """

    key_to_query: bool = False
    query_to_query: bool = False
    key_to_key: bool = False

    @property
    def joint(self) -> bool:
        return self.key_to_query or self.query_to_query or self.key_to_key


def check_directions(
    directions: object,
    partition: object,
    *,
    symmetric: bool,
    labels: Tensor | None,
    variant: Variant,
) -> tuple[bool, Directions]:
    """``directions`` and ``partition``: the symmetric flag they amount to, and a joint loss's.

    ``symmetric=True`` is ``directions=('query_to_key', 'key_to_query')`` with
    ``partition='per_direction'``; the per-direction partition of
    query-to-key alone is the plain loss.
    """
    if partition is not None and (not isinstance(partition, str) or partition not in PARTITIONS):
        raise ValueError(
            f"partition must be None or one of {_choices(PARTITIONS)}, got {partition!r}"
        )
    if directions is None:
        if symmetric and partition == "joint":
            raise ValueError(
                "symmetric=True is directions=('query_to_key', 'key_to_query') with "
                "partition='per_direction', got partition='joint'; give the directions instead"
            )
        return symmetric, Directions()
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise TypeError(
            f"directions must be None or a tuple of {_choices(DIRECTIONS)}, "
            f"got {type(directions).__name__} {directions!r}"
        )
    chosen = tuple(directions)
    unknown = [d for d in chosen if not isinstance(d, str) or d not in DIRECTIONS]
    if unknown:
        raise ValueError(
            f"directions must hold only {_choices(DIRECTIONS)}, got {unknown[0]!r} in {chosen!r}"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"directions must not repeat a direction, got {chosen!r}")
    if "query_to_key" not in chosen:
        raise ValueError(
            "directions must contain 'query_to_key' (the direction that holds the positive "
            f"pair), got {chosen!r}"
        )
    if partition is None:
        partition = "per_direction" if symmetric else "joint"
    if symmetric and (set(chosen) != {"query_to_key", "key_to_query"} or partition == "joint"):
        raise ValueError(
            "symmetric=True is directions=('query_to_key', 'key_to_query') with "
            f"partition='per_direction'; got directions={chosen!r} and partition={partition!r}"
        )
    same_type = [d for d in chosen if d in ("query_to_query", "key_to_key")]
    if partition == "per_direction" and same_type:
        raise ValueError(
            f"partition='per_direction' needs a positive in every direction's row, but "
            f"{same_type[0]!r} rows hold none; use partition='joint', got directions={chosen!r}"
        )
    if partition == "per_direction":
        return "key_to_query" in chosen, Directions()
    joint = Directions(
        key_to_query="key_to_query" in chosen,
        query_to_query="query_to_query" in chosen,
        key_to_key="key_to_key" in chosen,
    )
    if joint.joint and labels is not None:
        raise ValueError(
            f"labels take the default direction or symmetric=True only, got directions={chosen!r} "
            "with partition='joint'"
        )
    if joint.joint:
        _infonce_objective_only(f"directions={chosen!r} with partition='joint'", variant)
    return False, joint


@dataclass(frozen=True)
class FalseNegativeFilter:
    """Guided false-negative filtering: candidates too similar to their row's anchor are removed.

    With g_i the guide cosine of pair i, a candidate whose guide cosine with
    the anchor is above ``g_i - margin`` (absolute) or ``g_i - |g_i| margin``
    (relative) is no candidate of pair i. ``guide`` holds the guide
    embeddings of the queries, the positive keys and the negatives (None:
    the model's own, detached).
    """

    margin: float
    relative: bool
    guide: tuple[Tensor, ...] | None

    def threshold(self, positive_similarity: Tensor) -> Tensor:
        """(B,) the guide cosine above which a candidate of pair i is removed."""
        if self.relative:
            return positive_similarity - positive_similarity.abs() * self.margin
        return positive_similarity - self.margin


def check_false_negative_filter(
    false_negative_margin: object,
    margin_strategy: object,
    guide: object,
    *,
    query: Tensor,
    negative_keys: Tensor | None,
    labels: Tensor | None,
    variant: Variant,
) -> FalseNegativeFilter | None:
    """The margin, its strategy and the guide embeddings, checked against the inputs."""
    if not isinstance(margin_strategy, str) or margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(
            f"margin_strategy must be one of {_choices(MARGIN_STRATEGIES)}, got {margin_strategy!r}"
        )
    if false_negative_margin is None:
        if guide is not None:
            raise ValueError(
                "guide filters false negatives by false_negative_margin, got "
                "false_negative_margin=None; give a margin (0.0 is GISTEmbed's default)"
            )
        return None
    margin = _check_real("false_negative_margin", false_negative_margin)
    if not math.isfinite(margin):
        raise ValueError(
            f"false_negative_margin must be a finite number, got {false_negative_margin!r}"
        )
    if labels is not None:
        raise ValueError(
            f"false_negative_margin={margin!r} filters the negatives of one positive per query "
            "and does not combine with labels, got labels"
        )
    _infonce_objective_only(f"false_negative_margin={margin!r}", variant)
    checked = None if guide is None else _check_guide(guide, query, negative_keys)
    return FalseNegativeFilter(margin, margin_strategy == "relative", checked)


def _check_guide(guide: object, query: Tensor, negative_keys: Tensor | None) -> tuple[Tensor, ...]:
    """(guide_query, guide_positive_key[, guide_negative_keys]) shaped like their counterparts."""
    if not isinstance(guide, (tuple, list)) or len(guide) not in (2, 3):
        raise TypeError(
            "guide must be None or a tuple (guide_query, guide_positive_key[, "
            f"guide_negative_keys]), got {type(guide).__name__}"
            + (f" of length {len(guide)}" if isinstance(guide, (tuple, list)) else "")
        )
    names = ("guide_query", "guide_positive_key", "guide_negative_keys")
    tensors = [
        _check_tensor(f"guide[{i}] ({name})", x)
        for i, (name, x) in enumerate(zip(names[: len(guide)], guide, strict=True))
    ]
    has_negatives = len(tensors) == 3
    if has_negatives != (negative_keys is not None):
        raise ValueError(
            "guide must hold guide_negative_keys exactly when negative_keys are given, got "
            f"{len(tensors)} guide tensors and negative_keys="
            f"{'None' if negative_keys is None else tuple(negative_keys.shape)}"
        )
    width = tensors[0].shape[-1] if tensors[0].dim() else 0
    expected: list[tuple[int, ...]] = [(len(query), width), (len(query), width)]
    if negative_keys is not None:
        leading = tuple(negative_keys.shape[:-1])
        expected.append((*leading, width))
    for i, (tensor, shape) in enumerate(zip(tensors, expected, strict=True)):
        name = f"guide[{i}] ({names[i]})"
        if tuple(tensor.shape) != shape or width == 0:
            counterpart = "negative_keys" if i == 2 else ("query" if i == 0 else "positive_key")
            raise ValueError(
                f"<{name}> must have shape {(*shape[:-1], 'G')} like <{counterpart}>, with "
                f"one guide width G >= 1, got shape {tuple(tensor.shape)}"
            )
        if tensor.device != query.device:
            raise ValueError(
                f"<{name}> must be on the same device as <query> ({query.device}), "
                f"got {tensor.device}"
            )
    return tuple(tensors)


def check_shared_mode(negative_mode: NegativeMode, variant: Variant) -> None:
    """Shared negatives take the InfoNCE objective only."""
    if negative_mode == "shared":
        _infonce_objective_only("negative_mode='shared'", variant)


def _infonce_objective_only(option: str, variant: Variant) -> None:
    """``option`` (as the user wrote it) is refused with the decoupled or debiased objective."""
    if variant.decoupled or variant.debiased:
        raise ValueError(
            f"{option} is defined for the InfoNCE objective only, got "
            f"decoupled={variant.decoupled!r}, false_negative_rate="
            f"{variant.false_negative_rate!r}, hard_negative_beta={variant.hard_negative_beta!r}"
        )


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_variant(
    decoupled: object, false_negative_rate: object, hard_negative_beta: object, *, normalize: bool
) -> Variant:
    """The objective options: each in range, and only combinations that are defined."""
    decoupled = check_bool("decoupled", decoupled)
    rate = _check_real("false_negative_rate", false_negative_rate)
    if not 0.0 <= rate < 1.0:  # also refuses NaN
        raise ValueError(f"false_negative_rate must be in [0, 1), got {false_negative_rate!r}")
    beta = _check_real("hard_negative_beta", hard_negative_beta)
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(
            f"hard_negative_beta must be a finite number >= 0, got {hard_negative_beta!r}"
        )
    variant = Variant(decoupled, rate, beta)
    if decoupled and variant.debiased:
        raise ValueError(
            "decoupled=True does not combine with the debiased estimator: got "
            f"false_negative_rate={rate!r} and hard_negative_beta={beta!r}; the debiased "
            "loss keeps the positive in the denominator"
        )
    if variant.debiased and not normalize:
        raise ValueError(
            f"false_negative_rate={rate!r} / hard_negative_beta={beta!r} need normalize=True "
            "(the estimator's clamp assumes cosine similarities >= -1), got normalize=False"
        )
    return variant


def check_variant_inputs(
    variant: Variant, labels: Tensor | None, num_views: int | None = None
) -> None:
    """The debiased estimator needs exactly one positive per anchor."""
    if not variant.debiased:
        return
    options = (
        f"false_negative_rate={variant.false_negative_rate!r} / "
        f"hard_negative_beta={variant.hard_negative_beta!r}"
    )
    if labels is not None:
        raise ValueError(
            f"{options} need exactly one positive per anchor and do not combine with labels, "
            "got labels"
        )
    if num_views is not None and num_views != 2:
        raise ValueError(
            f"{options} need exactly one positive per anchor: with nt_xent, V = 2 views, "
            f"got V = {num_views}"
        )


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_storage_dtype(dtype: object) -> torch.dtype:
    if dtype not in FLOATING_DTYPES:
        raise TypeError(
            "dtype must be a floating-point dtype (torch.float16, torch.bfloat16, "
            f"torch.float32 or torch.float64), got {dtype!r}"
        )
    return dtype


def check_push(
    keys: object, labels: object, *, dim: int, with_labels: bool, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """A batch for `MemoryQueue.push`: (b, dim) floating keys, and labels as the queue has them."""
    keys = _check_tensor("keys", keys)
    if keys.dim() != 2 or keys.shape[1] != dim:
        raise ValueError(
            f"<keys> must have shape (b, dim) = (b, {dim}), got shape {tuple(keys.shape)}"
        )
    if keys.device != device:
        raise ValueError(f"<keys> must be on the queue's device ({device}), got {keys.device}")
    if not with_labels:
        if labels is not None:
            raise ValueError(
                "labels were pushed to a MemoryQueue built without labels; build it with "
                "labels=True, or push keys alone"
            )
        return keys, None
    if labels is None:
        raise ValueError(
            "this MemoryQueue was built with labels=True: push(keys, labels) needs labels, got None"
        )
    return keys, _check_label_tensor(labels, "b", len(keys), device, "the queue's device")
