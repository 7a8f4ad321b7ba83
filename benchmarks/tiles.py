"""Time a loss with complete-row blocks against column tiles, alternating them in one process.

For B queries against K unpaired negatives, the engine chooses between blocks
of complete rows and 256-row blocks against column tiles
(`walker.default_block_shape`). This script forces one layout or the other
at several K, the layouts taking turns step by step, and prints each
layout's median time and the median ratio tiles / rows. The negatives are a
queue's keys (no gradient) unless ``--key-grads``.

Run from the repository root (after `make setup`):

    .venv/bin/python benchmarks/tiles.py --batch 1024 --keys 65536 131072 262144 524288
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

import info_nce.engine as engine
from info_nce import info_nce
from info_nce.engine import walker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="B queries")
    parser.add_argument("--keys", type=int, nargs="+", default=[1 << 16, 1 << 18], help="K")
    parser.add_argument("--dim", type=int, default=128, help="D")
    parser.add_argument("--rounds", type=int, default=5, help="steps per layout and K")
    parser.add_argument("--key-grads", action="store_true", help="negatives with gradient")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()
    positive = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()

    def complete_rows(num_rows: int, num_candidates: int, **_: bool) -> tuple[int, None]:
        return walker.default_block_rows(num_rows, num_candidates), None

    def tiles(num_rows: int, num_candidates: int, **_: bool) -> tuple[int, int]:
        rows = min(num_rows, walker.MIN_BLOCK_ROWS)
        return rows, walker.TARGET_BLOCK_ELEMENTS // rows

    layouts = {"rows": complete_rows, "tiles": tiles}

    print("| K | rows per block | rows s | tiles s | tiles / rows |\n|---|---|---|---|---|")
    for num_keys in args.keys:
        queue = torch.nn.functional.normalize(
            torch.randn(num_keys, args.dim, generator=generator), dim=1
        ).requires_grad_(args.key_grads)

        def step(layout: Callable[..., tuple[int, int | None]], queue: Tensor = queue) -> float:
            engine.default_block_shape = layout  # type: ignore[attr-defined]
            start = time.perf_counter()
            info_nce(query, positive, queue).backward()  # type: ignore[no-untyped-call]
            query.grad = positive.grad = queue.grad = None
            return time.perf_counter() - start

        for layout in layouts.values():  # warm-up
            step(layout)
        times: dict[str, list[float]] = {name: [] for name in layouts}
        for _ in range(args.rounds):
            for name, layout in layouts.items():
                times[name].append(step(layout))
        ratio = statistics.median(t / r for t, r in zip(times["tiles"], times["rows"], strict=True))
        rows = walker.default_block_rows(args.batch, num_keys + 1)
        print(
            f"| {num_keys} | {rows} | {statistics.median(times['rows']):.3f} | "
            f"{statistics.median(times['tiles']):.3f} | {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
