"""One sentence-transformers training step: InfoNCELoss against MNRL and CachedMNRL, on the CPU.

The model is the example's tiny BERT (``examples/sentence_transformers_example.py``:
two layers, hidden 64, word-level tokenizer, built offline); a batch is B
rows of (anchor, positive, 3 hard negatives), tokenized before the step. A
step is what the trainer does with a batch: the loss, its backward and an
AdamW step. Rows:

* ``info_nce``: ``InfoNCELoss(model, mini_batch_size=m)`` (shared hard
  negatives, grad_cache over the columns);
* ``cached``: ``CachedMultipleNegativesRankingLoss(model, scale=20,
  mini_batch_size=m)``;
* ``mnrl``: ``MultipleNegativesRankingLoss(model, scale=20)``.

Each (row, B) runs in a fresh process: one warm-up step, then the median
time of ``--repeats`` steps; the peak is the growth of the process's
resident set size (``ru_maxrss``) over the steps, above what it held with
the model built and the batch tokenized. A row stops at the first B whose
peak passes ``--stop-above`` MiB (larger ones would only be larger).

Then the largest B of the doubling series from 256 (up to
``--largest-up-to``) that each loss reaches with its peak under ``--cap``
MiB, one step after the warm-up. Run from the repository root (after
``make setup``):

    .venv/bin/python benchmarks/st_training.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

NEGATIVES = 3
LOSSES = ("info_nce", "cached", "mnrl")


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure(name: str, batch: int, mini_batch: int, repeats: int) -> dict[str, float]:
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers_example import tiny_bert, triplets
    from transformers.utils import logging as hf_logging

    from info_nce.integrations.sentence_transformers import InfoNCELoss

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = tiny_bert()
    loss_fn: torch.nn.Module
    if name == "info_nce":
        loss_fn = InfoNCELoss(model, temperature=0.05, mini_batch_size=mini_batch)
    elif name == "cached":
        loss_fn = losses.CachedMultipleNegativesRankingLoss(
            model, scale=20.0, mini_batch_size=mini_batch
        )
    else:
        loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    features = [model.preprocess(texts) for texts in triplets(batch, 0, NEGATIVES).values()]

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(features, None).backward()
        optimizer.step()
        return time.perf_counter() - start

    before = peak_kib()
    step()  # warm-up
    seconds = statistics.median(step() for _ in range(repeats))
    return {"seconds": seconds, "peak_mib": (peak_kib() - before) / 1024}


def run(name: str, batch: int, args: argparse.Namespace, repeats: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", name, str(batch)]
    command += ["--mini-batch", str(args.mini_batch), "--repeats", str(repeats)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--mini-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stop-above", type=float, default=8192.0, help="MiB")
    parser.add_argument("--cap", type=float, default=1024.0, help="MiB, for the largest batch")
    parser.add_argument("--largest-up-to", type=int, default=32768)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, batch = args.worker[0], int(args.worker[1])
        print(json.dumps(measure(name, batch, args.mini_batch, args.repeats)))
        return

    import sentence_transformers

    print(
        f"tiny BERT (2 layers, hidden 64), B rows of (anchor, positive, {NEGATIVES} hard "
        f"negatives), mini-batch {args.mini_batch}, torch {torch.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| B | " + " | ".join(f"{n} s | {n} MiB" for n in LOSSES) + " | info_nce time vs cached |"
    )
    print("|---|" + "---|" * (2 * len(LOSSES) + 1))
    stopped: set[str] = set()
    for batch in args.batches:
        results: dict[str, dict[str, float]] = {}
        cells = []
        for name in LOSSES:
            if name in stopped:
                cells += ["not run", "-"]
                continue
            results[name] = run(name, batch, args, args.repeats)
            cells += [f"{results[name]['seconds']:.2f}", f"{results[name]['peak_mib']:.0f}"]
            if results[name]["peak_mib"] > args.stop_above:
                stopped.add(name)
        ratio = results["info_nce"]["seconds"] / results["cached"]["seconds"]
        print(f"| {batch} | " + " | ".join(cells) + f" | {ratio:.2f} |", flush=True)

    print(f"\nlargest B (doubling from 256) with the step's peak under {args.cap:.0f} MiB:")
    for name in LOSSES:
        largest, batch = None, 256
        while batch <= args.largest_up_to:
            result = run(name, batch, args, 1)
            if result["peak_mib"] > args.cap:
                break
            largest, batch = (batch, result), 2 * batch
        if largest is None:
            print(f"- {name}: none")
        else:
            b, r = largest
            reached = "" if batch <= args.largest_up_to else " (the largest tried)"
            print(f"- {name}: {b}{reached}, {r['seconds']:.2f} s, {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
