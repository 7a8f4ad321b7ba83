"""Train a tiny two-tower model on several CPU processes with one exact InfoNCE loss.

Each process embeds its own share of the batch; ``gather_distributed=True`` scores
its queries against the keys of every process, and DistributedDataParallel
averages the gradients, so the update is the one a single process would make on
the whole batch (see docs/distributed.md, "Distributed training" on the documentation site).

Run it on one machine, two processes (CPU, gloo), from the repository root:

    torchrun --standalone --nproc_per_node=2 examples/torchrun_example.py
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from info_nce import InfoNCE


class TwoTower(nn.Module):
    """A query encoder, a key encoder and the loss, whose learnable temperature DDP averages."""

    def __init__(self, in_features: int, embedding_size: int) -> None:
        super().__init__()
        self.query_encoder = nn.Sequential(
            nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, embedding_size)
        )
        self.key_encoder = nn.Sequential(
            nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, embedding_size)
        )
        self.loss = InfoNCE(
            temperature=0.1, symmetric=True, learn_temperature=True, gather_distributed=True
        )

    def forward(self, inputs: Tensor, views: Tensor) -> Tensor:
        loss: Tensor = self.loss(self.query_encoder(inputs), self.key_encoder(views))
        return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="pairs per process and step (default 64)"
    )
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets the rank, world size and address
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every process
    two_tower = TwoTower(in_features=32, embedding_size=16)
    model = DistributedDataParallel(two_tower)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Synthetic pairs: a sample and a noisy view of it; every process draws its own share.
    generator = torch.Generator().manual_seed(1 + rank)
    for step in range(args.steps):
        inputs = torch.randn(args.batch_size, 32, generator=generator)
        views = inputs + 0.3 * torch.randn(args.batch_size, 32, generator=generator)
        loss = model(inputs, views)  # mean over this process's pairs, against all keys
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the processes
        optimizer.step()
        if rank == 0:
            print(f"step {step:3d}  loss (rank 0) {loss.item():.4f}", flush=True)
    if rank == 0:
        with torch.no_grad():
            temperature = float(two_tower.loss.temperature)
        print(f"{world_size} processes x {args.batch_size} pairs; temperature {temperature:.4f}")
    # Tear down in order: DDP's reducer (which holds the process group) first,
    # then, once every process is here, the group. Otherwise gloo may abort a
    # process at exit ("terminate called without an active exception").
    del model, optimizer, loss
    gc.collect()  # no gloo work object may outlive the group with tensors in it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
