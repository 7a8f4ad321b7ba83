"""The `InfoNCE` module: a holder of settings (and a learnable temperature) around `info_nce`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from info_nce._validation import (
    NegativeMode,
    Reduction,
    check_bool,
    check_chunk_size,
    check_negative_mode,
    check_positive_number,
    check_reduction,
    check_temperature,
)
from info_nce.functional import info_nce


class InfoNCE(nn.Module):
    """InfoNCE loss for contrastive learning (van den Oord et al., 2018).

    Pulls each query towards its positive key and pushes it away from negative
    keys. A drop-in replacement for info-nce-pytorch's ``InfoNCE``; see
    `info_nce.info_nce` for the formula and the options.

    Args:
        temperature: logits are divided by it; a finite number > 0 (the
            initial value when ``learn_temperature``).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        negative_mode: ``'unpaired'``: negatives (M, D) shared by all queries;
            ``'paired'``: negatives (B, M, D), M per query.
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

    Shape:
        - query: (B, D), B queries of D features.
        - positive_key: (B, D).
        - negative_keys: optional; (M, D) if unpaired, (B, M, D) if paired.
          Without it, the other rows' positive keys are the negatives.
        - labels: optional, keyword-only, (B,) integers.
        - negative_mask: optional, keyword-only, (B, M) bool (paired only).
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
    """

    def __init__(
        self,
        temperature: float = 0.1,
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
    ) -> None:
        super().__init__()
        initial_temperature = check_temperature(temperature)
        if isinstance(initial_temperature, Tensor):
            initial_temperature = float(initial_temperature.detach().cpu())
        self.reduction = check_reduction(reduction)
        self.negative_mode = check_negative_mode(negative_mode)
        self.symmetric = check_bool("symmetric", symmetric)
        if in_batch_negatives is not None:
            check_bool("in_batch_negatives", in_batch_negatives)
        self.in_batch_negatives = in_batch_negatives
        self.normalize = check_bool("normalize", normalize)
        self.learn_temperature = check_bool("learn_temperature", learn_temperature)
        self.max_logit_scale = check_positive_number("max_logit_scale", max_logit_scale)
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.logit_scale: nn.Parameter | None = None
        self._temperature: float = initial_temperature
        if learn_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / initial_temperature)))

    @property
    def temperature(self) -> float | Tensor:
        """The temperature in use: a float, or (learnable) a 0-dim tensor with gradient.

        A fixed temperature can be reassigned (validated), as in info-nce-pytorch;
        a learnable one is read-only: it is ``exp(-logit_scale)``, clamped.
        """
        if self.logit_scale is None:
            return self._temperature
        return torch.exp(-self.logit_scale.clamp(max=math.log(self.max_logit_scale)))

    @temperature.setter
    def temperature(self, value: float) -> None:
        if self.logit_scale is not None:
            raise AttributeError(
                "temperature is learnable (learn_temperature=True) and read-only; "
                "set logit_scale = log(1 / temperature) instead"
            )
        checked = check_temperature(value)
        if isinstance(checked, Tensor):
            checked = float(checked.detach().cpu())
        self._temperature = checked

    def forward(
        self,
        query: Tensor,
        positive_key: Tensor,
        negative_keys: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        negative_mask: Tensor | None = None,
    ) -> Tensor:
        return info_nce(
            query,
            positive_key,
            negative_keys,
            temperature=self.temperature,
            reduction=self.reduction,
            negative_mode=self.negative_mode,
            symmetric=self.symmetric,
            in_batch_negatives=self.in_batch_negatives,
            labels=labels,
            negative_mask=negative_mask,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        temperature = self.temperature
        if isinstance(temperature, Tensor):
            temperature = float(temperature.detach().cpu())
        return (
            f"temperature={temperature:g}, reduction={self.reduction!r}, "
            f"negative_mode={self.negative_mode!r}, symmetric={self.symmetric}, "
            f"learn_temperature={self.learn_temperature}, chunk_size={self.chunk_size}"
        )
