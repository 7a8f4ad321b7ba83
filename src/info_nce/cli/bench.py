"""`info-nce bench`: time and measure the loss against the dense reference and the floor.

Every (configuration, implementation) pair runs in a fresh Python process, so
peak memory is that process's own and no allocator state carries over. The
parent collects the results of one invocation and reports ratios from that
single run:

* ``reference``: info-nce-pytorch 0.1.4 loaded from its wheel when available
  (``--reference-wheel``), else this package's dense path; for the symmetric
  configuration a dense CLIP loss, for labels a dense supervised contrastive
  loss with a (B, B) mask, for NT-Xent the usual dense formula (one masked
  (2B, 2B) logits matrix and ``F.cross_entropy``), for the decoupled NT-Xent
  the same matrix with the positives masked out of the log-sum-exp, for
  the hard-negative loss its authors' estimator (exp space, a (2B, 2B - 2)
  matrix of negatives), and for the embedding recipes (C14, C15) the dense
  logits as sentence-transformers builds them (MNRL's similarity matrices,
  hardness penalties and GISTEmbed's guided mask), and for SigLIP (C13)
  open_clip's ``SigLipLoss`` read from its wheel (``--open-clip-wheel``),
  else the same formula written here as open_clip writes it;
* ``ours``: ``info_nce.info_nce`` (or ``nt_xent``) with its defaults (automatic dispatch);
* ``floor``: only the matrix products any exact implementation must do
  (logits, and the two gradient products), timed alone. For C14 that is the
  three products of the queries against all B * (1 + M) keys plus the guide's
  similarity product (G features, no gradient); for C15 the three products
  of each of the four directions (twelve B x B x D products: the joint
  softmax's rows are formed per pair, so the key-to-query block is a
  product of its own, as in sentence-transformers). SigLIP's floor is the
  three products of the in-batch loss, its sigmoid costing none.

Time is the median over a configuration's repeats of forward+backward passes
after a warm-up pass, and the median of those medians over several fresh
processes per implementation, run in interleaved rounds so that the machine's
drifting speed affects all implementations alike. Peak extra memory is the
rise of the process's peak resident set size over its size once the inputs
exist (Linux ``ru_maxrss``), the largest over those processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from info_nce import SigLIPLoss, info_nce, nt_xent
from info_nce._normalize import unit
from info_nce.dense import dense_info_nce

IMPLEMENTATIONS = ("reference", "ours", "floor")
DEFAULT_REFERENCE_WHEEL = Path(".venv/reference/info_nce_pytorch-0.1.4-py3-none-any.whl")
DEFAULT_OPEN_CLIP_WHEEL = Path(".venv/reference/open_clip_torch-3.3.0-py3-none-any.whl")


@dataclass(frozen=True)
class References:
    """The peers' wheels the reference implementations are read from (None: written here)."""

    info_nce_pytorch: Path | None = None
    open_clip: Path | None = None

    def arguments(self) -> list[str]:
        """The command-line arguments that give these wheels to a worker."""
        found = []
        if self.info_nce_pytorch is not None:
            found += ["--reference-wheel", str(self.info_nce_pytorch)]
        if self.open_clip is not None:
            found += ["--open-clip-wheel", str(self.open_clip)]
        return found


@dataclass(frozen=True)
class Config:
    """One benchmark problem (fp32, CPU)."""

    name: str
    mode: str  # "in-batch", "unpaired" or "paired"
    batch: int  # B
    negatives: int  # M (the in-batch candidates are the B positive keys)
    dim: int  # D
    repeats: int
    reference_fits: bool = True  # the dense loss fits in memory
    symmetric: bool = False  # reference: a dense CLIP loss
    classes: int = 0  # labels with this many classes; reference: dense SupCon with a (B, B) mask
    processes: int = 1  # fresh processes per implementation (more for sub-millisecond timings)
    views: int = 0  # NT-Xent over this many views of B samples (the two inputs); reference: dense
    objective: str = ""  # with views: "decoupled" or "hard-negative" (see OBJECTIVE_OPTIONS)
    temperature: float = 0.1
    queue: bool = False  # unpaired negatives without gradient (MoCo's queue): a two-product floor
    # The embedding recipes: shared negatives (mode "shared") with hardness
    # weighting and a guide of this width, or the joint loss of these directions.
    hardness: float = 0.0
    guide_width: int = 0
    margin: float = 0.1
    directions: tuple[str, ...] = ()
    siglip: bool = False  # SigLIP's sigmoid loss, its temperature and bias learnable

    def describe(self) -> str:
        if self.views:
            options = "".join(
                f", {name}={value}" for name, value in OBJECTIVE_OPTIONS[self.objective].items()
            )
            if self.temperature != 0.1:
                options += f", temperature={self.temperature}"
            return f"nt_xent V={self.views}{options}, B={self.batch}, D={self.dim}"
        shape = f"B={self.batch}"
        if self.siglip:
            return f"SigLIP, learnable temperature and bias, {shape}, D={self.dim}"
        if self.queue:
            return f"MoCo, queue (no gradient) {shape}, K={self.negatives}, D={self.dim}"
        if self.directions:
            return f"GTE joint, {len(self.directions)} directions, pairs {shape}, D={self.dim}"
        if self.mode == "shared":
            return (
                f"shared negatives {shape}, M={self.negatives}, D={self.dim}, hardness "
                f"alpha={self.hardness:g}, margin {self.margin:g}, guide G={self.guide_width}"
            )
        if self.mode != "in-batch":
            shape += f", M={self.negatives}"
        kind = "symmetric" if self.symmetric else self.mode
        if self.classes:
            kind += f", labels ({self.classes} classes)"
        return f"{kind} {shape}, D={self.dim}"


GTE = ("query_to_key", "key_to_query", "query_to_query", "key_to_key")

CONFIGS = {
    config.name: config
    for config in (
        Config("C0", "in-batch", 256, 0, 128, repeats=300, processes=15),
        Config("C1", "in-batch", 4096, 0, 256, repeats=7, processes=3),
        Config("C2", "in-batch", 16384, 0, 128, repeats=5, processes=3),
        Config("C3", "unpaired", 1024, 65536, 128, repeats=5, processes=3),
        Config("C4", "paired", 4096, 16, 768, repeats=7, processes=3),
        Config("C5", "in-batch", 65536, 0, 128, repeats=3, reference_fits=False),
        Config("C6", "in-batch", 8192, 0, 768, repeats=5, symmetric=True, processes=3),
        Config("C7", "in-batch", 8192, 0, 128, repeats=5, classes=10, processes=3),
        Config("C8", "in-batch", 8192, 0, 128, repeats=3, processes=3, views=2),
        Config(
            "C9", "in-batch", 8192, 0, 128, repeats=3, processes=3, views=2, objective="decoupled"
        ),
        Config(
            "C10",
            "in-batch",
            8192,
            0,
            128,
            repeats=3,
            processes=3,
            views=2,
            objective="hard-negative",
            temperature=0.5,
        ),
        Config("C11", "unpaired", 4096, 65536, 128, repeats=3, processes=3, queue=True),
        Config("C12", "unpaired", 256, 1 << 20, 128, repeats=3, reference_fits=False, queue=True),
        Config(
            "C14",
            "shared",
            4096,
            7,
            128,
            repeats=3,
            processes=3,
            temperature=0.05,
            hardness=5.0,
            guide_width=64,
        ),
        Config("C13", "in-batch", 16384, 0, 128, repeats=3, processes=3, siglip=True),
        Config("C15", "in-batch", 8192, 0, 128, repeats=3, processes=3, directions=GTE),
        # SigLIP at a batch whose dense (B, B) logits alone take 16 GiB.
        Config("C16", "in-batch", 65536, 0, 128, repeats=1, reference_fits=False, siglip=True),
    )
}

# The nt_xent options of each objective a configuration may name.
OBJECTIVE_OPTIONS: dict[str, dict[str, float | bool]] = {
    "": {},
    "decoupled": {"decoupled": True},
    "hard-negative": {"hard_negative_beta": 1.0, "false_negative_rate": 0.1},
}


def load_open_clip_siglip(wheel: Path) -> type[torch.nn.Module]:
    """open_clip's ``SigLipLoss``, read from its wheel's ``loss.py`` (it imports torch only)."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("open_clip/loss.py")
    module = types.ModuleType("open_clip_loss_reference")
    exec(compile(source, f"{wheel}/open_clip/loss.py", "exec"), module.__dict__)
    loss: type[torch.nn.Module] = module.SigLipLoss
    return loss


def _dense_siglip_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """SigLIP's loss as open_clip writes it: (B, B) logits and a (B, B) matrix of +-1 labels."""
    logits = scale * image @ text.T + bias  # (B, B)
    labels = 2 * torch.eye(len(image)) - torch.ones(len(image), len(image))  # (B, B)
    return -F.logsigmoid(labels * logits).sum() / len(image)


def load_reference(wheel: Path) -> Callable[..., Tensor]:
    """info-nce-pytorch's `info_nce`, read from its wheel (its import name clashes with ours)."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("info_nce/__init__.py")
    module = types.ModuleType("info_nce_pytorch_reference")
    exec(compile(source, f"{wheel}/info_nce/__init__.py", "exec"), module.__dict__)
    function: Callable[..., Tensor] = module.info_nce
    return function


def _inputs(config: Config, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, ...]] = [(config.batch, config.dim), (config.batch, config.dim)]
    if config.mode == "unpaired":
        shapes.append((config.negatives, config.dim))
    elif config.mode in ("paired", "shared"):
        shapes.append((config.batch, config.negatives, config.dim))
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    for k, tensor in enumerate(tensors):
        tensor.requires_grad_(not (config.queue and k == 2))  # a queue holds detached keys
    return tensors


def _negative_mode(config: Config) -> str:
    return config.mode if config.mode in ("paired", "shared") else "unpaired"


def _guide(config: Config, inputs: list[Tensor]) -> tuple[Tensor, ...]:
    """A guide model's embeddings (G features, no gradient) of the inputs."""
    generator = torch.Generator().manual_seed(1)
    width = config.guide_width
    return tuple(torch.randn(*x.shape[:-1], width, generator=generator) for x in inputs)


def _loss_step(config: Config, implementation: str, references: References) -> Callable[[], None]:
    """A closure running one forward+backward pass of `implementation`."""
    wheel = references.info_nce_pytorch
    inputs = _inputs(config)
    query, positive = inputs[:2]
    negatives = inputs[2] if len(inputs) > 2 else None
    mode = _negative_mode(config)
    labels = torch.arange(config.batch) % config.classes if config.classes else None
    temperature = config.temperature
    if implementation == "ours" and config.siglip:
        siglip = SigLIPLoss()
        inputs += list(siglip.parameters())  # their gradients are reset each step too

        def loss() -> Tensor:
            result: Tensor = siglip(query, positive)
            return result

    elif implementation == "reference" and config.siglip:
        # SigLIP's learnable parameters, as open_clip's model holds them.
        log_scale = torch.tensor(math.log(10.0), requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        inputs += [log_scale, bias]
        dense_siglip: Callable[..., Tensor] = _dense_siglip_loss
        if references.open_clip is not None:
            dense_siglip = load_open_clip_siglip(references.open_clip)()

        def loss() -> Tensor:
            return dense_siglip(unit(query), unit(positive), log_scale.exp(), bias)

    elif implementation == "ours" and config.views:
        options = OBJECTIVE_OPTIONS[config.objective]

        def loss() -> Tensor:
            return nt_xent([query, positive], temperature=temperature, **options)  # type: ignore[arg-type]

    elif implementation == "reference" and config.views:
        dense_loss = DENSE_NT_XENT[config.objective]

        def loss() -> Tensor:
            return dense_loss(query, positive, temperature)

    elif implementation == "ours" and config.directions:

        def loss() -> Tensor:
            return info_nce(query, positive, temperature=temperature, directions=config.directions)  # type: ignore[arg-type]

    elif implementation == "reference" and config.directions:

        def loss() -> Tensor:
            return _dense_gte_loss(query, positive, temperature)

    elif implementation == "ours" and config.guide_width:
        guide = _guide(config, inputs)

        def loss() -> Tensor:
            return info_nce(
                query,
                positive,
                negatives,
                temperature=temperature,
                negative_mode="shared",
                hardness_mode="all_negatives",
                hardness_strength=config.hardness,
                false_negative_margin=config.margin,
                guide=guide,
            )

    elif implementation == "reference" and config.guide_width:
        guide = _guide(config, inputs)
        assert negatives is not None

        def loss() -> Tensor:
            return _dense_shared_loss(query, positive, negatives, guide, config)

    elif implementation == "ours":

        def loss() -> Tensor:
            return info_nce(
                query,
                positive,
                negatives,
                negative_mode=mode,  # type: ignore[arg-type]
                symmetric=config.symmetric,
                labels=labels,
            )

    elif implementation == "reference" and config.symmetric:

        def loss() -> Tensor:
            return _dense_clip_loss(query, positive)

    elif implementation == "reference" and labels is not None:

        def loss() -> Tensor:
            return _dense_supervised_contrastive_loss(query, positive, labels)

    elif implementation == "reference" and wheel is not None:
        reference = load_reference(wheel)

        def loss() -> Tensor:
            return reference(query, positive, negatives, negative_mode=mode)

    elif implementation == "reference":

        def loss() -> Tensor:
            return dense_info_nce(
                unit(query),
                unit(positive),
                None if negatives is None else unit(negatives),
                0.1,
                "mean",
                mode,  # type: ignore[arg-type]
            )

    else:
        return _floor_step(config, inputs)

    def step() -> None:
        loss().backward()  # type: ignore[no-untyped-call]
        for x in inputs:
            x.grad = None

    return step


def _dense_clip_loss(query: Tensor, positive: Tensor, temperature: float = 0.1) -> Tensor:
    """CLIP's loss as usually written: one logits matrix, two cross-entropies."""
    logits = unit(query) @ unit(positive).T / temperature  # (B, B)
    targets = torch.arange(len(query))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _dense_gte_loss(query: Tensor, positive: Tensor, temperature: float) -> Tensor:
    """GTE's joint loss of four directions as sentence-transformers' MNRL computes it.

    Four (B, B) similarity matrices (query to key, query to query, key to
    query, key to key; the same-type ones without the diagonal), one
    (B, 4B) softmax per pair.
    """
    q, k = unit(query), unit(positive)
    itself = torch.eye(len(q), dtype=torch.bool)
    blocks = [
        q @ k.T,
        (q @ q.T).masked_fill(itself, float("-inf")),
        (k @ q.T),
        (k @ k.T).masked_fill(itself, float("-inf")),
    ]
    scores = torch.cat(blocks, dim=1) / temperature  # (B, 4B)
    return F.cross_entropy(scores, torch.arange(len(q)))


def _dense_shared_loss(
    query: Tensor, positive: Tensor, negatives: Tensor, guide: tuple[Tensor, ...], config: Config
) -> Tensor:
    """Shared hard negatives with hardness and a guide, as sentence-transformers writes them.

    MNRL's (B, B * (1 + M)) similarities with every document column, the
    hardness penalty ``alpha * stopgrad(s)`` on every negative, and
    GISTEmbed's mask of the candidates the guide finds more similar than the
    positive minus the margin.
    """
    batch = len(query)
    documents = torch.cat([positive, negatives.transpose(0, 1).flatten(0, 1)])  # (B (1 + M), D)
    similarity = unit(query) @ unit(documents).T  # (B, B (1 + M))
    rows = torch.arange(batch)
    penalty = config.hardness * similarity.detach()
    penalty[rows, rows] = 0.0  # never the positive
    guide_query, guide_positive, guide_negatives = guide
    guide_documents = torch.cat([guide_positive, guide_negatives.transpose(0, 1).flatten(0, 1)])
    guided = unit(guide_query) @ unit(guide_documents).T  # (B, B (1 + M))
    threshold = guided[rows, rows].unsqueeze(1) - config.margin
    false_negative = guided > threshold
    false_negative[rows, rows] = False
    scores = (similarity / config.temperature + penalty).masked_fill(false_negative, float("-inf"))
    return F.cross_entropy(scores, rows)


def _dense_supervised_contrastive_loss(
    query: Tensor, positive: Tensor, labels: Tensor, temperature: float = 0.1
) -> Tensor:
    """Supervised contrastive loss (L_out) as usually written, with a (B, B) positives mask."""
    logits = unit(query) @ unit(positive).T / temperature  # (B, B)
    mask = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()  # (B, B)
    log_probs = logits.log_softmax(dim=1)
    return (-(mask * log_probs).sum(dim=1) / mask.sum(dim=1)).mean()


def _dense_nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent as usually written: one masked (2B, 2B) matrix and `F.cross_entropy`."""
    z = unit(torch.cat([z1, z2]))  # (2B, D)
    logits = z @ z.T / temperature  # (2B, 2B)
    itself = torch.eye(len(z), dtype=torch.bool)
    targets = torch.arange(len(z)).roll(len(z1))  # (v, i)'s positive is (1 - v, i)
    return F.cross_entropy(logits.masked_fill(itself, float("-inf")), targets)


def _dense_decoupled_nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """The decoupled NT-Xent written plainly: the (2B, 2B) matrix, positives masked out."""
    z = unit(torch.cat([z1, z2]))  # (2B, D)
    logits = z @ z.T / temperature  # (2B, 2B)
    index = torch.arange(len(z))
    other = index.roll(len(z1))  # (v, i)'s positive is (1 - v, i)
    not_negative = torch.eye(len(z), dtype=torch.bool)
    not_negative[index, other] = True
    negatives = logits.masked_fill(not_negative, float("-inf"))
    return (torch.logsumexp(negatives, dim=1) - logits[index, other]).mean()


def _dense_hard_negative_loss(
    z1: Tensor, z2: Tensor, temperature: float = 0.5, beta: float = 1.0, tau: float = 0.1
) -> Tensor:
    """Robinson et al.'s hard-negative estimator as their code computes it: in exp space."""
    batch = len(z1)
    z = unit(torch.cat([z1, z2]))  # (2B, D)
    similarity = torch.exp(z @ z.T / temperature)  # (2B, 2B)
    index = torch.arange(2 * batch)
    is_negative = torch.ones(2 * batch, 2 * batch, dtype=torch.bool)
    is_negative[index, index] = False
    is_negative[index, index.roll(batch)] = False
    negatives = similarity.masked_select(is_negative).view(2 * batch, -1)  # (2B, 2B - 2)
    positive = torch.exp(torch.sum(z[:batch] * z[batch:], dim=-1) / temperature).repeat(2)  # (2B,)
    count = 2 * batch - 2
    importance = negatives**beta
    reweighted = (importance * negatives).sum(dim=-1) / importance.mean(dim=-1)
    estimate = (reweighted - tau * count * positive) / (1 - tau)
    estimate = torch.clamp(estimate, min=count * math.exp(-1 / temperature))
    return -torch.log(positive / (positive + estimate)).mean()


# The dense reference of each objective a configuration may name: (z1, z2, temperature) -> loss.
DENSE_NT_XENT: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "": _dense_nt_xent,
    "decoupled": _dense_decoupled_nt_xent,
    "hard-negative": _dense_hard_negative_loss,
}


def _floor_step(config: Config, inputs: list[Tensor]) -> Callable[[], None]:
    """The matrix products of forward+backward (three; two for a queue), alone, on plain tensors."""
    query, positive = (x.detach() for x in inputs[:2])
    if config.views:  # every embedding against all: (2B)^2 logits
        query = positive = torch.cat([query, positive])
    if config.directions:  # each direction's three products
        pairs = [(query, positive), (query, query), (positive, query), (positive, positive)]
        return _products_step(pairs)
    if config.guide_width:  # the queries against all keys, and the guide's similarities
        keys = torch.cat([positive, inputs[2].detach().flatten(0, 1)])
        guide_query, guide_positive, guide_negatives = _guide(config, inputs)
        guide_keys = torch.cat([guide_positive, guide_negatives.flatten(0, 1)])

        def shared_step() -> None:
            _products_step([(query, keys)])()
            guide_query @ guide_keys.T  # (B, N) no gradient

        return shared_step
    if config.mode == "paired":
        negatives = inputs[2].detach()

        def paired_step() -> None:
            logits = torch.bmm(negatives, query.unsqueeze(2))  # (B, M, 1)
            torch.bmm(logits.transpose(1, 2), negatives)  # (B, 1, D): d query
            torch.bmm(logits, query.unsqueeze(1))  # (B, M, D): d negatives

        return paired_step

    keys = positive if config.mode == "in-batch" else inputs[2].detach()
    # Full-size products where the (B, N) matrix fits; in row blocks of equal
    # total work otherwise.
    block = config.batch if config.reference_fits else 4096

    def matrix_step() -> None:
        grad_keys = torch.zeros_like(keys)
        for start in range(0, len(query), block):
            rows = query[start : start + block]
            logits = rows @ keys.T  # (rows, N)
            logits @ keys  # (rows, D): d query
            if not config.queue:  # a queue's keys get no gradient
                grad_keys.addmm_(logits.T, rows)  # (N, D): d keys

    return matrix_step


def _products_step(pairs: list[tuple[Tensor, Tensor]]) -> Callable[[], None]:
    """Each pair's three products: rows @ keys.T, its product with the keys and with the rows."""

    def step() -> None:
        for rows, keys in pairs:
            logits = rows @ keys.T  # (B, N)
            logits @ keys  # (B, D): d rows
            logits.T @ rows  # (N, D): d keys

    return step


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: Config, implementation: str, references: References) -> dict[str, object]:
    """Time and measure one implementation on one configuration, in this process."""
    step = _loss_step(config, implementation, references)
    baseline = _current_rss_bytes()
    step()  # warm-up
    times = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_extra_bytes": max(0, peak - baseline),
    }


def _run_worker(config: Config, implementation: str, references: References) -> dict[str, object]:
    command = [sys.executable, "-m", "info_nce.cli.bench", "--worker", config.name, implementation]
    command += references.arguments()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1:]}
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _combine(results: list[dict[str, object]]) -> dict[str, object]:
    """One implementation's results over several processes: the median of their medians."""
    errors = [result for result in results if "error" in result]
    if errors:
        return errors[0]
    medians = [result["median_s"] for result in results]
    peaks = [result["peak_extra_bytes"] for result in results]
    return {
        "median_s": statistics.median(medians),  # type: ignore[type-var]
        "process_medians_s": medians,
        "peak_extra_bytes": max(peaks),  # type: ignore[type-var]
    }


def _format_time(seconds: object) -> str:
    return f"{seconds:.4f}" if isinstance(seconds, float) and seconds < 0.1 else f"{seconds:.3f}"


def _mib(value: object) -> str:
    return f"{value / 2**20:.0f}" if isinstance(value, int) else "-"


def run_benchmarks(names: list[str], references: References) -> list[dict[str, object]]:
    rows = []
    for name in names:
        config = CONFIGS[name]
        implementations = [
            implementation
            for implementation in IMPLEMENTATIONS
            if implementation != "reference" or config.reference_fits
        ]
        # Rounds of one fresh process per implementation, interleaved so that
        # drifting machine state affects all implementations alike.
        rounds = [
            {impl: _run_worker(config, impl, references) for impl in implementations}
            for _ in range(config.processes)
        ]
        results = {impl: _combine([r[impl] for r in rounds]) for impl in implementations}
        row: dict[str, object] = {"config": name, "problem": config.describe()}
        for implementation, result in results.items():
            row[f"{implementation}_s"] = result.get("median_s")
            row[f"{implementation}_peak_bytes"] = result.get("peak_extra_bytes")
            if "error" in result:
                row[f"{implementation}_error"] = result["error"]
        ours, reference, floor = (row.get(f"{i}_s") for i in ("ours", "reference", "floor"))
        if isinstance(ours, float) and isinstance(reference, float):
            row["speedup_vs_reference"] = reference / ours
        if isinstance(ours, float) and isinstance(floor, float):
            row["ratio_to_floor"] = ours / floor
        ours_mem, reference_mem = row.get("ours_peak_bytes"), row.get("reference_peak_bytes")
        if isinstance(ours_mem, int) and isinstance(reference_mem, int) and ours_mem > 0:
            row["memory_ratio"] = reference_mem / ours_mem
        rows.append(row)
        print(_markdown_row(row), flush=True)
    return rows


MARKDOWN_HEADER = (
    "| config | problem | reference s | ours s | floor s | speed-up vs reference "
    "| ours / floor | reference peak MiB | ours peak MiB |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _markdown_row(row: dict[str, object]) -> str:
    def ratio(key: str) -> str:
        value = row.get(key)
        return f"{value:.2f}x" if isinstance(value, float) else "-"

    def seconds(key: str) -> str:
        value = row.get(key)
        return _format_time(value) if isinstance(value, float) else "-"

    return (
        f"| {row['config']} | {row['problem']} | {seconds('reference_s')} | {seconds('ours_s')} "
        f"| {seconds('floor_s')} | {ratio('speedup_vs_reference')} | {ratio('ratio_to_floor')} "
        f"| {_mib(row.get('reference_peak_bytes'))} | {_mib(row.get('ours_peak_bytes'))} |"
    )


def machine_description() -> str:
    """The CPU, its vector extensions as torch uses them, and the software versions.

    The speed-ups depend on the CPU: the matrix products run at very different
    rates on different hosts, while the dense loss's memory traffic does not.
    """
    return (
        f"{_cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _present(wheel: Path) -> Path | None:
    """``wheel`` if it exists (`make setup` downloads the peers' wheels), else None."""
    return wheel if wheel.exists() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "configs",
        nargs="*",
        default=list(CONFIGS),
        metavar="CONFIG",
        help=f"configurations to run (default: all of {', '.join(CONFIGS)})",
    )
    parser.add_argument(
        "--reference-wheel",
        type=Path,
        default=_present(DEFAULT_REFERENCE_WHEEL),
        help="wheel of info-nce-pytorch 0.1.4 to use as the dense reference "
        "(default: the one `make setup` downloads, else this package's dense path)",
    )
    parser.add_argument(
        "--open-clip-wheel",
        type=Path,
        default=_present(DEFAULT_OPEN_CLIP_WHEEL),
        help="wheel of open_clip_torch whose SigLipLoss is SigLIP's reference "
        "(default: the one `make setup` downloads, else the same formula written here)",
    )
    parser.add_argument("--csv", type=Path, help="also write the results as CSV here")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    references = References(args.reference_wheel, args.open_clip_wheel)
    if args.worker:
        name, implementation = args.worker
        print(json.dumps(measure(CONFIGS[name], implementation, references)))
        return 0
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        print(f"info-nce bench: unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
        return 2
    reference = args.reference_wheel or "this package's dense path"
    siglip = args.open_clip_wheel or "open_clip's formula, written here"
    print(f"machine: {machine_description()}\nreference: {reference}\nSigLIP: {siglip}\n")
    print(MARKDOWN_HEADER, flush=True)
    rows = run_benchmarks(args.configs, references)
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({k for row in rows for k in row}))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        configs = [asdict(CONFIGS[name]) for name in args.configs]
        document = {"machine": machine_description(), "configs": configs, "rows": rows}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="info-nce bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
