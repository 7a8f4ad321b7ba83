"""Time `nt_xent` with each objective, the objectives alternating in one process.

The machine's speed drifts between (and within) processes, so the objectives
take turns step by step; each is reported as the median of its step times and
as the median ratio to the plain loss's neighbouring step.

Run from the repository root (after `make setup`), e.g. at C9/C10's shapes:

    .venv/bin/python benchmarks/objectives.py --batch 8192 --dim 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from info_nce import nt_xent

OBJECTIVES: dict[str, dict[str, float | bool]] = {
    "plain": {},
    "decoupled": {"decoupled": True},
    "debiased": {"false_negative_rate": 0.1},
    "hard-negative": {"false_negative_rate": 0.1, "hard_negative_beta": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192, help="B samples (2B anchors)")
    parser.add_argument("--dim", type=int, default=128, help="D")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5, help="steps per objective")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()
    z2 = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()

    def step(options: dict[str, float | bool]) -> float:
        start = time.perf_counter()
        loss = nt_xent([z1, z2], temperature=args.temperature, **options)  # type: ignore[arg-type]
        loss.backward()  # type: ignore[no-untyped-call]
        z1.grad = z2.grad = None
        return time.perf_counter() - start

    for options in OBJECTIVES.values():  # warm-up
        step(options)
    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    for _ in range(args.rounds):
        for name, options in OBJECTIVES.items():
            times[name].append(step(options))
    plain = times["plain"]
    print("| objective | median s | time / plain |\n|---|---|---|")
    for name, series in times.items():
        ratio = statistics.median(t / p for t, p in zip(series, plain, strict=True))
        print(f"| {name} | {statistics.median(series):.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
