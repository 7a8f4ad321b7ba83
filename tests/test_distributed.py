"""Tests of `gather_distributed` (src/info_nce/distributed.py and its use in functional.py).

The contract: W processes, each taking its slice of a global batch, with gradients
averaged across ranks as DistributedDataParallel does, get the parameter gradients
and (as the mean of the ranks' losses) the loss of one process on the concatenated
batch; with ``reduction='sum'``/``'none'`` the sums/rows add up exactly for unequal
local batch sizes. Every check runs real gloo process groups on 127.0.0.1: no mocks
of the collectives.

Starting processes costs seconds (each imports torch, and DDP imports more), so all
cases run in ONE spawned run per world size, W = 2 and 3 side by side (a module-scoped
fixture; each rank writes its results to a file); the tests then compare each case,
in the parent, with one process (no process group) on the concatenated batch.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.distributed as dist
from ranks import free_ports, init_gloo, join_ranks, run_ranks, start_ranks
from reference import assert_close as assert_close_scaled
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from info_nce import InfoNCE, NTXent, SigLIPLoss, info_nce, nt_xent, siglip_loss

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-10  # float64, relative and absolute
TEMPERATURE = 0.2
BIAS = -2.0  # SigLIP's
IN_FEATURES, HIDDEN, EMBEDDING = 5, 7, 6
PAIRED_NEGATIVES = 3  # negatives per query in paired mode
CLASSES = 3  # labels are arange(B) % CLASSES: repeated, and spread over the ranks
WORLD_SIZES = (2, 3)
GTE = ("query_to_key", "key_to_query", "query_to_query", "key_to_key")
GUIDE_WIDTH = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    """One configuration of the loss, run on W ranks and on one process."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)  # keywords of InfoNCE / info_nce
    negatives: Literal["unpaired", "paired", "shared"] | None = None
    labels: bool = False
    mask: bool = False  # negative_mask (paired, shared): some padding, one row all padding
    reduction: Literal["mean", "sum", "none"] = "mean"
    unequal: bool = False  # local batch sizes 5, 3, 4 instead of 4 each
    unequal_negatives: bool = False  # shares of unpaired negatives 2, 5, 1 instead of 3 each
    learn_temperature: bool = True  # InfoNCE(learn_temperature=True); else info_nce, a float
    ddp: bool = False  # DistributedDataParallel averages (slow to build); else all_reduce / W
    upstream: float = 1.0  # backward of upstream * loss
    backward_twice: bool = False  # backward(retain_graph=True) twice: the gradients double
    frozen_query: bool = False  # the queries carry no gradient (a frozen query encoder)
    guide: bool = False  # a guide model's embeddings of the inputs (false-negative filtering)
    no_grad: bool = False  # forward under torch.no_grad() (evaluation): the loss only
    views: int = 0  # V >= 2: NTXent / nt_xent over V views (the encoders' outputs) instead
    negative_labels: bool = False  # labels of the unpaired negatives (a labelled queue's)
    # SigLIPLoss (a learnable temperature and bias; unpaired negatives only) or,
    # without learn_temperature, siglip_loss with numbers.
    siglip: bool = False


CASES = [
    Case("plain-ddp", ddp=True),
    Case("plain-fixed-temperature", learn_temperature=False),
    Case("symmetric", {"symmetric": True}),
    Case("labels", labels=True),
    Case("symmetric-labels-ddp", {"symmetric": True}, labels=True, ddp=True),
    Case("unpaired", negatives="unpaired"),
    Case("unpaired-unequal-shares", negatives="unpaired", unequal_negatives=True),
    Case("unpaired-symmetric", {"symmetric": True}, negatives="unpaired"),
    Case("unpaired-in-batch", {"in_batch_negatives": True}, negatives="unpaired"),
    Case(
        "unpaired-in-batch-symmetric-labels-ddp",
        {"in_batch_negatives": True, "symmetric": True},
        negatives="unpaired",
        labels=True,
        ddp=True,
    ),
    Case("paired", negatives="paired"),
    Case("paired-mask", negatives="paired", mask=True),
    Case("paired-in-batch", {"in_batch_negatives": True}, negatives="paired"),
    Case("paired-in-batch-mask", {"in_batch_negatives": True}, negatives="paired", mask=True),
    Case("paired-symmetric", {"symmetric": True}, negatives="paired"),
    Case(
        "paired-in-batch-symmetric-labels-mask-ddp",
        {"in_batch_negatives": True, "symmetric": True},
        negatives="paired",
        labels=True,
        mask=True,
        ddp=True,
    ),
    # Shared negatives: every query against all ranks' B * M; its own M are hard.
    Case("shared", negatives="shared"),
    Case("shared-mask-unequal-none", negatives="shared", mask=True, unequal=True, reduction="none"),
    Case(
        "shared-hardness-mask-unequal-sum",
        {"hardness_mode": "all_negatives", "hardness_strength": 4.0},
        negatives="shared",
        mask=True,
        unequal=True,
        reduction="sum",
    ),
    Case(
        "shared-hardness-symmetric-blockwise-none",
        {
            "hardness_mode": "in_batch_negatives",
            "hardness_strength": 2.0,
            "symmetric": True,
            "chunk_size": 2,
        },
        negatives="shared",
        mask=True,
        reduction="none",
    ),
    Case(
        "shared-hard-negatives-no-in-batch-blockwise",
        {
            "hardness_mode": "hard_negatives",
            "hardness_strength": 3.0,
            "in_batch_negatives": False,
            "chunk_size": 2,
        },
        negatives="shared",
        mask=True,
        learn_temperature=False,
    ),
    Case(
        "unpaired-hardness-in-batch-ddp",
        {"hardness_mode": "all_negatives", "hardness_strength": 3.0, "in_batch_negatives": True},
        negatives="unpaired",
        unequal_negatives=True,
        ddp=True,
    ),
    # GTE's joint loss of four directions: every direction's candidates from all ranks.
    Case("gte-ddp", {"directions": GTE}, ddp=True),
    Case(
        "gte-shared-mask-unequal-sum",
        {"directions": GTE},
        negatives="shared",
        mask=True,
        unequal=True,
        reduction="sum",
    ),
    Case(
        "gte-shared-hardness-blockwise-none",
        {
            "directions": GTE,
            "hardness_mode": "all_negatives",
            "hardness_strength": 2.0,
            "chunk_size": 2,
        },
        negatives="shared",
        mask=True,
        reduction="none",
    ),
    # Guided false-negative filtering: the guide's embeddings are gathered like theirs.
    Case(
        "gte-shared-guide-mask-unequal-sum",
        {"directions": GTE, "false_negative_margin": 0.1},
        negatives="shared",
        mask=True,
        unequal=True,
        reduction="sum",
        guide=True,
    ),
    Case(
        "gte-shared-guide-hardness-blockwise-ddp",
        {
            "directions": GTE,
            "false_negative_margin": 0.05,
            "margin_strategy": "relative",
            "hardness_mode": "all_negatives",
            "hardness_strength": 2.0,
            "chunk_size": 2,
        },
        negatives="shared",
        guide=True,
        ddp=True,
    ),
    Case(
        "symmetric-self-guided-none",
        {"symmetric": True, "false_negative_margin": -0.05},
        reduction="none",
    ),
    Case(
        "unpaired-guide-in-batch-fixed-temperature",
        {"in_batch_negatives": True, "false_negative_margin": 0.0},
        negatives="unpaired",
        unequal_negatives=True,
        learn_temperature=False,
        guide=True,
    ),
    Case(
        "joint-key-to-key-unpaired-fixed-temperature",
        {"directions": ("query_to_key", "key_to_key"), "in_batch_negatives": True},
        negatives="unpaired",
        unequal_negatives=True,
        learn_temperature=False,
    ),
    Case("no-normalize", {"normalize": False}),
    Case(
        "no-normalize-unpaired-in-batch-symmetric",
        {"normalize": False, "in_batch_negatives": True, "symmetric": True},
        negatives="unpaired",
    ),
    Case("no-normalize-paired-mask", {"normalize": False}, negatives="paired", mask=True),
    Case("blockwise", {"chunk_size": 2}),
    Case("blockwise-fixed-temperature", {"chunk_size": 2}, learn_temperature=False),
    Case(
        "blockwise-symmetric-labels-unpaired-ddp",
        {"chunk_size": 2, "symmetric": True},
        negatives="unpaired",
        labels=True,
        ddp=True,
    ),
    Case(
        "blockwise-paired-in-batch-mask",
        {"chunk_size": 2, "in_batch_negatives": True},
        negatives="paired",
        mask=True,
    ),
    Case("blockwise-paired", {"chunk_size": 2}, negatives="paired"),
    # The engine builds gradients in the forward pass: they must scale with the upstream one.
    Case("upstream-gradient-symmetric", {"symmetric": True}, upstream=2.5),
    Case(
        "upstream-gradient-blockwise-unpaired",
        {"chunk_size": 2},
        negatives="unpaired",
        upstream=-0.7,
    ),
    Case(
        "backward-twice-unpaired-in-batch-symmetric",
        {"in_batch_negatives": True, "symmetric": True},
        negatives="unpaired",
        backward_twice=True,
    ),
    Case("frozen-query-symmetric", {"symmetric": True}, frozen_query=True),
    Case("no-grad-symmetric-labels", {"symmetric": True}, labels=True, no_grad=True),
    # Unequal local batch sizes: the sums add up, and so do the summed gradients.
    Case("sum-unequal", reduction="sum", unequal=True),
    Case(
        "sum-unequal-symmetric-labels-ddp",
        {"symmetric": True},
        labels=True,
        reduction="sum",
        unequal=True,
        ddp=True,
    ),
    Case(
        "sum-unequal-unpaired-in-batch-unequal-shares",
        {"in_batch_negatives": True},
        negatives="unpaired",
        reduction="sum",
        unequal=True,
        unequal_negatives=True,
    ),
    Case("sum-unequal-paired-mask", negatives="paired", mask=True, reduction="sum", unequal=True),
    Case(
        "sum-unequal-blockwise-symmetric-unpaired",
        {"chunk_size": 2, "symmetric": True},
        negatives="unpaired",
        reduction="sum",
        unequal=True,
        unequal_negatives=True,
    ),
    Case("sum-fixed-temperature", reduction="sum", learn_temperature=False),
    # reduction='none': each rank's rows are the single process's rows.
    Case("none", reduction="none"),
    Case(
        "none-unequal-symmetric-labels",
        {"symmetric": True},
        labels=True,
        reduction="none",
        unequal=True,
    ),
    Case(
        "none-unequal-unpaired-unequal-shares",
        negatives="unpaired",
        reduction="none",
        unequal=True,
        unequal_negatives=True,
    ),
    # NT-Xent over V views: each rank's anchors against all ranks' embeddings.
    Case("nt-xent", views=2),
    Case("nt-xent-V3-labels-ddp", views=3, labels=True, ddp=True),
    Case("nt-xent-first-fixed-temperature", {"anchors": "first"}, views=2, learn_temperature=False),
    Case("nt-xent-blockwise-no-normalize", {"chunk_size": 2, "normalize": False}, views=2),
    Case("nt-xent-sum-unequal-V3", views=3, reduction="sum", unequal=True),
    Case(
        "nt-xent-none-unequal-labels-blockwise",
        {"chunk_size": 3},
        views=2,
        labels=True,
        reduction="none",
        unequal=True,
    ),
    Case(
        "nt-xent-none-unequal-first-fixed-temperature",
        {"anchors": "first"},
        views=3,
        reduction="none",
        unequal=True,
        learn_temperature=False,
    ),
    Case(
        "none-unequal-blockwise-paired-in-batch-mask-ddp",
        {"chunk_size": 2, "in_batch_negatives": True},
        negatives="paired",
        mask=True,
        reduction="none",
        unequal=True,
        ddp=True,
    ),
    # The objective variants: the decoupled loss with labels (every positive out
    # of the denominator, across ranks), the debiased and hard-negative losses
    # with N counting every rank's negatives.
    Case(
        "decoupled-symmetric-labels-ddp",
        {"decoupled": True, "symmetric": True},
        labels=True,
        ddp=True,
    ),
    Case(
        "decoupled-blockwise-paired-in-batch-mask-sum-unequal",
        {"decoupled": True, "chunk_size": 2, "in_batch_negatives": True},
        negatives="paired",
        mask=True,
        reduction="sum",
        unequal=True,
    ),
    Case("decoupled-nt-xent-V3-labels", {"decoupled": True}, views=3, labels=True),
    Case(
        "decoupled-nt-xent-blockwise-none-unequal",
        {"decoupled": True, "chunk_size": 3},
        views=2,
        reduction="none",
        unequal=True,
    ),
    Case("debiased-symmetric", {"false_negative_rate": 0.1, "symmetric": True}),
    Case(
        "debiased-blockwise-unpaired-unequal-shares",
        {"false_negative_rate": 0.1, "chunk_size": 2},
        negatives="unpaired",
        unequal_negatives=True,
    ),
    Case(
        "hard-negative-blockwise-symmetric-ddp",
        {"false_negative_rate": 0.1, "hard_negative_beta": 1.0, "chunk_size": 2, "symmetric": True},
        ddp=True,
    ),
    Case(
        "hard-negative-paired-in-batch-mask-none-unequal",
        {"false_negative_rate": 0.1, "hard_negative_beta": 1.0, "in_batch_negatives": True},
        negatives="paired",
        mask=True,
        reduction="none",
        unequal=True,
    ),
    Case(
        "hard-negative-nt-xent-blockwise-sum-unequal",
        {"false_negative_rate": 0.1, "hard_negative_beta": 1.0, "chunk_size": 3},
        views=2,
        reduction="sum",
        unequal=True,
    ),
    Case("hard-negative-nt-xent-first", {"hard_negative_beta": 0.5, "anchors": "first"}, views=2),
    # negative_labels (cross-batch memory): gathered with their negatives.
    Case(
        "negative-labels-symmetric-unequal-shares",
        {"symmetric": True},
        negatives="unpaired",
        labels=True,
        negative_labels=True,
        unequal_negatives=True,
        learn_temperature=False,
    ),
    Case(
        "negative-labels-decoupled-blockwise-none-unequal",
        {"decoupled": True, "chunk_size": 2},
        negatives="unpaired",
        labels=True,
        negative_labels=True,
        reduction="none",
        unequal=True,
        learn_temperature=False,
    ),
    Case(
        "nt-xent-negatives-negative-labels-unequal-shares",
        views=2,
        negatives="unpaired",
        labels=True,
        negative_labels=True,
        unequal_negatives=True,
        learn_temperature=False,
    ),
    Case(
        "nt-xent-negatives-decoupled-blockwise",
        {"decoupled": True, "chunk_size": 3},
        views=3,
        negatives="unpaired",
        learn_temperature=False,
    ),
    # SigLIP: the temperature's and the bias's gradients equal one process's too.
    Case("siglip-ddp", siglip=True, ddp=True),
    Case(
        "siglip-labels-negatives-unequal-shares",
        siglip=True,
        labels=True,
        negatives="unpaired",
        unequal_negatives=True,
    ),
    Case("siglip-unequal-sum", siglip=True, unequal=True, reduction="sum"),
    Case(
        "siglip-labels-blockwise-unequal-none",
        {"chunk_size": 2},
        siglip=True,
        labels=True,
        unequal=True,
        reduction="none",
    ),
    Case(
        "siglip-fixed-negatives-blockwise",
        {"chunk_size": 3},
        siglip=True,
        negatives="unpaired",
        learn_temperature=False,
    ),
]
CASE_IDS = [case.name for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case names must be unique"


def local_sizes(case: Case, world: int) -> list[int]:
    return [5, 3, 4][:world] if case.unequal else [4] * world


def negative_shares(case: Case, world: int) -> list[int]:
    return [2, 5, 1][:world] if case.unequal_negatives else [3] * world


def rows_of(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


class TwoTower(nn.Module):
    """A 2-layer query encoder, a linear key encoder and the loss (with its temperature)."""

    def __init__(self, case: Case, gather: bool) -> None:
        super().__init__()
        self.query_net = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, EMBEDDING)
        )
        self.key_net = nn.Linear(IN_FEATURES, EMBEDDING)
        # A frozen guide model of another width, for false-negative filtering.
        self.guide_net = nn.Linear(IN_FEATURES, GUIDE_WIDTH).requires_grad_(False)
        self.guided = case.guide
        self.frozen_query = case.frozen_query
        negative_mode: Literal["unpaired", "paired", "shared"] = case.negatives or "unpaired"
        self.views = case.views
        self.criterion: InfoNCE | NTXent | SigLIPLoss | None = None
        self.functional_options: dict[str, Any] = {}
        self.siglip = case.siglip
        if case.siglip:
            options = dict(reduction=case.reduction, gather_distributed=gather, **case.options)
            if case.learn_temperature:
                self.criterion = SigLIPLoss(TEMPERATURE, BIAS, **options)
            else:
                self.functional_options = dict(temperature=TEMPERATURE, bias=BIAS, **options)
        elif case.views:
            self.criterion = None
            options = dict(reduction=case.reduction, gather_distributed=gather, **case.options)
            if case.learn_temperature:
                self.criterion = NTXent(TEMPERATURE, learn_temperature=True, **options)
            else:
                self.functional_options = dict(temperature=TEMPERATURE, **options)
        elif case.learn_temperature:
            self.criterion = InfoNCE(
                TEMPERATURE,
                case.reduction,
                negative_mode,
                learn_temperature=True,
                gather_distributed=gather,
                **case.options,
            )
        else:
            self.functional_options = dict(
                temperature=TEMPERATURE,
                reduction=case.reduction,
                negative_mode=negative_mode,
                gather_distributed=gather,
                **case.options,
            )

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        negatives: Tensor | None,
        labels: Tensor | None,
        mask: Tensor | None,
        negative_labels: Tensor | None,
    ) -> Tensor:
        query, positive_key = self.query_net(x), self.key_net(y)  # (B, EMBEDDING)
        negative_keys = None if negatives is None else self.key_net(negatives)
        guide = None
        if self.guided:
            inputs = (x, y) if negatives is None else (x, y, negatives)
            guide = tuple(self.guide_net(z) for z in inputs)
        if self.views:
            views = [query, positive_key, self.query_net(y), self.key_net(x)][: self.views]
            if isinstance(self.criterion, NTXent):
                ntxent_loss: Tensor = self.criterion(*views, labels=labels)
                return ntxent_loss
            return nt_xent(
                views,
                labels,
                negative_keys=negative_keys,
                negative_labels=negative_labels,
                **self.functional_options,
            )
        if self.siglip:
            if isinstance(self.criterion, SigLIPLoss):
                siglip: Tensor = self.criterion(query, positive_key, labels, negative_keys)
                return siglip
            return siglip_loss(
                query,
                positive_key,
                labels=labels,
                negative_keys=negative_keys,
                **self.functional_options,
            )
        if self.frozen_query:
            query = query.detach()
        if isinstance(self.criterion, InfoNCE):
            loss: Tensor = self.criterion(
                query, positive_key, negative_keys, labels=labels, negative_mask=mask, guide=guide
            )
            return loss
        return info_nce(
            query,
            positive_key,
            negative_keys,
            labels=labels,
            negative_labels=negative_labels,
            negative_mask=mask,
            guide=guide,
            **self.functional_options,
        )


def inputs_for(case: Case, world: int, rank: int | None) -> dict[str, Tensor | None]:
    """Rank ``rank``'s share of the global batch of W ranks; all of it when rank is None."""
    sizes, shares = local_sizes(case, world), negative_shares(case, world)
    batch = sum(sizes)
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, IN_FEATURES, dtype=torch.float64, generator=generator)
    y = x + 0.5 * torch.randn(batch, IN_FEATURES, dtype=torch.float64, generator=generator)
    unpaired = torch.randn(sum(shares), IN_FEATURES, dtype=torch.float64, generator=generator)
    paired = torch.randn(
        batch, PAIRED_NEGATIVES, IN_FEATURES, dtype=torch.float64, generator=generator
    )
    mask = torch.rand(batch, PAIRED_NEGATIVES, generator=generator) > 0.4
    mask[1] = False  # a query with no valid negative
    mask[-1] = True
    weights = torch.randn(batch, dtype=torch.float64, generator=generator)
    rows = slice(None) if rank is None else rows_of(sizes, rank)
    negative_rows = slice(None) if rank is None else rows_of(shares, rank)
    negatives = None
    if case.negatives == "unpaired":
        negatives = unpaired[negative_rows]
    elif case.negatives in ("paired", "shared"):
        negatives = paired[rows]
    return {
        "x": x[rows],
        "y": y[rows],
        "negatives": negatives,
        "labels": (torch.arange(batch) % CLASSES)[rows] if case.labels else None,
        "mask": mask[rows] if case.mask else None,
        # CLASSES + 1 labels: some negatives share a query's label, some share none.
        "negative_labels": (
            (torch.arange(sum(shares)) % (CLASSES + 1))[negative_rows]
            if case.negative_labels
            else None
        ),
        "weights": weights[rows],  # the upstream gradient of reduction='none'
    }


def run_case(case: Case, world: int, rank: int | None, gather: bool) -> dict[str, Any]:
    """Loss and parameter gradients of one case on this process's share of the batch.

    In a process group of W > 1 ranks the gradients come back reduced across ranks:
    averaged for ``'mean'`` (by DDP, or all_reduce / W), summed for ``'sum'`` and
    ``'none'``, i.e. what must equal one process's gradient on the whole batch.
    """
    inputs = inputs_for(case, world, rank)
    weights = inputs.pop("weights")
    assert weights is not None
    with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
        torch.manual_seed(0)  # the same initial parameters everywhere
        model = TwoTower(case, gather).double()
    in_group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    # DDP only where it averages something: its first construction costs seconds of imports.
    network: nn.Module = DistributedDataParallel(model) if case.ddp and in_group else model
    if case.no_grad:
        with torch.no_grad():
            return {"loss": network(**inputs), "grads": {}}
    loss = network(**inputs)
    objective = (weights * loss).sum() if case.reduction == "none" else loss
    for _ in range(2 if case.backward_twice else 1):
        (case.upstream * objective).backward(retain_graph=case.backward_twice)
    grads = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.grad is not None
    }
    if in_group and grads:
        world_size = dist.get_world_size()
        if case.ddp:  # DDP averaged; the contract for 'sum'/'none' is the sum
            scale = 1.0 if case.reduction == "mean" else float(world_size)
        else:  # the sum over ranks, in one all_reduce; averaged as DDP does for 'mean'
            flat = torch.cat([grad.flatten() for grad in grads.values()])
            dist.all_reduce(flat)
            start = 0
            for grad in grads.values():
                grad.copy_(flat[start : start + grad.numel()].view_as(grad))
                start += grad.numel()
            scale = 1.0 / world_size if case.reduction == "mean" else 1.0
        for grad in grads.values():
            grad *= scale
    return {"loss": loss.detach().clone(), "grads": grads}


def run_all(world: int, rank: int | None, gather: bool) -> dict[str, dict[str, Any]]:
    """Every case; a case that raises records its traceback instead of stopping the run."""
    results: dict[str, dict[str, Any]] = {}
    for case in CASES:
        try:
            results[case.name] = run_case(case, world, rank, gather)
        except Exception:
            results[case.name] = {"error": traceback.format_exc()}
    return results


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a spawned run: every case with gather_distributed=True, saved to a file."""
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    init_gloo(rank, world, port)
    try:
        results = run_all(world, rank, gather=True)
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """One spawned run per world size over all cases, both at once: each rank's results."""
    out_dir = tmp_path_factory.mktemp("ranks")
    ports = free_ports(len(WORLD_SIZES))
    join_ranks(
        *(
            start_ranks(_worker, world, port, str(out_dir / f"world{world}"))
            for world, port in zip(WORLD_SIZES, ports, strict=True)
        )
    )
    return {
        world: [torch.load(out_dir / f"world{world}" / f"rank{rank}.pt") for rank in range(world)]
        for world in WORLD_SIZES
    }


# Elementwise |actual - expected| <= TOLERANCE * (1 + |expected|); names the worst element.
assert_close = functools.partial(assert_close_scaled, rtol=TOLERANCE, atol=TOLERANCE, scale=1.0)


def identical(actual: Tensor, expected: Tensor) -> bool:
    """The same shape and values, NaN where the other has NaN."""
    return actual.shape == expected.shape and bool(
        ((actual == expected) | (actual.isnan() & expected.isnan())).all()
    )


def assert_equal(actual: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    """The same loss and gradients, bit for bit."""
    assert identical(actual["loss"], expected["loss"]), (
        f"{what}: loss {actual['loss']} != {expected['loss']}"
    )
    assert actual["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        assert identical(actual["grads"][name], grad), (
            f"{what}: gradient of {name}: {actual['grads'][name]} != {grad}"
        )


def no_error(result: dict[str, Any], what: str) -> dict[str, Any]:
    if "error" in result:
        pytest.fail(f"{what} raised:\n{result['error']}")
    return result


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda world: f"W{world}")
def test_ranks_match_one_process(
    spawned: dict[int, list[dict[str, Any]]], world: int, case: Case
) -> None:
    per_rank = spawned[world]
    results = [
        no_error(ranks[case.name], f"W={world} rank {r}") for r, ranks in enumerate(per_rank)
    ]
    reference = run_case(case, world, rank=None, gather=False)
    what = f"W={world}, case {case.name!r}"

    losses = [result["loss"] for result in results]
    if case.reduction == "none":
        sizes = local_sizes(case, world)
        for rank, loss in enumerate(losses):
            rows = reference["loss"][..., rows_of(sizes, rank)]  # (B,) or NT-Xent's (V, B)
            assert_close(loss, rows, name=f"{what}: rank {rank}'s rows of reduction='none'")
    elif case.reduction == "sum":
        assert_close(
            torch.stack(losses).sum(), reference["loss"], name=f"{what}: sum of ranks' losses"
        )
    else:
        assert_close(
            torch.stack(losses).mean(), reference["loss"], name=f"{what}: mean of ranks' losses"
        )

    averaged = "summed" if case.reduction != "mean" else "averaged"
    for rank, result in enumerate(results):
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            assert_close(
                result["grads"][name],
                grad,
                name=f"{what}: rank {rank}'s {averaged} gradient of {name}",
            )


@pytest.fixture(scope="module")
def one_rank_group() -> dict[bool, dict[str, dict[str, Any]]]:
    """All cases in a gloo process group of one rank (this process), gather on and off."""
    assert not dist.is_initialized()
    init_gloo(0, 1, free_ports(1)[0])
    try:
        return {gather: run_all(1, 0, gather) for gather in (True, False)}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_rank_group_is_unchanged(
    one_rank_group: dict[bool, dict[str, dict[str, Any]]], case: Case
) -> None:
    what = f"W=1 process group, case {case.name!r}"
    assert_equal(
        no_error(one_rank_group[True][case.name], what + ", gather_distributed=True"),
        no_error(one_rank_group[False][case.name], what + ", gather_distributed=False"),
        what,
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_process_group_is_unchanged(case: Case) -> None:
    assert not dist.is_initialized()
    assert_equal(
        run_case(case, 1, None, gather=True),
        run_case(case, 1, None, gather=False),
        f"no process group, case {case.name!r}",
    )


def test_import_and_rank_without_process_group_in_fresh_process() -> None:
    code = (
        "import torch.distributed as dist\n"
        "import info_nce\n"
        "from info_nce import distributed\n"
        "assert not dist.is_initialized()\n"
        "print(distributed.world_size(), distributed.rank(), distributed.is_distributed())\n"
        # A torch built without distributed support: is_available() is False.
        "dist.is_available = lambda: False\n"
        "print(distributed.world_size(), distributed.rank(), distributed.is_distributed())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1 0 False", "1 0 False"], result.stdout


def test_torchrun_example_runs() -> None:
    """The README's command, with fewer steps."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "examples/torchrun_example.py",
        "--steps",
        "3",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    steps = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 3, result.stdout


# --- A rank with an empty share of the batch ------------------------------------------------

EMPTY_RANK_CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "symmetric-labels": {"symmetric": True, "labels": True},
    "unpaired": {"negatives": True},
    "nt-xent": {"views": True},
    "nt-xent-labels-decoupled": {"views": True, "labels": True, "decoupled": True},
    "gte-shared-self-guided-hardness": {
        "shared": True,
        "directions": GTE,
        "false_negative_margin": 0.05,
        "hardness_mode": "all_negatives",
        "hardness_strength": 2.0,
    },
    "siglip-labels-negatives": {"siglip": True, "labels": True, "negatives": True},
    "siglip-none": {"siglip": True, "reduction": "none"},
}


def empty_rank_case(name: str, rank: int | None) -> tuple[Tensor, list[Tensor]]:
    """Case ``name`` on ``rank``'s share with gather_distributed: its loss and its gradients.

    Rank 0 holds 5 queries and keys, rank 1 none; each holds 3 of the 6
    unpaired negatives. ``rank=None``: one process, no gathering, with rank
    0's queries and keys and all 6 negatives.
    """
    options = dict(EMPTY_RANK_CASES[name])
    generator = torch.Generator().manual_seed(7)
    batch = 0 if rank == 1 else 5
    query = torch.randn(5, 4, generator=generator, dtype=torch.float64)[:batch].requires_grad_()
    key = torch.randn(5, 4, generator=generator, dtype=torch.float64)[:batch].requires_grad_()
    negatives = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    shared = torch.randn(5, 2, 4, generator=generator, dtype=torch.float64)[:batch]
    if rank is not None:
        negatives = negatives[3 * rank : 3 * rank + 3]
        options["gather_distributed"] = True
    labels = (torch.arange(5) % 2)[:batch] if options.pop("labels", False) else None
    if options.pop("siglip", False):
        unpaired = negatives if options.pop("negatives", False) else None
        loss = siglip_loss(query, key, 0.2, BIAS, labels=labels, negative_keys=unpaired, **options)
    elif options.pop("views", False):
        loss = nt_xent([query, key], labels, **options)
    elif options.pop("shared", False):  # two shared negatives per query
        loss = info_nce(query, key, shared, negative_mode="shared", **options)
    else:
        unpaired = negatives if options.pop("negatives", False) else None
        loss = info_nce(query, key, unpaired, labels=labels, **options)
    grads = torch.autograd.grad(loss, [query, key], torch.ones_like(loss), allow_unused=True)
    zeros = (torch.zeros_like(query), torch.zeros_like(key))
    return loss.detach(), [z if g is None else g for z, g in zip(zeros, grads, strict=True)]


def _empty_rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        results = {name: empty_rank_case(name, rank) for name in EMPTY_RANK_CASES}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_rank_with_an_empty_batch_takes_part_with_zero_loss(tmp_path: Path) -> None:
    # Rank 1's share of the batch is empty (the tail of an uneven epoch): it
    # takes part in every collective (no rank hangs; the gloo timeout would
    # fail the run), its loss is 0 and it has no gradient, and rank 0's loss
    # and gradients are one process's on rank 0's batch with both ranks'
    # negatives.
    run_ranks(_empty_rank_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, options in EMPTY_RANK_CASES.items():
        loss, grads = ranks[1][name]
        none = options.get("reduction") == "none"
        assert loss.shape == ((0,) if none else ()), name
        assert torch.all(loss == 0), name
        assert all(grad.numel() == 0 for grad in grads), name
        got_loss, got_grads = ranks[0][name]
        want_loss, want_grads = empty_rank_case(name, None)
        assert_close_scaled(got_loss, want_loss, rtol=TOLERANCE, atol=TOLERANCE, name=name)
        for got, want in zip(got_grads, want_grads, strict=True):
            assert_close_scaled(got, want, rtol=TOLERANCE, atol=TOLERANCE, name=name)
