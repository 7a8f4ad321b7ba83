"""The functional API: validate once, build the problem, dispatch (dense | engine)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from info_nce import _normalize, _problem, distributed, engine
from info_nce._validation import (
    Anchors,
    Direction,
    HardnessMode,
    MarginStrategy,
    NegativeMode,
    Partition,
    Reduction,
    check_anchors,
    check_bias,
    check_bool,
    check_chunk_size,
    check_directions,
    check_false_negative_filter,
    check_hardness,
    check_in_batch_negatives,
    check_inputs,
    check_labels,
    check_negative_labels,
    check_negative_mask,
    check_negative_mode,
    check_reduction,
    check_shared_mode,
    check_temperature,
    check_variant,
    check_variant_inputs,
    check_view_negatives,
    check_views,
)
from info_nce.dense import dense_info_nce, dense_nt_xent, dense_siglip

# Up to this many logits (rows * candidates) the dense loss is as fast as the
# blockwise engine, and `chunk_size=None` picks it; see docs/benchmarks.md.
DENSE_MAX_LOGITS = 3 << 16
# The sigmoid loss's dense path does more elementwise work per logit than
# the engine's blocks: fwd+bwd, D=128, 2 cores, dense / engine 2.06 / 2.33 ms
# at 192^2 logits, 2.62 / 2.82 and 3.96 / 2.97 (two runs) at 256^2, 5.02 /
# 4.44 at 443^2.
SIGLIP_DENSE_MAX_LOGITS = 1 << 16
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
    negative_labels: Tensor | None = None,
    negative_mask: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int | None = None,
    gather_distributed: bool = False,
    decoupled: bool = False,
    false_negative_rate: float = 0.0,
    hard_negative_beta: float = 0.0,
    hardness_mode: HardnessMode | None = None,
    hardness_strength: float = 0.0,
    directions: Sequence[Direction] | None = None,
    partition: Partition | None = None,
    false_negative_margin: float | None = None,
    margin_strategy: MarginStrategy = "absolute",
    guide: Sequence[Tensor] | None = None,
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
    * ``negative_mode='shared'``, negatives (B, M, D): the candidates are all B
      positive keys and all B * M negatives (sentence-transformers' hard-negative
      columns); ``negative_keys[i]`` are query i's own; same as
      ``F.cross_entropy(cat([q @ p.T, q @ n.flatten(0, 1).T], 1) / t, arange(B))``.

    The arguments after ``negative_mode`` are keyword-only additions to
    info-nce-pytorch's API; their defaults keep its results.

    Args:
        query: queries, e.g. embeddings of the inputs.
        positive_key: positive keys, e.g. embeddings of augmented inputs.
        negative_keys: optional negative keys; see ``negative_mode``.
        temperature: logits are divided by it: a finite number > 0, or a
            one-element floating-point tensor (gradients flow into it).
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (one loss per query).
        negative_mode: ``'unpaired'`` (default), ``'paired'`` or
            ``'shared'``; how ``negative_keys`` relate to the queries.
        symmetric: the average of the query-to-key loss and the key-to-query
            loss (CLIP): key j ranks all B queries, query j (or, with labels,
            every query with its label) being its positive. Explicit negatives
            only enter the query-to-key direction. With ``reduction='none'``
            each sample's loss is the average of its two directions.
        in_batch_negatives: ``None`` keeps info-nce-pytorch's behaviour (the B
            positive keys are the candidates only when ``negative_keys`` is
            None; with labels, always; in shared mode, always). ``True`` with
            explicit negatives: query i's candidates are all B positive keys
            (target i) plus its explicit negatives. ``False`` needs explicit
            negatives.
        labels: (B,) integer tensor. Samples with equal labels are positives of
            one another: query i's loss is the mean over its positives j of
            ``logsumexp(candidates) - s_ij`` (supervised contrastive loss,
            Khosla et al. 2020, L_out). Needs in-batch candidates. With all
            labels distinct it equals the plain loss.
        negative_labels: (M,) integer labels of unpaired negatives (a
            `MemoryQueue`'s ``labels``: cross-batch memory), with ``labels``.
            A negative with query i's label is one of its positives: it joins
            the mean over positives (and, as every positive, stays in the
            denominator; with ``decoupled`` it leaves it). Negatives with
            other labels stay negatives. The symmetric loss's key-to-query
            direction does not see the negatives.
        negative_mask: (B, M) bool, paired or shared mode: False marks a
            padding negative, ignored as if absent (in shared mode, for every
            query). A row may have no valid negative.
        normalize: L2-normalise the embeddings (default). False uses raw dot
            products.
        chunk_size: ``None`` (default) picks the faster exact implementation:
            the dense loss for small problems, the blockwise engine (no (B, N)
            logits matrix) for large ones. A positive int forces the blockwise
            engine with that many queries per block, each block against
            complete rows of candidates (``None`` may instead walk very long
            rows of keys without gradient, such as a queue, in column tiles);
            in paired mode without in-batch candidates, where no large matrix
            exists, it forces the engine's lean path. Results agree to
            floating-point rounding.
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
            handled exactly by scaling a sum. A rank whose share of the batch
            is empty (B = 0, the tail of an uneven epoch) takes part in the
            gathering and returns 0 (``'none'``: shape (0,)) without
            gradient, so no rank waits for it. Without a process group, or
            with W = 1, it changes nothing.
        decoupled: decoupled contrastive learning (Yeh et al. 2022): the
            positives leave the denominator, so query i's loss is
            ``logsumexp(negatives' logits) - mean(positives' logits)``. Works
            with every other option (symmetric: both directions decoupled;
            labels: every positive leaves the denominator). A row left with no
            negative (e.g. all its paired negatives masked) has loss 0 and no
            gradient. Not with the two options below.
        false_negative_rate: tau+ in [0, 1) of debiased contrastive learning
            (Chuang et al. 2020), the probability that a sampled negative shares
            the anchor's class. With positive logit ``s+`` and N negatives'
            logits ``s_j``, ``Ng = max((sum_j exp(s_j) - tau+ N exp(s+)) /
            (1 - tau+), N exp(-1/t))`` and the loss is ``log(exp(s+) + Ng) -
            s+``, computed in log space. 0 (default) is the plain loss.
        hard_negative_beta: beta >= 0 of hard negative sampling (Robinson et
            al. 2021): in ``Ng`` above, ``sum_j exp(s_j)`` becomes ``N * sum_j
            w_j exp(s_j) / sum_j w_j`` with ``w_j = exp(beta s_j)``; gradients
            flow through the weights. 0 (default) is the debiased loss. This
            and ``false_negative_rate`` need one positive per query (no
            ``labels``) and ``normalize=True``; N counts valid negatives only.
        hardness_mode: hardness weighting (Lan et al. 2025; EmbeddingGemma):
            ``None`` (default), ``'hard_negatives'`` (query i's own explicit
            negatives: its paired or shared ones, every unpaired one),
            ``'in_batch_negatives'`` (the other candidates: other rows'
            positive keys and shared negatives) or ``'all_negatives'``. The
            query-to-key logit of each selected negative with similarity s
            (the cosine, or the dot product without ``normalize``) becomes
            ``s / t + hardness_strength * stopgrad(s)``; the positive is never
            raised. Not with ``labels``, ``decoupled`` or the debiased loss.
            As sentence-transformers' ``MultipleNegativesRankingLoss``.
        hardness_strength: alpha >= 0 of ``hardness_mode``; 0 (default) is the
            plain loss. A strength without a mode is an error.
        directions: which rows pair i is scored in, a tuple of
            ``'query_to_key'`` (q_i against its candidates; required),
            ``'key_to_query'`` (k_i against all queries, q_i its positive;
            explicit negatives never rank queries), ``'query_to_query'`` (q_i
            against the other queries) and ``'key_to_key'`` (k_i against the
            keys among q_i's candidates that are not pair i's: the other
            positive keys, other rows' shared negatives, unpaired negatives).
            ``None`` (default): query to key alone, or with ``symmetric=True``
            the symmetric loss. As sentence-transformers'
            ``MultipleNegativesRankingLoss`` (its ``doc`` is our key).
        partition: ``'joint'``: pair i's loss is one cross-entropy over the
            union of its rows in all directions, its target s(q_i, k_i) (GTE's
            improved contrastive loss, Li et al. 2023; the key-to-query row's
            own s(k_i, q_i) stays in the denominator). ``'per_direction'``: the
            mean of each direction's cross-entropy, only for directions whose
            rows hold the positive (``symmetric=True`` is query to key and key
            to query per direction). ``None`` (default): ``'joint'``, or
            ``'per_direction'`` with ``symmetric=True``. A joint loss of more
            than one direction takes no ``labels``, ``decoupled`` or debiased
            loss.
        false_negative_margin: guided false-negative filtering (GISTEmbed,
            Solatorio 2024; Qwen3-Embedding): ``None`` (default) filters
            nothing. With g_i the guide cosine of (q_i, k_i), a candidate of
            pair i whose guide cosine with its row's anchor is above ``g_i -
            margin`` (absolute) is removed, as if absent, in every direction;
            pair i's positive (and, key to query, q_i) never. A negative
            margin removes only candidates more similar than the positive by
            more than it. Not with ``labels``, ``decoupled`` or the debiased
            loss.
        margin_strategy: ``'absolute'`` (default) or ``'relative'``: the
            threshold ``g_i - |g_i| * margin``.
        guide: ``(guide_query, guide_positive_key)`` or, with
            ``negative_keys``, ``(guide_query, guide_positive_key,
            guide_negative_keys)``: embeddings of the same inputs by a guide
            model, of any width G, compared by cosine, without gradient, and
            gathered like their counterparts. ``None`` (default): the model's
            own embeddings, detached (a self-guided filter). Needs
            ``false_negative_margin``. GISTEmbedLoss (temperature 0.01,
            margin 0) is ``directions=('query_to_key', 'query_to_query',
            'key_to_key')`` with the guide.

    Shape:
        - query: (B, D), B queries of D features.
        - positive_key: (B, D).
        - negative_keys: (M, D) if unpaired, (B, M, D) if paired or shared,
          M negatives.
        - labels: (B,). negative_labels: (M,). negative_mask: (B, M).
        - guide: (B, G), (B, G) and (M, G) or (B, M, G) like the negatives.
        - output: scalar, or (B,) if ``reduction='none'``.

    Returns:
        The loss. Its dtype is the inputs' dtype, except float32 for float16
        and bfloat16 inputs (softmax statistics are kept in float32). Under
        ``torch.autocast`` the similarity products run in autocast's dtype
        and the statistics, loss and gradient accumulation in float32, on
        the dense path and the engine alike; so do float16/bfloat16 inputs'
        products in their own dtype on a GPU.

    Raises:
        TypeError: an input is not a floating-point tensor, the inputs' dtypes
            differ, labels are not integers, the mask is not bool, a flag is not
            a bool, or the temperature is not a number.
        ValueError: wrong shapes, empty inputs, different devices, an unknown
            ``reduction``/``negative_mode``, a temperature that is not finite
            and > 0, a ``chunk_size`` that is not a positive int, a
            ``false_negative_rate`` outside [0, 1) or a negative
            ``hard_negative_beta``, an unknown ``hardness_mode`` or a negative
            ``hardness_strength``, or options that do not fit together (the
            message names both).

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
        >>> info_nce(query, positive_key, decoupled=True).shape
        torch.Size([])
        >>> debiased = info_nce(query, positive_key, false_negative_rate=0.1)
        >>> hard = info_nce(query, positive_key, false_negative_rate=0.1, hard_negative_beta=1.0)
        >>> mined = torch.randn(32, 3, 128)  # 3 hard negatives per query, shared by all
        >>> info_nce(
        ...     query, positive_key, mined, negative_mode="shared",
        ...     hardness_mode="all_negatives", hardness_strength=5.0,
        ... ).shape
        torch.Size([])
        >>> gte = ("query_to_key", "key_to_query", "query_to_query", "key_to_key")
        >>> info_nce(query, positive_key, directions=gte).shape
        torch.Size([])
        >>> guide = (torch.randn(32, 64), torch.randn(32, 64))  # a guide model's embeddings
        >>> info_nce(query, positive_key, false_negative_margin=0.0, guide=guide).shape
        torch.Size([])
    """
    reduction = check_reduction(reduction)
    negative_mode = check_negative_mode(negative_mode)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    symmetric = check_bool("symmetric", symmetric)
    gather_distributed = check_bool("gather_distributed", gather_distributed)
    normalize = check_bool("normalize", normalize)
    # A rank with an empty share of a gathered batch still takes part.
    gather = gather_distributed and distributed.world_size() > 1
    query, positive_key, negative_keys = check_inputs(
        query, positive_key, negative_keys, negative_mode, allow_empty=gather
    )
    labels = check_labels(labels, query)
    negative_labels = check_negative_labels(negative_labels, labels, negative_keys, negative_mode)
    negative_mask = check_negative_mask(negative_mask, negative_keys, negative_mode)
    in_batch = check_in_batch_negatives(in_batch_negatives, negative_keys, labels, negative_mode)
    variant = check_variant(decoupled, false_negative_rate, hard_negative_beta, normalize=normalize)
    check_variant_inputs(variant, labels)
    check_shared_mode(negative_mode, variant)
    hardness = check_hardness(hardness_mode, hardness_strength, labels=labels, variant=variant)
    symmetric, joint = check_directions(
        directions, partition, symmetric=symmetric, labels=labels, variant=variant
    )
    false_negatives = check_false_negative_filter(
        false_negative_margin,
        margin_strategy,
        guide,
        query=query,
        negative_keys=negative_keys,
        labels=labels,
        variant=variant,
    )

    compute_dtype = _compute_dtype(query)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(compute_dtype)
    paired = negative_keys is not None and negative_mode == "paired"
    shared = negative_keys is not None and negative_mode == "shared"
    if gather or chunk_size is not None:
        use_dense = False  # the engine takes queries and keys of different lengths
    elif paired and not in_batch:
        assert negative_keys is not None
        use_dense = negative_keys.numel() <= DENSE_MAX_PAIRED_ELEMENTS
    else:
        negatives = 0 if negative_keys is None else negative_keys.shape[-2]
        if shared:  # every query against all B * M negatives
            assert negative_keys is not None
            negatives *= len(negative_keys)
        candidates = (len(query) if in_batch else 0) + negatives
        candidates *= 2 if joint.key_to_key else 1  # about: key to key sees them too
        candidates += len(query) * (joint.query_to_query + joint.key_to_query)
        use_dense = len(query) * candidates <= DENSE_MAX_LOGITS

    if use_dense:
        unit = _normalize.unit_fn(normalize)
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
            negative_labels=negative_labels,
            negative_mask=negative_mask,
            variant=variant,
            hardness=hardness,
            directions=joint,
            false_negatives=false_negatives,
        )
    problem = _problem.info_nce_problem(
        query.to(compute_dtype),
        positive_key.to(compute_dtype),
        negative_keys,
        temperature,
        reduction,
        paired=paired,
        shared=shared,
        in_batch=in_batch,
        symmetric=symmetric,
        labels=labels,
        negative_labels=negative_labels,
        negative_mask=negative_mask,
        normalize=normalize,
        chunk_size=chunk_size,
        gather=gather,
        eps=_normalize.normalization_eps(query.dtype),
        product_dtype=engine.product_dtype(query),
        variant=variant,
        hardness=hardness,
        directions=joint,
        false_negatives=false_negatives,
    )
    return engine.run(problem)


def nt_xent(
    views: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    temperature: float | Tensor = 0.1,
    reduction: Reduction = "mean",
    *,
    anchors: Anchors = "all",
    normalize: bool = True,
    chunk_size: int | None = None,
    gather_distributed: bool = False,
    decoupled: bool = False,
    false_negative_rate: float = 0.0,
    hard_negative_beta: float = 0.0,
    negative_keys: Tensor | None = None,
    negative_labels: Tensor | None = None,
) -> Tensor:
    """NT-Xent (SimCLR) over V views: every embedding against all the others, itself excluded.

    Embedding (v, i) is view v of sample i. Its candidates are all V * B - 1
    other embeddings; its positives are the other views of sample i and, with
    ``labels``, every candidate whose sample shares its label. Its loss is
    ``logsumexp(candidates' logits) - mean(positives' logits)``, the logits
    being cosine similarities (dot products without ``normalize``) divided by
    ``temperature`` (SupCon's L_out). Plain PyTorch, for V = 2 without labels::

        z = F.normalize(torch.cat([z1, z2]), dim=1)           # (2B, D)
        logits = (z @ z.T / t).fill_diagonal_(float("-inf"))  # (2B, 2B), itself excluded
        targets = torch.arange(2 * B).roll(B)                 # (v, i)'s positive is (1 - v, i)
        loss = F.cross_entropy(logits, targets)

    That is SimCLR's NT-Xent with 2B - 1 candidates per anchor (lightly's
    ``NTXentLoss`` without a memory bank); with labels it is SupCon with
    ``contrast_mode='all'`` and ``base_temperature`` equal to the
    temperature, and ``anchors='first'`` is SupCon's ``contrast_mode='one'``.
    Unlike ``info_nce(z1, z2, symmetric=True)`` (CLIP), an anchor's
    candidates include the other embeddings of its own view.

    Args:
        views: a (V, B, D) tensor, or a sequence of V >= 2 tensors (B, D) of one
            dtype and device.
        labels: optional (B,) integer tensor; samples with equal labels are
            positives of one another (all their views).
        temperature: logits are divided by it: a finite number > 0, or a
            one-element floating-point tensor (gradients flow into it).
        reduction: ``'mean'`` over the anchors, ``'sum'``, or ``'none'``.
        anchors: ``'all'`` (every embedding is an anchor) or ``'first'`` (only
            view 0's; the candidates stay all the others).
        normalize: L2-normalise the embeddings (default). False uses raw dot
            products.
        chunk_size: ``None`` (default) picks the dense loss for small problems
            and the blockwise engine (no (V * B)^2 logits or mask) for large
            ones; a positive int forces the engine with that many anchors per
            block, against complete rows (no column tiles).
        gather_distributed: with an initialised process group of W > 1
            processes, each rank's anchors (its own V * B embeddings) are
            scored against all ranks' embeddings, with gradients reaching the
            owning rank: the contract of `info_nce`'s ``gather_distributed``.
            Every rank must pass the same V; local batch sizes may differ, and
            may be 0 (that rank returns 0, see `info_nce`).
        decoupled: the positives leave the denominator: anchor (v, i)'s loss is
            ``logsumexp(negatives' logits) - mean(positives' logits)``. With V = 2
            and no labels this is lightly's ``DCLLoss`` (without a weighting
            function). See `info_nce`.
        false_negative_rate: tau+ in [0, 1) of the debiased loss (see
            `info_nce`); only for V = 2 without labels.
        hard_negative_beta: beta >= 0 of the hard-negative loss (see
            `info_nce`); only for V = 2 without labels.
        negative_keys: optional (M, D) extra negatives of every anchor, e.g.
            a `MemoryQueue`'s ``keys`` (SimCLR or SupCon with a memory bank):
            candidates of every anchor, never anchors themselves. With
            ``gather_distributed`` they are gathered like the views.
        negative_labels: optional (M,) integer labels of ``negative_keys``,
            with ``labels``: an entry with an anchor's label is one of its
            positives (see `info_nce`).

    Shape:
        - views: (V, B, D), V views of B samples with D features, or V tensors (B, D).
        - labels: (B,). negative_keys: (M, D). negative_labels: (M,).
        - output: scalar; ``reduction='none'``: (V, B) with ``anchors='all'``,
          (B,) with ``anchors='first'``.

    Returns:
        The loss. Its dtype is the views' dtype, except float32 for float16
        and bfloat16 views. Under ``torch.autocast``: as `info_nce`.

    Raises:
        TypeError: views that are not floating-point tensors or of different
            dtypes, labels that are not integers, a flag that is not a bool, a
            temperature that is not a number.
        ValueError: fewer than 2 views, views of different shapes or devices,
            a sequence element that is not 2-D or a tensor that is not 3-D,
            empty views, labels of the wrong shape, an unknown
            ``anchors``/``reduction``, a temperature that is not finite and > 0,
            a ``chunk_size`` that is not a positive int, a variant option out of
            its range or outside its scope (the message names both options).

    Examples:
        >>> import torch
        >>> from info_nce import nt_xent
        >>> z1, z2 = torch.randn(32, 128), torch.randn(32, 128)
        >>> nt_xent([z1, z2]).shape
        torch.Size([])
        >>> views = torch.randn(4, 32, 128)  # V = 4 views
        >>> nt_xent(views, labels=torch.randint(0, 5, (32,)), reduction="none").shape
        torch.Size([4, 32])
        >>> nt_xent(views, anchors="first", reduction="none").shape
        torch.Size([32])
        >>> nt_xent([z1, z2], temperature=0.5, decoupled=True).shape
        torch.Size([])
        >>> hcl = nt_xent([z1, z2], hard_negative_beta=1.0, false_negative_rate=0.1)
    """
    reduction = check_reduction(reduction)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    anchors = check_anchors(anchors)
    normalize = check_bool("normalize", normalize)
    gather_distributed = check_bool("gather_distributed", gather_distributed)
    gather = gather_distributed and distributed.world_size() > 1
    stacked = check_views(views, allow_empty=gather)
    labels = check_labels(labels, stacked[0])
    negative_keys = check_view_negatives(negative_keys, stacked)
    negative_labels = check_negative_labels(negative_labels, labels, negative_keys, "unpaired")
    variant = check_variant(decoupled, false_negative_rate, hard_negative_beta, normalize=normalize)
    check_variant_inputs(variant, labels, num_views=len(stacked))

    compute_dtype = _compute_dtype(stacked)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(compute_dtype)
    num_views, batch, _ = stacked.shape
    first_view_only = anchors == "first"
    anchor_rows = batch if first_view_only else num_views * batch
    candidates = num_views * batch + (0 if negative_keys is None else len(negative_keys))
    use_dense = not gather and chunk_size is None and anchor_rows * candidates <= DENSE_MAX_LOGITS
    if use_dense:
        unit = _normalize.unit_fn(normalize)
        return dense_nt_xent(
            unit(stacked),
            labels,
            temperature,
            reduction,
            first_view_only,
            variant=variant,
            negative_keys=None if negative_keys is None else unit(negative_keys),
            negative_labels=negative_labels,
        )
    problem = _problem.nt_xent_problem(
        stacked.to(compute_dtype),
        labels,
        negative_keys,
        negative_labels,
        temperature,
        reduction,
        first_view_only=first_view_only,
        normalize=normalize,
        chunk_size=chunk_size,
        gather=gather,
        eps=_normalize.normalization_eps(stacked.dtype),
        product_dtype=engine.product_dtype(stacked),
        variant=variant,
    )
    loss = engine.run(problem)
    if reduction == "none" and not first_view_only:
        loss = loss.view(num_views, batch)
    return loss


def siglip_loss(
    query: Tensor,
    key: Tensor,
    temperature: float | Tensor = 0.1,
    bias: float | Tensor = -10.0,
    reduction: Reduction = "mean",
    *,
    labels: Tensor | None = None,
    negative_keys: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int | None = None,
    gather_distributed: bool = False,
) -> Tensor:
    """SigLIP's sigmoid loss (Zhai et al. 2023): every (query, key) pair scored alone.

    The logit of pair (i, j) is ``cos(q_i, k_j) / temperature + bias`` (the
    dot product without ``normalize``). The pair is positive when j == i or,
    with ``labels``, when ``labels[i] == labels[j]``; every other pair is a
    negative. Each pair costs ``-log sigmoid(logit)`` if positive and
    ``-log sigmoid(-logit)`` if negative, and query i's loss is the sum over
    its B keys and the M ``negative_keys``. Plain PyTorch, without labels or
    negatives::

        logits = F.normalize(q) @ F.normalize(k).T / t + b   # (B, B)
        signs = 2 * torch.eye(B) - 1                         # +1 positive, -1 negative
        loss = -F.logsigmoid(signs * logits).sum() / B

    That is open_clip's ``SigLipLoss`` with ``logit_scale = 1 / t`` and
    ``logit_bias = b``, and big_vision's. No (B, B) logits or label matrix
    is built for large batches: the blockwise engine computes the loss and
    every gradient in one pass over blocks of the logits.

    Args:
        query: queries, e.g. image embeddings.
        key: keys, e.g. text embeddings; key i is query i's positive.
        temperature: logits are divided by it: a finite number > 0, or a
            one-element floating-point tensor (gradients flow into it).
            SigLIP learns ``log(1 / temperature)``, starting at 10 (see
            `SigLIPLoss`).
        bias: added to every logit: a finite number, or a one-element
            floating-point tensor (gradients flow into it). SigLIP starts it
            at -10 so that the many negatives start with a small loss.
        reduction: ``'mean'`` (the sum over all pairs divided by the number
            of queries B, as open_clip and big_vision define it), ``'sum'``
            or ``'none'`` (each query's sum over its pairs, shape (B,)).
        labels: (B,) integer tensor: queries and keys with equal labels are
            positive pairs (several positives per query; all labels distinct
            is the default loss).
        negative_keys: (M, D) extra negatives of every query (never
            positive, whatever the labels).
        normalize: L2-normalise the embeddings (default). False uses raw dot
            products.
        chunk_size: ``None`` (default) picks the dense loss for small
            problems and the blockwise engine (no (B, B + M) logits) for
            large ones; a positive int forces the engine with that many
            queries per block.
        gather_distributed: with an initialised default process group of W > 1
            processes, each rank scores its own queries against all ranks'
            keys (with their labels) and negatives, and each embedding's
            gradient reaches the rank that owns it: the contract of
            `info_nce`'s ``gather_distributed``. With equal local batches and
            gradients averaged across ranks (DistributedDataParallel), every
            gradient, the temperature's and the bias's included, equals one
            process on the concatenated batch; ``'sum'`` is exact for uneven
            batches; a rank with no queries returns 0 and takes part.

    Shape:
        - query: (B, D), B queries of D features.
        - key: (B, D).
        - labels: (B,). negative_keys: (M, D), M negatives.
        - output: scalar, or (B,) if ``reduction='none'``.

    Returns:
        The loss. Its dtype is the inputs' dtype, except float32 for float16
        and bfloat16 inputs. Under ``torch.autocast``: as `info_nce`.

    Raises:
        TypeError: an input is not a floating-point tensor, the inputs' dtypes
            differ, labels are not integers, a flag is not a bool, or the
            temperature or bias is not a number or a one-element tensor.
        ValueError: wrong shapes, empty inputs, different devices, an unknown
            ``reduction``, a temperature that is not finite and > 0, a bias
            that is not finite, or a ``chunk_size`` that is not a positive int.

    Examples:
        >>> import torch
        >>> from info_nce import siglip_loss
        >>> image, text = torch.randn(32, 128), torch.randn(32, 128)
        >>> siglip_loss(image, text, temperature=0.1, bias=-10.0).shape
        torch.Size([])
        >>> labels = torch.randint(0, 8, (32,))  # equal labels: positive pairs
        >>> siglip_loss(image, text, labels=labels, reduction="none").shape
        torch.Size([32])
        >>> extra = torch.randn(100, 128)  # negatives of every query
        >>> siglip_loss(image, text, negative_keys=extra).shape
        torch.Size([])
    """
    reduction = check_reduction(reduction)
    temperature = check_temperature(temperature)
    bias = check_bias(bias)
    chunk_size = check_chunk_size(chunk_size)
    normalize = check_bool("normalize", normalize)
    gather_distributed = check_bool("gather_distributed", gather_distributed)
    gather = gather_distributed and distributed.world_size() > 1
    query, key, negative_keys = check_inputs(
        query, key, negative_keys, "unpaired", allow_empty=gather, key_name="key"
    )
    labels = check_labels(labels, query)

    compute_dtype = _compute_dtype(query)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(compute_dtype)
    if isinstance(bias, Tensor):
        bias = bias.to(compute_dtype)
    candidates = len(key) + (0 if negative_keys is None else len(negative_keys))
    use_dense = (
        not gather and chunk_size is None and len(query) * candidates <= SIGLIP_DENSE_MAX_LOGITS
    )
    if use_dense:
        unit = _normalize.unit_fn(normalize)
        return dense_siglip(
            unit(query),
            unit(key),
            None if negative_keys is None else unit(negative_keys),
            temperature,
            bias,
            reduction,
            labels=labels,
        )
    problem = _problem.siglip_problem(
        query.to(compute_dtype),
        key.to(compute_dtype),
        negative_keys,
        temperature,
        bias,
        reduction,
        labels=labels,
        normalize=normalize,
        chunk_size=chunk_size,
        gather=gather,
        eps=_normalize.normalization_eps(query.dtype),
        product_dtype=engine.product_dtype(query),
    )
    return engine.run(problem)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Losses of float16/bfloat16 inputs are computed in float32."""
    return torch.promote_types(x.dtype, torch.float32)
