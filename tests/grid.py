"""The option grid of the torch.func and autocast tests: each option as a loss on each path.

A loss takes (query, key, negatives, temperature); ``path`` is ``'dense'``
(small problems), ``'engine'`` (``chunk_size``) or `TILES_PATH` (column
tiles, with `tiling.on_path`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tiling import TILES_PATH
from torch import Tensor

from info_nce import info_nce, nt_xent, siglip_loss

B, D, M = 13, 5, 3
PATHS = ["dense", "engine", TILES_PATH]
Loss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def chunk(path: str) -> int | None:
    return (
        6 if path == "engine" else None
    )  # 13 rows: 6 + 6 + 1; dense: small problems; tiles: `on_path`


def options(path: str, reduction: str = "mean") -> dict[str, Loss]:
    """Each option as a loss of (query, key, negatives, temperature) on ``path``."""
    c = chunk(path)
    labels = torch.arange(B) % 4
    return {
        "in-batch": lambda q, k, n, t: info_nce(
            q, k, temperature=t, chunk_size=c, reduction=reduction
        ),
        "unpaired": lambda q, k, n, t: info_nce(
            q, k, n[:, 0], negative_mode="unpaired", chunk_size=c, reduction=reduction
        ),
        "paired-mask": lambda q, k, n, t: info_nce(
            q,
            k,
            n,
            negative_mode="paired",
            negative_mask=(torch.arange(B * M, device=q.device) % 5 > 0).reshape(B, M),
            chunk_size=c,
            reduction=reduction,
        ),
        "in-batch+hard": lambda q, k, n, t: info_nce(
            q,
            k,
            n,
            negative_mode="paired",
            in_batch_negatives=True,
            chunk_size=c,
            reduction=reduction,
        ),
        "symmetric": lambda q, k, n, t: info_nce(
            q, k, temperature=t, symmetric=True, chunk_size=c, reduction=reduction
        ),
        "labels": lambda q, k, n, t: info_nce(
            q, k, labels=labels.to(q.device), chunk_size=c, reduction=reduction
        ),
        "shared-hardness": lambda q, k, n, t: info_nce(
            q,
            k,
            n,
            temperature=t,
            negative_mode="shared",
            negative_mask=(torch.arange(B * M, device=q.device) % 4 > 0).reshape(B, M),
            hardness_mode="all_negatives",
            hardness_strength=3.0,
            chunk_size=c,
            reduction=reduction,
        ),
        "gte-shared": lambda q, k, n, t: info_nce(
            q,
            k,
            n,
            temperature=t,
            negative_mode="shared",
            directions=("query_to_key", "key_to_query", "query_to_query", "key_to_key"),
            chunk_size=c,
            reduction=reduction,
        ),
        "gte-guide": lambda q, k, n, t: info_nce(
            q,
            k,
            n,
            temperature=t,
            negative_mode="shared",
            directions=("query_to_key", "key_to_query", "query_to_query", "key_to_key"),
            false_negative_margin=0.05,
            guide=(q[:, :3].detach(), k[:, :3].detach(), n[..., :3].detach()),
            chunk_size=c,
            reduction=reduction,
        ),
        "decoupled": lambda q, k, n, t: info_nce(
            q, k, decoupled=True, chunk_size=c, reduction=reduction
        ),
        "nt_xent": lambda q, k, n, t: nt_xent(
            [q, k], temperature=t, chunk_size=c, reduction=reduction
        ),
        "nt_xent-debiased": lambda q, k, n, t: nt_xent(
            [q, k], false_negative_rate=0.1, chunk_size=c, reduction=reduction
        ),
        "nt_xent-hard-negative": lambda q, k, n, t: nt_xent(
            [q, k],
            false_negative_rate=0.1,
            hard_negative_beta=1.0,
            chunk_size=c,
            reduction=reduction,
        ),
        # The bias a tensor (its gradient reaches t), then a number with labels.
        "siglip": lambda q, k, n, t: siglip_loss(
            q, k, t, -20 * t, chunk_size=c, reduction=reduction
        ),
        "siglip-labels": lambda q, k, n, t: siglip_loss(
            q,
            k,
            t,
            -3.0,
            labels=labels.to(q.device),
            negative_keys=n[:, 0],
            chunk_size=c,
            reduction=reduction,
        ),
    }


CASES = [(path, name) for path in PATHS for name in options(path)]


def inputs(
    seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, D) queries and keys, (B, M, D) negatives and a temperature tensor.

    The same values (to ``dtype``'s rounding) in every dtype and on every
    device: drawn in float64 on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(B, D, generator=generator, dtype=torch.float64)
    key = torch.randn(B, D, generator=generator, dtype=torch.float64)
    negatives = torch.randn(B, M, D, generator=generator, dtype=torch.float64)
    temperature = torch.tensor(0.3, dtype=torch.float64)
    drawn = (query, key, negatives, temperature)
    return tuple(x.to(device, dtype) for x in drawn)  # type: ignore[return-value]
