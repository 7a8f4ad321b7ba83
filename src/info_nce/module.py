"""The `InfoNCE` module: a holder of settings around `info_nce`."""

from __future__ import annotations

from torch import Tensor, nn

from info_nce._validation import (
    NegativeMode,
    Reduction,
    check_chunk_size,
    check_negative_mode,
    check_reduction,
    check_temperature,
)
from info_nce.functional import info_nce


class InfoNCE(nn.Module):
    """InfoNCE loss for contrastive learning (van den Oord et al., 2018).

    Pulls each query towards its positive key and pushes it away from negative
    keys. A drop-in replacement for info-nce-pytorch's ``InfoNCE``; see
    `info_nce.info_nce` for the formula.

    Args:
        temperature: logits are divided by it before the cross-entropy; a
            finite number > 0.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        negative_mode: ``'unpaired'``: negatives (M, D) shared by all queries;
            ``'paired'``: negatives (B, M, D), M per query.
        chunk_size: keyword-only; ``None`` picks the faster exact
            implementation, a positive int forces the blockwise engine with
            that many queries per block.

    Shape:
        - query: (B, D), B queries of D features.
        - positive_key: (B, D).
        - negative_keys: optional; (M, D) if unpaired, (B, M, D) if paired.
          Without it, the other rows' positive keys are the negatives.
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
    """

    def __init__(
        self,
        temperature: float = 0.1,
        reduction: Reduction = "mean",
        negative_mode: NegativeMode = "unpaired",
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.negative_mode = check_negative_mode(negative_mode)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(
        self, query: Tensor, positive_key: Tensor, negative_keys: Tensor | None = None
    ) -> Tensor:
        return info_nce(
            query,
            positive_key,
            negative_keys,
            temperature=self.temperature,
            reduction=self.reduction,
            negative_mode=self.negative_mode,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, "
            f"negative_mode={self.negative_mode!r}, chunk_size={self.chunk_size}"
        )
