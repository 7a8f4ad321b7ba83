"""The functional API: validate once, normalise, pick an implementation."""

from __future__ import annotations

import torch
from torch import Tensor

from info_nce import blockwise
from info_nce._normalize import normalization_eps, normalize
from info_nce._validation import (
    NegativeMode,
    Reduction,
    check_chunk_size,
    check_inputs,
    check_negative_mode,
    check_reduction,
    check_temperature,
)
from info_nce.dense import dense_info_nce

# Below this many logits (B * candidates) the dense loss is as fast as the
# blockwise engine and `chunk_size=None` picks it; see docs/benchmarks.md.
DENSE_MAX_LOGITS = 3 << 16


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None = None,
    temperature: float = 0.1,
    reduction: Reduction = "mean",
    negative_mode: NegativeMode = "unpaired",
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """InfoNCE loss of queries against their positive keys and negative keys.

    All embeddings are L2-normalised; query i's logits are its cosine
    similarities with its candidates divided by ``temperature``, and its loss is
    the cross-entropy with its positive as the target:

    * ``negative_keys=None``: the candidates are all B positive keys (the other
      rows' positives are the negatives); same as
      ``F.cross_entropy(q @ p.T / t, arange(B))``.
    * ``negative_mode='unpaired'``, negatives (M, D): the candidates are p_i and
      all M negatives; same as ``F.cross_entropy(cat([q.p, q @ n.T]) / t, 0)``.
    * ``negative_mode='paired'``, negatives (B, M, D): the candidates are p_i and
      query i's own M negatives.

    Args:
        query: queries, e.g. embeddings of the inputs.
        positive_key: positive keys, e.g. embeddings of augmented inputs.
        negative_keys: optional negative keys; see ``negative_mode``.
        temperature: logits are divided by it; a finite number > 0.
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (one loss per query).
        negative_mode: ``'unpaired'`` (default) or ``'paired'``; how
            ``negative_keys`` relate to the queries.
        chunk_size: keyword-only. ``None`` (default) picks the faster exact
            implementation: the dense loss for small problems, the blockwise
            engine (no (B, N) logits matrix) for large ones. A positive int
            forces the blockwise engine with that many queries per block (in
            paired mode, where no large matrix exists, it forces the engine's
            lean path). Results agree to floating-point rounding.

    Shape:
        - query: (B, D), B queries of D features.
        - positive_key: (B, D).
        - negative_keys: (M, D) if unpaired, (B, M, D) if paired, M negatives.
        - output: scalar, or (B,) if ``reduction='none'``.

    Returns:
        The loss. Its dtype is the inputs' dtype, except float32 for float16
        and bfloat16 inputs (softmax statistics are kept in float32).

    Raises:
        TypeError: an input is not a floating-point tensor, the inputs' dtypes
            differ, or the temperature is not a number.
        ValueError: wrong shapes, empty inputs, different devices, or an
            unknown ``reduction``/``negative_mode``, a temperature that is not
            finite and > 0, or a ``chunk_size`` that is not a positive int.

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
    """
    reduction = check_reduction(reduction)
    negative_mode = check_negative_mode(negative_mode)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    query, positive_key, negative_keys = check_inputs(
        query, positive_key, negative_keys, negative_mode
    )

    paired = negative_keys is not None and negative_mode == "paired"
    num_candidates = (
        len(query) if negative_keys is None else 1 + negative_keys.shape[-2]
    )  # per query
    if chunk_size is None and not paired and len(query) * num_candidates <= DENSE_MAX_LOGITS:
        return dense_info_nce(
            normalize(query),
            normalize(positive_key),
            None if negative_keys is None else normalize(negative_keys),
            temperature,
            reduction,
            negative_mode,
        )

    # The engine computes in float32 at least (half-precision softmax overflows).
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    scaled_query = normalize(query).to(compute_dtype) / temperature  # (B, D)
    positive_key = normalize(positive_key).to(compute_dtype)  # (B, D)
    if paired:
        assert negative_keys is not None
        options = blockwise.PairedOptions(
            reduction=reduction,
            normalize_negatives=True,
            eps=normalization_eps(negative_keys.dtype),
        )
        return blockwise.paired_info_nce(
            scaled_query, positive_key, negative_keys.to(compute_dtype), options
        )

    keys = positive_key if negative_keys is None else normalize(negative_keys).to(compute_dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (scaled_query, positive_key, keys)
    )
    matrix_options = blockwise.MatrixOptions(
        reduction=reduction,
        block_rows=chunk_size or blockwise.default_block_rows(len(query), num_candidates),
        positive_in_keys=negative_keys is None,
        grads_in_forward=needs_grad and reduction != "none",
    )
    return blockwise.matrix_info_nce(scaled_query, positive_key, keys, matrix_options)
