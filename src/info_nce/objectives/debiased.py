"""The debiased (Chuang et al., NeurIPS 2020) and hard-negative (Robinson et al., ICLR 2021) losses.

For a row with positive logit ``s+`` and N negatives ``s_j`` (logits already
divided by the temperature t), with the class prior ``tau`` and the
concentration ``beta``:

    mean = sum_j w_j exp(s_j) / sum_j w_j,  w_j = exp(beta s_j)
    Ng   = max(N (mean - tau exp(s+)) / (1 - tau), N exp(-1/t))
    loss = log(exp(s+) + Ng) - s+ = softplus(log Ng - s+)

All of it in log space: ``log mean = lse((1 + beta) s) - lse(beta s)``, and
``log(mean - tau exp(s+)) = log mean + log1p(-tau exp(s+ - log mean))``, so
nothing overflows at t = 0.01. With ``beta = 0`` the mean is the plain one
(the debiased loss), and with ``tau = 0`` too the loss is InfoNCE's.

Gradients flow through the weights (they are not detached, as in the
authors' code). Where the clamp is not active, with ``a = 1 / (1 - tau
exp(s+ - log mean))`` and ``sigma = sigmoid(log Ng - s+)``:

    d loss / d s_j = sigma a ((1 + beta) P_j - beta Q_j),  d loss / d s+ = -sigma a,

``P`` and ``Q`` being the softmaxes of ``(1 + beta) s`` and ``beta s`` over
the negatives. Where it is, ``Ng`` depends on t alone: ``d loss / d s+ =
-sigma`` and the clamp's logit ``-1/t`` gets ``sigma``.

The walker excludes the target from the candidates, so the block holds the
negatives; the clamp's logit ``-1/t`` arrives as one more extra column (at
``clamp_column``), computed by the problem builder with autograd, so a
learnable temperature receives the clamp's share of the gradient as it does
an extra logit's. ``forward_`` computes ``P`` in the block and ``Q`` in a
second buffer of the block's size (only for ``beta > 0``) with the fused
softmax kernel, and leaves ``d loss / d s_j`` in the block. Each row keeps
six statistics for the gradient pass: ``lse((1 + beta) s)``, ``lse(beta s)``,
the coefficients ``sigma a (1 + beta)`` and ``sigma a beta`` of ``P`` and
``Q``, and the positive's and the clamp's gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from info_nce._backend import kernels_for
from info_nce.objectives.base import (
    ColumnSoftmax,
    RowContext,
    add_to_targets_,
    column_slices,
    forward_then_gradient_,
)

_LSE_P, _LSE_Q, _COEF_P, _COEF_Q, _POSITIVE, _CLAMP = range(6)


@dataclass(frozen=True)
class DebiasedObjective:
    """The debiased loss, with hard-negative weights for ``hard_negative_beta > 0``.

    Attributes:
        false_negative_rate: the class prior tau, in [0, 1).
        hard_negative_beta: the concentration beta >= 0.
        clamp_column: the block column holding each row's clamp logit ``-1/t``
            (an extra column; it is no negative).
    """

    false_negative_rate: float
    hard_negative_beta: float
    clamp_column: int
    # Q's buffer, reused from block to block within one loss call.
    _scratch: list[Tensor] = field(default_factory=list, init=False, compare=False, repr=False)

    num_stats = 6
    needs_candidates = True
    block_scale = 1
    bias_stat = None  # no bias
    tileable = False  # P and Q need complete rows

    def parts(self) -> tuple[float, ...]:
        return (self.false_negative_rate, self.hard_negative_beta, self.clamp_column)

    def forward_(
        self,
        block: Tensor,
        context: RowContext,
        row_stat: Tensor,
        target_logit: Tensor | None,
        keys: Tensor | None = None,
    ) -> Tensor:
        assert keys is None, "the walker takes no column statistics from this objective"
        assert target_logit is not None
        assert context.candidates is not None
        beta = self.hard_negative_beta
        clamp = block[:, self.clamp_column].clone()  # (R,) -1/t
        block[:, self.clamp_column] = float("-inf")
        count = context.candidates - 1  # (R,) the negatives: the clamp column is none
        empty = count == 0  # no negatives: Ng = 0, loss 0, no gradient
        # A row without negatives holds only -inf; one finite entry keeps its
        # softmaxes finite (its coefficients below are 0).
        block[:, 0].masked_fill_(empty, 0.0)
        kernels = kernels_for(block)
        q = None
        if kernels is not None:  # the log-sum-exps; the block keeps its logits
            log_p, found_q = kernels.dual_lse(block, beta)
            log_q = found_q if beta else count.log().masked_fill(empty, 0.0)
        else:
            log_p, log_q, q = self._softmaxes_(block, beta, count, empty)

        log_mean = log_p - log_q
        tau = self.false_negative_rate
        slope = torch.ones_like(log_mean)  # a
        log_estimate = log_mean  # log((mean - tau exp(s+)) / (1 - tau))
        if tau:
            ratio = torch.exp(math.log(tau) + target_logit - log_mean)  # tau exp(s+) / mean
            log_estimate = log_mean + torch.log1p(-ratio) - math.log1p(-tau)  # NaN if ratio > 1
            slope = (1 - ratio).reciprocal()
        clamped = ~(log_estimate > clamp)  # NaN: the estimate is negative
        z = count.log() + torch.where(clamped, clamp, log_estimate) - target_logit  # log Ng - s+
        loss = F.softplus(z)
        sigma = torch.sigmoid(z)
        negatives = torch.where(clamped | empty, 0.0, sigma * slope)  # sigma a, where it applies
        row_stat[:, _LSE_P] = log_p
        row_stat[:, _LSE_Q] = log_q
        row_stat[:, _COEF_P] = negatives * (1 + beta)
        row_stat[:, _COEF_Q] = negatives * beta
        row_stat[:, _POSITIVE] = -torch.where(clamped, sigma, sigma * slope).masked_fill(empty, 0.0)
        row_stat[:, _CLAMP] = torch.where(clamped & ~empty, sigma, 0.0)
        # The block's leftover: d loss / d s_j of the negatives, unweighted.
        if kernels is not None:
            coef_q = row_stat[:, _COEF_Q] if beta else None
            kernels.dual_gradient_(
                block, beta, log_p, log_q if beta else None, row_stat[:, _COEF_P], coef_q
            )
            return loss.masked_fill(empty, 0.0)
        block.mul_(row_stat[:, _COEF_P : _COEF_P + 1])
        if q is not None:
            block.addcmul_(q, row_stat[:, _COEF_Q : _COEF_Q + 1], value=-1.0)
        return loss.masked_fill(empty, 0.0)

    def _softmaxes_(
        self, block: Tensor, beta: float, count: Tensor, empty: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``lse((1 + beta) s)``, ``lse(beta s)`` and Q; P overwrites the block."""
        shift = block.amax(dim=1)  # (R,) the largest negative logit
        softmax_ = torch.ops.aten._softmax.out
        # Each softmax's largest entry, at the largest logit, is 1 / sum_j
        # exp(c (s_j - max)) >= 1 / W: its log gives the log-sum-exp.
        q = None
        if beta:
            q = torch.mul(block, beta, out=self._buffer(block))
            softmax_(q, 1, False, out=q)  # Q
            log_q = beta * shift - q.amax(dim=1).log()  # lse(beta s)
            block.mul_(1 + beta)
        else:
            log_q = count.log().masked_fill(empty, 0.0)  # lse(0 s) = log N
        softmax_(block, 1, False, out=block)  # P
        log_p = (1 + beta) * shift - block.amax(dim=1).log()  # lse((1 + beta) s)
        return log_p, log_q, q

    def _buffer(self, block: Tensor) -> Tensor:
        """A tensor of the block's shape, dtype and device, reused where possible."""
        if self._scratch and self._scratch[0].numel() >= block.numel():
            old = self._scratch[0]
            if old.dtype == block.dtype and old.device == block.device:
                return old.view(-1)[: block.numel()].view(block.shape)
        self._scratch[:] = [torch.empty_like(block, memory_format=torch.contiguous_format)]
        return self._scratch[0]

    def gradient_from_forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, weight: Tensor | float
    ) -> None:
        # The block holds the negatives' gradients; the target and the clamp column 0.
        if isinstance(weight, Tensor) or weight != 1.0:
            block.mul_(weight)
        self._specials_(block, context, 0, row_stat, weight)

    def forward_with_gradient_(
        self,
        block: Tensor,
        context: RowContext,
        row_stat: Tensor,
        target_logit: Tensor | None,
        keys: Tensor | None,
    ) -> Tensor:
        return forward_then_gradient_(self, block, context, row_stat, target_logit, keys)

    def gradient_(
        self,
        logits: Tensor,
        context: RowContext,
        first_column: int,
        row_stat: Tensor,
        weight: Tensor | float,
        columns: ColumnSoftmax | None = None,
    ) -> None:
        assert columns is None, "no column softmax: the walker takes none from this objective"
        clamp = self.clamp_column - first_column
        if 0 <= clamp < logits.shape[1]:
            logits[:, clamp] = float("-inf")
        beta = self.hard_negative_beta
        kernels = kernels_for(logits)
        if kernels is not None:
            w = weight[:, 0] if isinstance(weight, Tensor) else weight
            kernels.dual_gradient_(
                logits,
                beta,
                row_stat[:, _LSE_P],
                row_stat[:, _LSE_Q] if beta else None,
                row_stat[:, _COEF_P] * w,
                row_stat[:, _COEF_Q] * w if beta else None,
            )
            self._specials_(logits, context, first_column, row_stat, weight)
            return
        log_p = row_stat[:, _LSE_P : _LSE_P + 1]  # (R, 1)
        log_q = row_stat[:, _LSE_Q : _LSE_Q + 1]
        coef_p = row_stat[:, _COEF_P : _COEF_P + 1] * weight
        coef_q = row_stat[:, _COEF_Q : _COEF_Q + 1] * weight
        for part in column_slices(logits):
            piece = logits[:, part]
            if beta:
                q = torch.mul(piece, beta).sub_(log_q).exp_()  # Q
                piece.mul_(1 + beta).sub_(log_p).exp_().mul_(coef_p)  # the P term
                piece.addcmul_(q, coef_q, value=-1.0)
            else:
                piece.sub_(log_p).exp_().mul_(coef_p)
        self._specials_(logits, context, first_column, row_stat, weight)

    def _specials_(
        self,
        logits: Tensor,
        context: RowContext,
        first_column: int,
        row_stat: Tensor,
        weight: Tensor | float,
    ) -> None:
        """In place: the positive's and the clamp's gradients, where they fall in the slice."""
        w = weight[:, 0] if isinstance(weight, Tensor) else weight
        clamp = self.clamp_column - first_column
        if 0 <= clamp < logits.shape[1]:
            logits[:, clamp] = row_stat[:, _CLAMP] * w
        add_to_targets_(logits, context, first_column, row_stat[:, _POSITIVE] * w)
