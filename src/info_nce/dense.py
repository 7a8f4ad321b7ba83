"""The dense reference: the InfoNCE formula written out with a logits matrix.

This is the readable definition of the loss and the implementation the fast
paths are tested against. It materialises the (B, N) logits, so its memory
grows with B * N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from info_nce._validation import NegativeMode, Reduction


def dense_info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    temperature: float,
    reduction: Reduction,
    negative_mode: NegativeMode,
) -> Tensor:
    """InfoNCE on unit-normalised embeddings, exactly as info-nce-pytorch computes it.

    Args:
        query: (B, D) unit-normalised queries.
        positive_key: (B, D) unit-normalised positive keys.
        negative_keys: None, (M, D) for ``'unpaired'`` or (B, M, D) for ``'paired'``,
            unit-normalised.
        temperature: logits are divided by it before the cross-entropy.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        negative_mode: ``'unpaired'`` or ``'paired'``.

    Returns:
        The loss: a scalar, or (B,) for ``reduction='none'``; float32 for
        float16/bfloat16 inputs, else the input dtype.
    """
    if negative_keys is None:
        # Other rows' positive keys are the negatives; query i's positive is key i.
        logits = query @ positive_key.T  # (B, B)
        targets = torch.arange(len(query), device=query.device)
    else:
        positive_logit = torch.sum(query * positive_key, dim=1, keepdim=True)  # (B, 1)
        if negative_mode == "unpaired":
            negative_logits = query @ negative_keys.T  # (B, M)
        else:
            negative_logits = (query.unsqueeze(1) @ negative_keys.transpose(-2, -1)).squeeze(1)
        logits = torch.cat([positive_logit, negative_logits], dim=1)  # (B, 1 + M)
        targets = torch.zeros(len(query), dtype=torch.long, device=query.device)
    if logits.dtype in (torch.float16, torch.bfloat16):
        # Softmax statistics in float32: at temperature 0.01 half-precision exp overflows.
        logits = logits.float()
    return F.cross_entropy(logits / temperature, targets, reduction=reduction)
