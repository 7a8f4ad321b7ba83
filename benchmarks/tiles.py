"""Time MoCo's loss with complete-row blocks against column tiles, alternating them in one process.

For B queries against K queue keys (unpaired negatives without gradient), the
engine walks blocks of complete rows unless such a block would hold fewer than
`walker.MIN_TILED_ROWS` rows; then it walks 256-row blocks against column
tiles. This script forces one layout or the other (by setting that threshold
to 0 or to more than B) at several K, the layouts taking turns step by step, and
prints each layout's median time and the median ratio tiles / rows.

Run from the repository root (after `make setup`):

    .venv/bin/python benchmarks/tiles.py --batch 1024 --keys 65536 131072 262144 524288
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from info_nce import info_nce
from info_nce.engine import walker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="B queries")
    parser.add_argument("--keys", type=int, nargs="+", default=[1 << 16, 1 << 18], help="K")
    parser.add_argument("--dim", type=int, default=128, help="D")
    parser.add_argument("--rounds", type=int, default=5, help="steps per layout and K")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()
    positive = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()
    layouts = {"rows": 0, "tiles": 1 << 30}  # MIN_TILED_ROWS: never / always tile

    print("| K | rows per block | rows s | tiles s | tiles / rows |\n|---|---|---|---|---|")
    for num_keys in args.keys:
        queue = torch.nn.functional.normalize(
            torch.randn(num_keys, args.dim, generator=generator), dim=1
        )

        def step(threshold: int, queue: torch.Tensor = queue) -> float:
            walker.MIN_TILED_ROWS = threshold
            start = time.perf_counter()
            info_nce(query, positive, queue).backward()  # type: ignore[no-untyped-call]
            query.grad = positive.grad = None
            return time.perf_counter() - start

        for threshold in layouts.values():  # warm-up
            step(threshold)
        times: dict[str, list[float]] = {name: [] for name in layouts}
        for _ in range(args.rounds):
            for name, threshold in layouts.items():
                times[name].append(step(threshold))
        ratio = statistics.median(t / r for t, r in zip(times["tiles"], times["rows"], strict=True))
        rows = walker.default_block_rows(args.batch, num_keys + 1)
        print(
            f"| {num_keys} | {rows} | {statistics.median(times['rows']):.3f} | "
            f"{statistics.median(times['tiles']):.3f} | {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
