"""Time the blockwise engine at several block sizes, alternating them in one process.

The machine's speed drifts between (and within) processes, so the block sizes
take turns step by step and each is reported as the median ratio of its step
time to the first size's neighbouring step: a drift affects all sizes alike.

Run from the repository root (after `make setup`), e.g. for C6:

    .venv/bin/python benchmarks/block_rows.py --batch 8192 --dim 768 --symmetric 256 512 1024

or for C11 (MoCo: 65,536 queue keys without gradient as unpaired negatives):

    .venv/bin/python benchmarks/block_rows.py --batch 4096 --dim 128 --negatives 65536 \
        255 32 64 128 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from info_nce import info_nce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("block_rows", type=int, nargs="+", help="query rows per block (chunk_size)")
    parser.add_argument("--batch", type=int, default=8192, help="B queries and positive keys")
    parser.add_argument("--dim", type=int, default=768, help="D")
    parser.add_argument("--symmetric", action="store_true", help="the symmetric (CLIP) loss")
    parser.add_argument("--classes", type=int, default=0, help="labels with this many classes")
    parser.add_argument(
        "--negatives", type=int, default=0, help="M unpaired negatives without gradient (a queue)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="steps per block size")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()
    positive = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()
    labels = torch.arange(args.batch) % args.classes if args.classes else None
    negatives = None
    if args.negatives:
        negatives = torch.randn(args.negatives, args.dim, generator=generator)

    def step(block_rows: int) -> float:
        start = time.perf_counter()
        loss = info_nce(
            query,
            positive,
            negatives,
            symmetric=args.symmetric,
            labels=labels,
            chunk_size=block_rows,
        )
        loss.backward()  # type: ignore[no-untyped-call]
        query.grad = positive.grad = None
        return time.perf_counter() - start

    for rows in args.block_rows:  # warm-up
        step(rows)
    times: dict[int, list[float]] = {rows: [] for rows in args.block_rows}
    for _ in range(args.rounds):
        for rows in args.block_rows:
            times[rows].append(step(rows))
    first = times[args.block_rows[0]]
    print("| block rows | median s | time / first size's |\n|---|---|---|")
    for rows, series in times.items():
        ratio = statistics.median(t / f for t, f in zip(series, first, strict=True))
        print(f"| {rows} | {statistics.median(series):.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
