"""One training step's peak memory (the whole process, RSS) and time: plain, grad_cache, dense.

The demo's encoder (an MLP, ``--hidden-width`` wide, so that activations
dominate) embeds 2B observations (B positive pairs); the loss is InfoNCE of
the first B against the second B. Rows:

* ``plain``: the encoder in one pass, our loss, backward;
* ``grad_cache``: ``info_nce.grad_cache(encoder, x, chunk_size=C)``, our loss, backward;
* ``dense``: the encoder in one pass and the loss as a plain logits matrix
  with ``F.cross_entropy`` (what a user writes), backward.

Each (row, batch) runs in a fresh process: the peak is that process's
``ru_maxrss`` over the step (the step's time is its second run, after a
warm-up step). Run from the repository root (after `make setup`):

    .venv/bin/python benchmarks/grad_cache.py --batches 1024 8192 65536 --chunk 1024
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from info_nce import grad_cache, info_nce
from info_nce.cli.demo import make_encoder

DIM = 10  # the demo's latent dimension


def step(kind: str, batch: int, chunk: int, width: int, layers: int) -> None:
    generator = torch.Generator().manual_seed(0)
    encoder = make_encoder(DIM, width, layers, generator)
    x = torch.randn(2 * batch, DIM, generator=generator)
    cached = kind == "grad_cache"
    embeddings = grad_cache(encoder, x, chunk_size=chunk) if cached else encoder(x)  # (2B, DIM)
    query, key = embeddings[:batch], embeddings[batch:]
    if kind == "dense":
        logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / 0.1  # (B, B)
        loss = F.cross_entropy(logits, torch.arange(batch))
    else:
        loss = info_nce(query, key, temperature=0.1)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 8192, 65536])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--hidden-width", type=int, default=1024)
    parser.add_argument("--hidden-layers", type=int, default=3)
    parser.add_argument("--dense-max", type=int, default=16384, help="largest B for the dense row")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, batch = args.worker[0], int(args.worker[1])
        shape = (kind, batch, args.chunk, args.hidden_width, args.hidden_layers)
        step(*shape)  # warm-up
        start = time.perf_counter()
        step(*shape)
        seconds = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{seconds} {peak_kib / 1024}")
        return
    print(
        f"encoder {DIM} -> {args.hidden_width} x {args.hidden_layers} -> {DIM}, B pairs "
        f"(2B embeddings), grad_cache chunk {args.chunk}, torch {torch.__version__}"
    )
    columns = ["plain s", "plain MiB", "grad_cache s", "grad_cache MiB", "dense s", "dense MiB"]
    print("| B | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        cells = []
        for kind in ("plain", "grad_cache", "dense"):
            if kind == "dense" and batch > args.dense_max:
                cells += ["not run", "-"]
                continue
            command = [sys.executable, __file__, "--worker", kind, str(batch)]
            command += ["--chunk", str(args.chunk), "--hidden-width", str(args.hidden_width)]
            command += ["--hidden-layers", str(args.hidden_layers)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            seconds, peak = (float(x) for x in output.split()[-2:])
            cells += [f"{seconds:.2f}", f"{peak:.0f}"]
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
