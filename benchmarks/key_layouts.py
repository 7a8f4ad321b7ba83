"""Time the two matrix products of a long key set without gradient in three block layouts.

For B queries against N keys that need no gradient (a queue), forward+backward
needs two products: the logits ``q @ Kᵀ`` and the rows' gradient ``dS @ K``.
The layouts take turns in one process (the machine's speed drifts):

* ``rows``: blocks of complete rows, as the engine walks them today (16 rows
  at 1,048,576 keys, the 16M-logit cap);
* ``transposed``: the same blocks with the keys as the streaming operand
  (``K @ q_blockᵀ``, then ``(dSᵀ)ᵀ @ K``);
* ``tiles``: all B rows against column tiles of the keys, the rows' gradient
  accumulated tile by tile.

Run from the repository root (after `make setup`), e.g. for C12:

    .venv/bin/python benchmarks/key_layouts.py --batch 256 --keys 1048576 --dim 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="B queries")
    parser.add_argument("--keys", type=int, default=1 << 20, help="N keys")
    parser.add_argument("--dim", type=int, default=128, help="D")
    parser.add_argument("--block-rows", type=int, default=16, help="rows per block (rows layouts)")
    parser.add_argument("--tile", type=int, default=1 << 16, help="keys per tile (tiles layout)")
    parser.add_argument("--rounds", type=int, default=5, help="steps per layout")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(args.keys, args.dim, generator=generator)
    query = torch.randn(args.batch, args.dim, generator=generator)
    rows, tile = args.block_rows, args.tile
    block = torch.empty(rows, args.keys)
    block_t = torch.empty(args.keys, rows)
    tiled = torch.empty(args.batch, tile)
    grad = torch.empty(args.batch, args.dim)

    def rows_layout() -> None:
        for start in range(0, args.batch, rows):
            torch.mm(query[start : start + rows], keys.T, out=block)
            torch.mm(block, keys, out=grad[start : start + rows])

    def transposed_layout() -> None:
        for start in range(0, args.batch, rows):
            torch.mm(keys, query[start : start + rows].T, out=block_t)
            torch.mm(block_t.T, keys, out=grad[start : start + rows])

    def tiles_layout() -> None:
        grad.zero_()
        for start in range(0, args.keys, tile):
            piece = keys[start : start + tile]
            torch.mm(query, piece.T, out=tiled[:, : len(piece)])
            grad.addmm_(tiled[:, : len(piece)], piece)

    layouts: dict[str, Callable[[], None]] = {
        "rows": rows_layout,
        "transposed": transposed_layout,
        "tiles": tiles_layout,
    }
    for run in layouts.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, run in layouts.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print("| layout | median s |\n|---|---|")
    for name, series in times.items():
        print(f"| {name} | {statistics.median(series):.3f} |")


if __name__ == "__main__":
    main()
