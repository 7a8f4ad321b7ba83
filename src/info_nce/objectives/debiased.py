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

    d loss / d s_j = sigma a ((1 + beta) p_j - beta q_j),  d loss / d s+ = -sigma a,

``p`` and ``q`` being the softmaxes of ``(1 + beta) s`` and ``beta s`` over
the negatives. Where it is, ``Ng`` depends on t alone: ``d loss / d s+ =
-sigma`` and the clamp's logit ``-1/t`` gets ``sigma``.

The walker excludes the target from the candidates, so the block holds the
negatives; the clamp's logit ``-1/t`` arrives as one more extra column (at
``clamp_column``), computed by the problem builder with autograd, so a
learnable temperature receives the clamp's share of the gradient as it does
an extra logit's. Each row keeps five statistics: its largest negative logit
``m`` (the shift), ``alpha = sigma a (1 + beta) / sum_j exp((1 + beta)(s_j -
m))``, ``gamma = sigma a beta / sum_j exp(beta (s_j - m))``, and the
positive's and the clamp's gradients; a negative's gradient is then
``exp(beta (s_j - m)) (alpha exp(s_j - m) - gamma)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from info_nce.objectives.base import RowContext, add_to_targets_, column_slices

_SHIFT, _ALPHA, _GAMMA, _POSITIVE, _CLAMP = range(5)


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

    num_stats = 5
    needs_candidates = True

    def forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, target_logit: Tensor | None
    ) -> Tensor:
        assert target_logit is not None
        assert context.candidates is not None
        beta = self.hard_negative_beta
        clamp = block[:, self.clamp_column].clone()  # (R,) -1/t
        block[:, self.clamp_column] = float("-inf")
        count = context.candidates - 1  # (R,) the negatives: the clamp column is none
        shift = block.amax(dim=1)  # (R,)
        shift.masked_fill_(torch.isneginf(shift), 0.0)  # rows without negatives
        sum_p = block.new_zeros(len(block))  # (R,) sum_j exp((1 + beta)(s_j - m))
        sum_q = block.new_zeros(len(block)) if beta else None  # sum_j exp(beta (s_j - m))
        for columns in column_slices(block):
            piece = block[:, columns].sub_(shift.unsqueeze(1))  # the block keeps s - m
            exp = torch.exp(piece)
            if sum_q is not None:
                weights = torch.mul(piece, beta).exp_()
                sum_q += weights.sum(dim=1)
                exp.mul_(weights)
            sum_p += exp.sum(dim=1)

        log_p = sum_p.log() + (1 + beta) * shift  # lse((1 + beta) s)
        log_q = count.log() if sum_q is None else sum_q.log() + beta * shift  # lse(beta s)
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
        empty = count == 0  # no negatives: Ng = 0, loss 0, no gradient
        negatives = torch.where(clamped | empty, 0.0, sigma * slope)  # sigma a, where it applies
        row_stat[:, _SHIFT] = shift
        row_stat[:, _ALPHA] = negatives * (1 + beta) / sum_p.masked_fill(empty, 1.0)
        row_stat[:, _GAMMA] = 0.0
        if sum_q is not None:
            row_stat[:, _GAMMA] = negatives * beta / sum_q.masked_fill(empty, 1.0)
        row_stat[:, _POSITIVE] = -torch.where(clamped, sigma, sigma * slope).masked_fill(empty, 0.0)
        row_stat[:, _CLAMP] = torch.where(clamped & ~empty, sigma, 0.0)
        return loss.masked_fill(empty, 0.0)

    def gradient_from_forward_(
        self, block: Tensor, context: RowContext, row_stat: Tensor, weight: Tensor | float
    ) -> None:
        # The block holds s - m (the target and the clamp column at -inf).
        self._negatives_(block, row_stat, weight, shifted=True)
        self._specials_(block, context, 0, row_stat, weight)

    def gradient_(
        self,
        logits: Tensor,
        context: RowContext,
        first_column: int,
        row_stat: Tensor,
        weight: Tensor | float,
    ) -> None:
        clamp = self.clamp_column - first_column
        if 0 <= clamp < logits.shape[1]:
            logits[:, clamp] = float("-inf")
        self._negatives_(logits, row_stat, weight, shifted=False)
        self._specials_(logits, context, first_column, row_stat, weight)

    def _negatives_(
        self, logits: Tensor, row_stat: Tensor, weight: Tensor | float, *, shifted: bool
    ) -> None:
        """In place: each negative's logit becomes ``weight * d loss / d s_j``."""
        beta = self.hard_negative_beta
        alpha = row_stat[:, _ALPHA : _ALPHA + 1] * weight  # (R, 1)
        gamma = row_stat[:, _GAMMA : _GAMMA + 1] * weight
        shift = row_stat[:, _SHIFT : _SHIFT + 1]
        for columns in column_slices(logits):
            piece = logits[:, columns]
            if not shifted:
                piece.sub_(shift)
            if beta:
                weights = torch.mul(piece, beta).exp_()
                piece.exp_().mul_(alpha).sub_(gamma).mul_(weights)
            else:
                piece.exp_().mul_(alpha)

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
