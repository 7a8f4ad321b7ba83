"""Eager against torch.compile: first-call and per-step time of one loss.

For in-batch InfoNCE on (B, D) queries and keys (forward+backward), prints the
eager step, and for each backend the first call (compilation included) and
the median compiled step, each backend in a fresh process. Run from the
repository root (after `make setup`):

    .venv/bin/python benchmarks/compile.py --batch 8192 --dim 128
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from info_nce import info_nce


def measure(batch: int, dim: int, backend: str, steps: int) -> tuple[float, float]:
    """(first call, median step) seconds; backend 'eager' compiles nothing."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, dim, generator=generator, requires_grad=True)
    key = torch.randn(batch, dim, generator=generator, requires_grad=True)

    def loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return info_nce(q, k)

    step_fn = loss if backend == "eager" else torch.compile(loss, backend=backend, fullgraph=True)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step_fn(query, key).backward()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["eager", "aot_eager", "inductor"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        first, step = measure(args.batch, args.dim, args.worker, args.steps)
        print(f"{first} {step}")
        return
    print(f"in-batch B={args.batch}, D={args.dim}, forward+backward, {args.steps} steps")
    print("| backend | first call s | step s |")
    print("|---|---|---|")
    for backend in args.backends:
        command = [sys.executable, __file__, "--worker", backend]
        command += ["--batch", str(args.batch), "--dim", str(args.dim), "--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        first, step = (float(x) for x in output.split()[-2:])
        print(f"| {backend} | {first:.2f} | {step:.3f} |")


if __name__ == "__main__":
    main()
