"""The functional API: validate once, normalise, pick an implementation."""

from __future__ import annotations

import torch
from torch import Tensor

from info_nce import blockwise, distributed
from info_nce._normalize import normalization_eps, normalize
from info_nce._validation import (
    NegativeMode,
    Reduction,
    check_bool,
    check_chunk_size,
    check_in_batch_negatives,
    check_inputs,
    check_labels,
    check_negative_mask,
    check_negative_mode,
    check_reduction,
    check_temperature,
    reduce_loss,
)
from info_nce.dense import dense_info_nce

# Up to this many logits (B * candidates) the dense loss is as fast as the
# blockwise engine, and `chunk_size=None` picks it; see docs/benchmarks.md.
DENSE_MAX_LOGITS = 3 << 16
# Paired negatives without in-batch candidates: up to this many negative
# elements (B * M * D) the dense loss's fewer Python-level ops win.
DENSE_MAX_PAIRED_ELEMENTS = 1 << 16


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None = None,
    temperature: float | Tensor = 0.1,
    reduction: Reduction = "mean",
    negative_mode: NegativeMode = "unpaired",
    *,
    symmetric: bool = False,
    in_batch_negatives: bool | None = None,
    labels: Tensor | None = None,
    negative_mask: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int | None = None,
    gather_distributed: bool = False,
) -> Tensor:
    """InfoNCE loss of queries against their positive keys and negative keys.

    All embeddings are L2-normalised; query i's logits are its cosine
    similarities with its candidates divided by ``temperature``, and its loss is
    the cross-entropy with its positive as the target:

    * ``negative_keys=None``: the candidates are all B positive keys (the other
      rows' positives are the negatives); same as
      ``F.cross_entropy(q @ p.T / t, arange(B))``.
    * ``negative_mode='unpaired'``, negatives (M, D): the candidates are p_i and
      all M negatives; same as
      ``F.cross_entropy(cat([(q * p).sum(1, keepdim=True), q @ n.T], 1) / t, zeros(B))``.
    * ``negative_mode='paired'``, negatives (B, M, D): the candidates are p_i and
      query i's own M negatives.

    The arguments after ``negative_mode`` are keyword-only additions to
    info-nce-pytorch's API; their defaults keep its results.

    Args:
        query: queries, e.g. embeddings of the inputs.
        positive_key: positive keys, e.g. embeddings of augmented inputs.
        negative_keys: optional negative keys; see ``negative_mode``.
        temperature: logits are divided by it: a finite number > 0, or a
            one-element floating-point tensor (gradients flow into it).
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (one loss per query).
        negative_mode: ``'unpaired'`` (default) or ``'paired'``; how
            ``negative_keys`` relate to the queries.
        symmetric: the average of the query-to-key loss and the key-to-query
            loss (CLIP): key j ranks all B queries, query j (or, with labels,
            every query with its label) being its positive. Explicit negatives
            only enter the query-to-key direction. With ``reduction='none'``
            each sample's loss is the average of its two directions.
        in_batch_negatives: ``None`` keeps info-nce-pytorch's behaviour (the B
            positive keys are the candidates only when ``negative_keys`` is
            None; with labels, always). ``True`` with explicit negatives: query
            i's candidates are all B positive keys (target i) plus its explicit
            negatives. ``False`` needs explicit negatives.
        labels: (B,) integer tensor. Samples with equal labels are positives of
            one another: query i's loss is the mean over its positives j of
            ``logsumexp(candidates) - s_ij`` (supervised contrastive loss,
            Khosla et al. 2020, L_out). Needs in-batch candidates. With all
            labels distinct it equals the plain loss.
        negative_mask: (B, M) bool, paired mode only: False marks a padding
            negative, ignored as if absent. A row may have no valid negative.
        normalize: L2-normalise the embeddings (default). False uses raw dot
            products.
        chunk_size: ``None`` (default) picks the faster exact implementation:
            the dense loss for small problems, the blockwise engine (no (B, N)
            logits matrix) for large ones. A positive int forces the blockwise
            engine with that many queries per block (in paired mode without
            in-batch candidates, where no large matrix exists, it forces the
            engine's lean path). Results agree to floating-point rounding.
        gather_distributed: with an initialised default process group of W > 1
            processes, gather the candidates that other ranks hold (positive
            keys, unpaired negatives, labels, and for the symmetric loss the
            queries) with gradient: each rank's loss covers its own queries
            (and, symmetric, its own keys) against all ranks' candidates, and
            each embedding's gradient reaches the rank that owns it. With
            ``reduction='mean'`` each rank returns the mean over its own
            queries: with equal local batch sizes and gradients averaged across
            ranks (as DistributedDataParallel does), every parameter gradient,
            a learnable temperature's included, equals the single-process
            gradient on the concatenated batch, and the mean of the ranks'
            losses equals the single-process loss. ``'sum'`` and ``'none'``
            return this rank's sum and rows, so unequal local batch sizes are
            handled exactly by scaling a sum. Without a process group, or with
            W = 1, it changes nothing.

    Shape:
        - query: (B, D), B queries of D features.
        - positive_key: (B, D).
        - negative_keys: (M, D) if unpaired, (B, M, D) if paired, M negatives.
        - labels: (B,). negative_mask: (B, M).
        - output: scalar, or (B,) if ``reduction='none'``.

    Returns:
        The loss. Its dtype is the inputs' dtype, except float32 for float16
        and bfloat16 inputs (softmax statistics are kept in float32).

    Raises:
        TypeError: an input is not a floating-point tensor, the inputs' dtypes
            differ, labels are not integers, the mask is not bool, a flag is not
            a bool, or the temperature is not a number.
        ValueError: wrong shapes, empty inputs, different devices, an unknown
            ``reduction``/``negative_mode``, a temperature that is not finite
            and > 0, a ``chunk_size`` that is not a positive int, or options
            that do not fit together.

    Examples:
        >>> import torch
        >>> from info_nce import info_nce
        >>> query, positive_key = torch.randn(32, 128), torch.randn(32, 128)
        >>> loss = info_nce(query, positive_key, temperature=0.1)
        >>> loss.shape
        torch.Size([])
        >>> negatives = torch.randn(32, 6, 128)
        >>> info_nce(query, positive_key, negatives, negative_mode="paired").shape
        torch.Size([])
        >>> labels = torch.randint(0, 4, (32,))
        >>> info_nce(query, positive_key, labels=labels, symmetric=True, reduction="none").shape
        torch.Size([32])
    """
    reduction = check_reduction(reduction)
    negative_mode = check_negative_mode(negative_mode)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    symmetric = check_bool("symmetric", symmetric)
    gather_distributed = check_bool("gather_distributed", gather_distributed)
    normalize = check_bool("normalize", normalize)
    query, positive_key, negative_keys = check_inputs(
        query, positive_key, negative_keys, negative_mode
    )
    labels = check_labels(labels, query)
    negative_mask = check_negative_mask(negative_mask, negative_keys, negative_mode)
    in_batch = check_in_batch_negatives(in_batch_negatives, negative_keys, labels)

    # Losses of float16/bfloat16 inputs are computed in float32.
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(compute_dtype)
    paired = negative_keys is not None and negative_mode == "paired"
    matrix_candidates = (len(query) if in_batch else 0) + (
        negative_keys.shape[-2] if negative_keys is not None else 0
    )
    gather = gather_distributed and distributed.world_size() > 1
    if gather:
        use_dense = False  # the engine takes queries and keys of different lengths
    elif chunk_size is not None:
        use_dense = False
    elif paired and not in_batch:
        assert negative_keys is not None
        use_dense = negative_keys.numel() <= DENSE_MAX_PAIRED_ELEMENTS
    else:
        use_dense = len(query) * matrix_candidates <= DENSE_MAX_LOGITS

    unit = _unit if normalize else _identity
    if use_dense:
        return dense_info_nce(
            unit(query),
            unit(positive_key),
            None if negative_keys is None else unit(negative_keys),
            temperature,
            reduction,
            negative_mode,
            symmetric=symmetric,
            in_batch=in_batch,
            labels=labels,
            negative_mask=negative_mask,
        )

    return _engine_loss(
        query.to(compute_dtype),
        positive_key.to(compute_dtype),
        negative_keys,
        temperature,
        reduction,
        paired=paired,
        in_batch=in_batch,
        symmetric=symmetric,
        labels=labels,
        negative_mask=negative_mask,
        normalize=normalize,
        chunk_size=chunk_size,
        gather=gather,
        eps=normalization_eps(query.dtype),
    )


def _engine_loss(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float | Tensor,
    reduction: Reduction,
    *,
    paired: bool,
    in_batch: bool,
    symmetric: bool,
    labels: Tensor | None,
    negative_mask: Tensor | None,
    normalize: bool,
    chunk_size: int | None,
    gather: bool,
    eps: float,
) -> Tensor:
    """The loss through the blockwise engine, on raw (B, D) query and positive keys.

    The engine's Function normalises, divides by the temperature and (in-batch,
    without labels) subtracts the positive logits itself, in place: no
    normalised copy of a (B, D) input exists on that path. What it does not
    cover (positive logits with labels or without in-batch candidates, paired
    negatives) is O(B * D) autograd ops on normalised copies made only then.
    """
    compute_dtype = query.dtype
    unit = _unit if normalize else _identity
    # A tensor temperature is an input of the engine's Function (it gets a gradient).
    engine_temperature = temperature if isinstance(temperature, Tensor) else None
    fixed_temperature = 1.0 if isinstance(temperature, Tensor) else temperature

    # Candidates held by every rank: gathered with gradient (all ranks' rows,
    # this rank's from `offset`); without a process group, the local tensors.
    gather_rows = _Gatherer(len(query), query.device) if gather else None
    offset = 0 if gather_rows is None else gather_rows.offset
    all_positive_keys = positive_key  # (B_all, D) where in-batch candidates or labels need them
    if gather_rows is not None and (in_batch or labels is not None):
        all_positive_keys = gather_rows(positive_key)
    all_labels = labels if labels is None or gather_rows is None else gather_rows(labels)

    row_scale = 0.5 if symmetric else 1.0
    # The symmetric key-to-query direction in the same pass as the rows needs
    # the same queries on both sides: not so once keys come from other ranks.
    columns_in_pass = symmetric and in_batch and not gather
    column_queries = None  # (B_all, D) all queries, for a separate key-to-query pass
    if symmetric and not columns_in_pass:
        column_queries = query if gather_rows is None else gather_rows(query)
    # Without labels, query i's in-batch positive is key `offset + i`: the engine's target.
    targets_in_engine = labels is None

    extra: list[Tensor] = []  # per-query candidates' logits, (B, E_k) each
    keys: list[Tensor] = []  # candidates shared by all queries, (N_k, D) each
    positive_logit = None  # (B,) positive logits the engine does not subtract
    if labels is not None or not in_batch or paired:
        scaled_query = unit(query) / temperature  # (B, D)
    if all_labels is not None:
        scaled_column_queries = None  # (B_all, D) for the key-to-query positives
        if symmetric:
            scaled_column_queries = (
                scaled_query if column_queries is None else unit(column_queries) / temperature
            )
        positive_logit = _positive_logits(
            scaled_query,
            unit(positive_key),
            unit(all_positive_keys),
            scaled_column_queries,
            all_labels,
            offset,
            row_scale,
        )
    if in_batch:
        keys.append(all_positive_keys)
    else:
        own_positive = torch.sum(scaled_query * unit(positive_key), dim=1, keepdim=True)  # (B, 1)
        extra.append(own_positive)
        positive_logit = row_scale * own_positive.squeeze(1)
    if negative_keys is not None and paired:
        options = blockwise.PairedOptions(
            normalize_negatives=normalize, eps=normalization_eps(negative_keys.dtype)
        )
        negative_logits = blockwise.paired_logits(
            scaled_query, negative_keys.to(compute_dtype), options
        )  # (B, M)
        if negative_mask is not None:
            negative_logits = negative_logits.masked_fill(~negative_mask, float("-inf"))
        extra.append(negative_logits)
    elif negative_keys is not None:
        negatives = negative_keys.to(compute_dtype)  # (M, D)
        if gather:
            negatives = _Gatherer(len(negatives), negatives.device)(negatives)
        keys.append(negatives)

    key_count = sum(len(k) for k in keys)
    block_rows = chunk_size or blockwise.default_block_rows(len(query), key_count + len(extra))
    inputs = (query, positive_key, *keys, *extra, column_queries, engine_temperature)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if keys:
        loss = blockwise.log_sum_exp(
            query,
            keys[0] if len(keys) == 1 else torch.cat(keys),
            _cat_columns(extra),
            engine_temperature,
            blockwise.LogSumExpOptions(
                reduction=reduction,
                block_rows=block_rows,
                column_keys=len(query) if columns_in_pass else 0,
                row_scale=row_scale,
                column_scale=0.5 if columns_in_pass else 0.0,
                target_offset=offset if in_batch and targets_in_engine else None,
                normalize=normalize,
                eps=eps,
                temperature=fixed_temperature,
                grads_in_forward=needs_grad and reduction != "none" and not columns_in_pass,
            ),
        )
    else:
        # Paired negatives only: the logits are (B, 1 + M), no large matrix.
        loss = reduce_loss(row_scale * _small_lse(extra), reduction)
    if column_queries is not None:
        # The key-to-query direction on its own: each key against all queries.
        loss = loss + blockwise.log_sum_exp(
            positive_key,
            column_queries,
            None,
            engine_temperature,
            blockwise.LogSumExpOptions(
                reduction=reduction,
                block_rows=chunk_size
                or blockwise.default_block_rows(len(query), len(column_queries)),
                row_scale=0.5,
                target_offset=offset if targets_in_engine else None,
                normalize=normalize,
                eps=eps,
                temperature=fixed_temperature,
                grads_in_forward=needs_grad and reduction != "none",
            ),
        )
    if positive_logit is not None:
        loss = loss - reduce_loss(positive_logit, reduction)
    return loss


class _Gatherer:
    """Gathers tensors of this rank's row count from all ranks (rows differ between ranks)."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.sizes = distributed.gather_sizes(rows, device)
        self.offset = sum(self.sizes[: distributed.rank()])

    def __call__(self, tensor: Tensor) -> Tensor:
        return distributed.all_gather(tensor, self.sizes)


def _unit(x: Tensor) -> Tensor:
    unit: Tensor = normalize(x)
    return unit


def _identity(x: Tensor) -> Tensor:
    return x


def _cat_columns(pieces: list[Tensor]) -> Tensor | None:
    if not pieces:
        return None
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _small_lse(pieces: list[Tensor]) -> Tensor:
    """logsumexp over the columns of several (B, k) pieces without concatenating them."""
    row_max = torch.stack([piece.amax(dim=1) for piece in pieces if piece.shape[1]]).amax(0)
    row_max = row_max.detach()  # the result does not depend on the shift
    total = sum(torch.exp(piece - row_max.unsqueeze(1)).sum(dim=1) for piece in pieces)
    assert isinstance(total, Tensor)
    return row_max + total.log()


def _positive_logits(
    scaled_query: Tensor,
    positive_key: Tensor,
    all_positive_keys: Tensor,
    all_scaled_queries: Tensor | None,
    all_labels: Tensor,
    offset: int,
    row_scale: float,
) -> Tensor:
    """Per local sample: the weighted mean logit of its positives under labels. (B,)

    Query i's positives are all keys with its label (on every rank): the mean of
    their logits is ``q_i . mean(keys of its class)``, computed from per-class
    sums in O((B + classes) * D), without a (B, B) mask. With
    ``all_scaled_queries`` (the symmetric loss) key i's positives, the queries
    with its label, are added with weight 1/2. Local row i is row
    ``offset + i`` of the ``all_*`` tensors.
    """
    _, label_index, counts = torch.unique(all_labels, return_inverse=True, return_counts=True)
    local = slice(offset, offset + len(scaled_query))
    sizes = counts[label_index[local]].to(scaled_query.dtype).unsqueeze(1)  # (B, 1)

    def class_mean(values: Tensor) -> Tensor:  # (B, D): mean of all rows with each local label
        sums = values.new_zeros(len(counts), values.shape[1]).index_add(0, label_index, values)
        mean: Tensor = sums[label_index[local]] / sizes
        return mean

    logit = row_scale * torch.sum(scaled_query * class_mean(all_positive_keys), dim=1)
    if all_scaled_queries is not None:
        logit = logit + 0.5 * torch.sum(positive_key * class_mean(all_scaled_queries), dim=1)
    return logit
