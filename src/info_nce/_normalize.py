"""L2 normalisation shared by every implementation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def normalization_eps(dtype: torch.dtype) -> float:
    """Smallest norm that normalisation divides by, as in `F.normalize`.

    1e-12, as in info-nce-pytorch, except in float16 where 1e-12 rounds to zero
    (a zero vector would give 0/0): there the smallest normal float16 is used.
    """
    return max(1e-12, torch.finfo(dtype).tiny)


def unit(x: Tensor) -> Tensor:
    """Unit-normalise the last dimension; zero vectors stay zero."""
    return F.normalize(x, dim=-1, eps=normalization_eps(x.dtype))


def _identity(x: Tensor) -> Tensor:
    return x


def unit_fn(normalize: bool) -> Callable[[Tensor], Tensor]:
    """`unit` if ``normalize``, else the identity (the losses' ``normalize=False``)."""
    return unit if normalize else _identity
