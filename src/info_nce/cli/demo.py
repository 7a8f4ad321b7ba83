"""`info-nce demo`: contrastive learning recovers the hidden factors of a nonlinear mixing.

A laptop-sized reproduction of the sphere experiment of Zimmermann et al.,
"Contrastive Learning Inverts the Data Generating Process" (ICML 2021):

* hidden factors ``z`` are uniform on the unit sphere S^{n-1} in R^n;
* a positive ``z~`` is drawn from the von Mises-Fisher distribution
  vMF(mean ``z``, concentration ``kappa``), sampled exactly with Wood's (1994)
  rejection algorithm;
* observations are ``x = g(z)``, with ``g`` a fixed random invertible MLP:
  ``mixing_layers`` square orthogonal weight matrices (condition number 1)
  with leaky ReLUs of slope 0.2 between them, seeded;
* an MLP encoder ``f`` is trained with ``info_nce`` on pairs ``(g(z), g(z~))``,
  the other pairs of the batch being the negatives; the loss L2-normalises the
  embeddings.

The theorem: if the loss's model ``exp(f(x).f(x~) / tau)`` matches the data's
``exp(kappa * z.z~)``, a minimiser of the loss is ``f = A g^{-1}`` with ``A``
orthogonal, so the embedding is the hidden factors up to a rotation. The
score is the R² of the best affine map (least squares with bias) from the
normalised embedding to ``z``: fitted on the first half of a fixed held-out
set of ``eval_samples`` draws and scored on the second half, averaged
uniformly over the n factors (sklearn's ``r2_score``). The untrained encoder's
R² is the baseline; the R² of the raw observations ``x`` shows how nonlinear
``g`` is.

The defaults were tuned for a 2-core CPU (R² ~0.9996 in about a minute):
``tau = 1 / kappa = 0.05``, the theory's match (a larger kappa learns faster
per step here: kappa 1, the paper's, needs its 100k steps; kappa 5, 10, 20
reach 0.963, 0.975, 0.982 in 1000 steps at lr 1e-3); Adam at lr 3e-2 with a
cosine decay to zero (lr 1e-3, 3e-3, 1e-2, 3e-2, 1e-1: 0.982, 0.995, 0.997,
0.9986, 0.990 after 1000 steps); batch 1024; a 3 x 256 encoder.

``--nproc N`` trains on N local processes (torch.distributed, gloo): each rank
draws ``batch_size / N`` pairs from its own seeded stream, the loss gathers
the other ranks' keys with ``gather_distributed=True`` and the gradients are
averaged, which equals one process's gradient on the whole batch. Rank 0
evaluates and shows the progress; the parent process writes the outputs.

matplotlib and tqdm are imported only when the demo runs, so ``import
info_nce`` and ``info-nce --help`` need neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from info_nce import InfoNCE, distributed, grad_cache
from info_nce.cli._arguments import at_least, positive_float

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_LATENT_DIM = 10
DEFAULT_KAPPA = 20.0
DEFAULT_TEMPERATURE = 0.05
DEFAULT_STEPS = 3000
DEFAULT_BATCH_SIZE = 1024
DEFAULT_LR = 3e-2
DEFAULT_SEED = 0
DEFAULT_HIDDEN_WIDTH = 256
DEFAULT_HIDDEN_LAYERS = 3
DEFAULT_MIXING_LAYERS = 3
DEFAULT_EVAL_EVERY = 100
DEFAULT_EVAL_SAMPLES = 8192
DEFAULT_OUTPUT_DIR = Path("info-nce-demo")

LEAKY_SLOPE = 0.2  # of the mixing's and the encoder's leaky ReLUs
LATENT_PANELS = 4  # factors shown in latents.png
LOSS_POINTS = 200  # at most this many points of the loss history are kept

METRICS_FILE = "metrics.json"
TRAINING_FILE = "training.png"
LATENTS_FILE = "latents.png"

MISSING_EXTRAS = "info-nce demo needs matplotlib and tqdm: pip install 'info-nce[cli]'"


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of a demo run; the defaults are the tuned ones of ``info-nce demo``."""

    latent_dim: int = DEFAULT_LATENT_DIM
    kappa: float = DEFAULT_KAPPA
    temperature: float = DEFAULT_TEMPERATURE
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    seed: int = DEFAULT_SEED
    hidden_width: int = DEFAULT_HIDDEN_WIDTH
    hidden_layers: int = DEFAULT_HIDDEN_LAYERS
    mixing_layers: int = DEFAULT_MIXING_LAYERS
    symmetric: bool = False
    learn_temperature: bool = False
    eval_every: int = DEFAULT_EVAL_EVERY
    eval_samples: int = DEFAULT_EVAL_SAMPLES
    nproc: int = 1
    # Rows per chunk of `grad_cache` (None: the plain encoder pass).
    grad_cache_chunk: int | None = None
    # Intra-op threads per process; None: torch's default, or the cores split among nproc > 1.
    threads: int | None = None
    progress: bool = True


@dataclass
class Evaluation:
    """The linear readout of the held-out half of the evaluation set."""

    r2: float  # uniform mean over the factors
    r2_per_factor: list[float]
    latents: Tensor  # (E/2, n) float64, the true factors of the scored half
    predictions: Tensor  # (E/2, n) float64, their affine prediction from the embedding


@dataclass
class DemoResult:
    """What a training run measured; rank 0's in a distributed run."""

    r2_observations: float  # raw observations x = g(z) as the "embedding"
    before: Evaluation
    after: Evaluation
    r2_history: list[tuple[int, float]] = field(default_factory=list)  # (step, R²)
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (last step, mean loss)
    temperature_history: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0  # optimisation steps only, evaluations excluded
    eval_seconds: float = 0.0


def _generator(seed: int, stream: str) -> torch.Generator:
    """An independent, reproducible random stream per (seed, purpose)."""
    digest = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_sphere(count: int, dim: int, generator: torch.Generator) -> Tensor:
    """``count`` points uniform on the unit sphere S^{dim-1}: normalised Gaussians. (count, dim)"""
    points = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return F.normalize(points, dim=1)


def sample_von_mises_fisher(mean: Tensor, kappa: float, generator: torch.Generator) -> Tensor:
    """One exact draw from vMF(mean_i, kappa) per row, by Wood's (1994) rejection sampler.

    The component ``w`` along the mean has density proportional to
    ``exp(kappa w) (1 - w²)^((m-3)/2)`` on [-1, 1]; it is drawn by rejection
    from a Beta proposal, and the remainder is a uniform direction orthogonal
    to the mean. Beta((m-1)/2, (m-1)/2) is drawn as ``X / (X + Y)`` with X and
    Y chi-squared with m - 1 degrees of freedom, so every random number comes
    from ``generator``.

    Args:
        mean: (B, m) unit vectors, m >= 2.
        kappa: concentration, > 0.
        generator: the source of randomness.

    Returns:
        (B, m) unit vectors, float64.
    """
    mean = mean.to(torch.float64)
    count, dim = mean.shape
    dof = dim - 1
    # b = (-2k + sqrt(4k² + d²)) / d, written without the cancellation for large k.
    b = dof / (2 * kappa + math.sqrt(4 * kappa**2 + dof**2))
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + dof * math.log(1 - x0**2)

    w = torch.empty(count, dtype=torch.float64)  # (B,)
    pending = torch.arange(count)  # rows still without an accepted w
    while len(pending):
        chi = torch.randn(len(pending), 2, dof, generator=generator, dtype=torch.float64)
        squares = chi.square().sum(dim=2)  # (P, 2), chi-squared with `dof` degrees each
        beta = squares[:, 0] / squares.sum(dim=1)  # (P,) ~ Beta(dof/2, dof/2)
        uniform = torch.rand(len(pending), generator=generator, dtype=torch.float64)  # (P,)
        proposal = (1 - (1 + b) * beta) / (1 - (1 - b) * beta)  # (P,)
        accept = kappa * proposal + dof * torch.log1p(-x0 * proposal) - c >= torch.log(uniform)
        w[pending[accept]] = proposal[accept]
        pending = pending[~accept]

    tangent = torch.randn(count, dim, generator=generator, dtype=torch.float64)  # (B, m)
    tangent = tangent - (tangent * mean).sum(dim=1, keepdim=True) * mean
    tangent = F.normalize(tangent, dim=1)
    sample = w.unsqueeze(1) * mean + (1 - w.square()).clamp(min=0).sqrt().unsqueeze(1) * tangent
    return F.normalize(sample, dim=1)  # unit up to rounding already


def make_mixing(dim: int, layers: int, generator: torch.Generator) -> nn.Sequential:
    """The fixed mixing ``g``: ``layers`` random orthogonal (dim, dim) maps, leaky ReLUs between.

    Orthogonal weights have condition number 1 and a leaky ReLU is a bijection,
    so ``g`` is invertible and no direction of ``z`` is squashed more than by
    the slope 0.2 per activation. No biases: as in the paper.
    """
    modules: list[nn.Module] = []
    for index in range(layers):
        linear = nn.Linear(dim, dim, bias=False, dtype=torch.float64)
        with torch.no_grad():
            gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gaussian)
            # Sign fix (Mezzadri 2007): makes Q Haar-distributed, not biased by QR's convention.
            linear.weight.copy_(q * torch.sign(torch.diagonal(r)))
        modules.append(linear)
        if index < layers - 1:
            modules.append(nn.LeakyReLU(LEAKY_SLOPE))
    mixing = nn.Sequential(*modules)
    mixing.requires_grad_(False)
    return mixing


def make_encoder(
    dim: int, hidden_width: int, hidden_layers: int, generator: torch.Generator
) -> nn.Sequential:
    """The encoder ``f``: an MLP dim -> hidden_width x hidden_layers -> dim, leaky ReLUs.

    He-initialised from ``generator`` (not the global RNG), biases zero.
    """
    widths = [dim, *([hidden_width] * hidden_layers), dim]
    modules: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            nn.init.kaiming_uniform_(linear.weight, a=LEAKY_SLOPE, generator=generator)
            linear.bias.zero_()
        modules.append(linear)
        if index < len(widths) - 2:
            modules.append(nn.LeakyReLU(LEAKY_SLOPE))
    return nn.Sequential(*modules)


def linear_readout(features: Tensor, latents: Tensor) -> Evaluation:
    """R² of the least-squares affine map features -> latents, fit on one half, scored on the other.

    Args:
        features: (E, D) e.g. normalised embeddings.
        latents: (E, n) the true factors of the same samples.
    """
    features = features.to(torch.float64)
    latents = latents.to(torch.float64)
    half = len(features) // 2
    design = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    # gelsd (SVD): exact also for a rank-deficient embedding, e.g. a collapsed untrained one.
    weights = torch.linalg.lstsq(design[:half], latents[:half], driver="gelsd").solution
    scored = latents[half:]  # (E - E/2, n)
    predictions = design[half:] @ weights  # (E - E/2, n)
    residual = (scored - predictions).square().sum(dim=0)  # (n,)
    total = (scored - scored.mean(dim=0)).square().sum(dim=0)  # (n,)
    per_factor = (1 - residual / total).tolist()
    return Evaluation(
        r2=sum(per_factor) / len(per_factor),
        r2_per_factor=per_factor,
        latents=scored,
        predictions=predictions,
    )


class _Trainer:
    """One process's share of a run: the data, the models, a step, an evaluation."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.local_batch = config.batch_size // self.world_size
        # Identical on every rank: the same seed, the same streams.
        self.mixing = make_mixing(
            config.latent_dim, config.mixing_layers, _generator(config.seed, "mixing")
        )
        self.encoder = make_encoder(
            config.latent_dim,
            config.hidden_width,
            config.hidden_layers,
            _generator(config.seed, "encoder"),
        )
        self.loss = InfoNCE(
            config.temperature,
            symmetric=config.symmetric,
            learn_temperature=config.learn_temperature,
            gather_distributed=self.world_size > 1,
        )
        self.parameters = [*self.encoder.parameters(), *self.loss.parameters()]
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.lr)
        # Cosine decay to zero: a short run ends at its best point, not in noise.
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.steps)
        self.data = _generator(config.seed, f"data/{self.rank}")
        eval_latents = sample_sphere(
            config.eval_samples, config.latent_dim, _generator(config.seed, "eval")
        )
        self.eval_latents = eval_latents  # (E, n) float64
        self.eval_observations = self.mixing(eval_latents).float()  # (E, n)

    def step(self) -> float:
        """One optimisation step; returns the loss of the whole (all ranks') batch."""
        latents = sample_sphere(self.local_batch, self.config.latent_dim, self.data)  # (b, n)
        positives = sample_von_mises_fisher(latents, self.config.kappa, self.data)  # (b, n)
        observations = self.mixing(torch.cat([latents, positives])).float()  # (2b, n)
        chunk = self.config.grad_cache_chunk
        if chunk is None:
            embeddings = self.encoder(observations)  # (2b, n), one pass for both views
        else:  # the same, replayed chunk by chunk in backward
            embeddings = grad_cache(self.encoder, observations, chunk_size=chunk)
        loss = self.loss(embeddings[: self.local_batch], embeddings[self.local_batch :])
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        loss_value = loss.detach()
        if self.world_size > 1:
            loss_value = self._average_across_ranks(loss_value)
        self.optimizer.step()
        self.schedule.step()
        return float(loss_value)

    def _average_across_ranks(self, loss: Tensor) -> Tensor:
        """Average the gradients and the loss over the ranks in one all-reduce.

        Each rank's loss is the mean over its own queries against all keys, so
        the average over ranks is the whole batch's loss and gradient.
        """
        grads = [p.grad for p in self.parameters if p.grad is not None]
        flat = torch.cat([*(g.reshape(-1) for g in grads), loss.reshape(1)])  # (P + 1,)
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return flat[-1]

    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        embedding = self.encoder(self.eval_observations)  # (E, n)
        return linear_readout(F.normalize(embedding, dim=1), self.eval_latents)

    def temperature(self) -> float:
        temperature = self.loss.temperature
        return float(temperature) if isinstance(temperature, float) else temperature.item()


def train(config: DemoConfig) -> DemoResult | None:
    """Train the encoder as ``config`` says; the result on rank 0, None on the other ranks.

    Runs in the current process, or as one rank of an initialised process
    group (then every rank must call it; only rank 0 evaluates). Deterministic
    for a given config, process count and thread count.
    """
    trainer = _Trainer(config)
    if trainer.rank != 0:
        for _ in range(config.steps):
            trainer.step()
        return None

    tick = time.perf_counter()
    before = latest = trainer.evaluate()
    result = DemoResult(
        r2_observations=linear_readout(trainer.eval_observations, trainer.eval_latents).r2,
        before=before,
        after=before,
        r2_history=[(0, before.r2)],
    )
    result.eval_seconds += time.perf_counter() - tick
    bar = _progress_bar(config) if config.progress else None
    bin_size = math.ceil(config.steps / LOSS_POINTS)
    bin_start, bin_sum = 0, 0.0
    smoothed_loss = math.nan  # for the progress bar: an exponential moving average
    try:
        for step in range(1, config.steps + 1):
            tick = time.perf_counter()
            loss = trainer.step()
            result.train_seconds += time.perf_counter() - tick
            bin_sum += loss
            smoothed_loss = loss if step == 1 else 0.95 * smoothed_loss + 0.05 * loss
            if step % bin_size == 0 or step == config.steps:
                result.loss_history.append((step, bin_sum / (step - bin_start)))
                result.temperature_history.append((step, trainer.temperature()))
                bin_start, bin_sum = step, 0.0
            if step % config.eval_every == 0 or step == config.steps:
                tick = time.perf_counter()
                latest = trainer.evaluate()
                result.r2_history.append((step, latest.r2))
                result.eval_seconds += time.perf_counter() - tick
            if bar is not None:
                # ASCII "R2": a terminal without UTF-8 must not break the run.
                postfix = {"loss": f"{smoothed_loss:.3f}", "R2": f"{latest.r2:.4f}"}
                if config.learn_temperature:
                    postfix["tau"] = f"{trainer.temperature():.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    result.after = latest
    return result


def _progress_bar(config: DemoConfig) -> Any:
    from tqdm import tqdm

    return tqdm(total=config.steps, unit="step", desc="info-nce demo", dynamic_ncols=True)


def run_distributed(config: DemoConfig) -> DemoResult:
    """Train on ``config.nproc`` local processes (gloo on 127.0.0.1); return rank 0's result.

    Raises:
        RuntimeError: a worker process failed (its traceback is in the message).
    """
    from torch.multiprocessing.spawn import (
        ProcessExitedException,
        ProcessRaisedException,
        spawn,
    )

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="info-nce-demo-") as scratch:
        result_path = Path(scratch) / "result.pt"
        try:
            spawn(  # type: ignore[no-untyped-call]
                _worker,
                args=(config, port, str(result_path)),
                nprocs=config.nproc,
                join=True,
            )
        except ProcessRaisedException as error:
            raise RuntimeError(f"a training process failed:\n{error}") from None
        except ProcessExitedException as error:
            raise RuntimeError(f"a training process died: {error}") from None
        return _result_from_state(torch.load(result_path, weights_only=True))


def _worker(rank: int, config: DemoConfig, port: int, result_path: str) -> None:
    """One rank of ``run_distributed``: join the group, train, rank 0 saves the result."""
    torch.set_num_threads(_threads_per_process(config))
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=config.nproc,
    )
    try:
        result = train(config)
        if result is not None:
            torch.save(_result_to_state(result), result_path)
        # Rank 0 evaluates and saves after training; the others wait for it, so
        # that no rank tears its gloo connections down while another still uses
        # them (seen in a full test run: rank 1 aborting with SIGABRT at exit).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process could take it before rank 0 does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _threads_per_process(config: DemoConfig) -> int:
    """``--threads``, else torch's default (one per core) split among the processes."""
    if config.threads is not None:
        return config.threads
    # More threads than cores in total only adds contention.
    return max(1, torch.get_num_threads() // config.nproc)


def _result_to_state(result: DemoResult) -> dict[str, Any]:
    """A DemoResult as plain containers and tensors, loadable with ``weights_only=True``."""
    state = dataclasses.asdict(result)
    for key in ("r2_history", "loss_history", "temperature_history"):
        state[key] = [list(pair) for pair in state[key]]
    return state


def _result_from_state(state: dict[str, Any]) -> DemoResult:
    def history(key: str) -> list[tuple[int, float]]:
        return [(int(step), float(value)) for step, value in state[key]]

    return DemoResult(
        r2_observations=state["r2_observations"],
        before=Evaluation(**state["before"]),
        after=Evaluation(**state["after"]),
        r2_history=history("r2_history"),
        loss_history=history("loss_history"),
        temperature_history=history("temperature_history"),
        train_seconds=state["train_seconds"],
        eval_seconds=state["eval_seconds"],
    )


def metrics_dict(config: DemoConfig, result: DemoResult, seconds: float) -> dict[str, Any]:
    """The contents of metrics.json: headline numbers, histories and every option."""
    half = config.eval_samples // 2
    return {
        "r2_before": result.before.r2,
        "r2_after": result.after.r2,
        "r2_observations": result.r2_observations,
        "r2_per_factor_before": result.before.r2_per_factor,
        "r2_per_factor_after": result.after.r2_per_factor,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seconds": seconds,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "steps_per_second": config.steps / result.train_seconds if result.train_seconds else None,
        "final_temperature": result.temperature_history[-1][1],
        "evaluation": (
            f"R2 of the least-squares affine map from the L2-normalised embedding to z, "
            f"fitted on {half} held-out samples and scored on {config.eval_samples - half} "
            "others, mean over the factors"
        ),
        "options": {**dataclasses.asdict(config), "threads": _threads_per_process(config)},
        "torch_version": torch.__version__,
        "r2_history": [list(pair) for pair in result.r2_history],
        "loss_history": [list(pair) for pair in result.loss_history],
        "temperature_history": [list(pair) for pair in result.temperature_history],
    }


def _metrics_json(metrics: dict[str, Any]) -> str:
    """JSON, one top-level key a line: a long history takes one line, not one per number."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in metrics.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure on an Agg canvas: no pyplot, so no global backend or figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _title(config: DemoConfig) -> str:
    temperature = "learned from " if config.learn_temperature else ""
    processes = f", {config.nproc} processes" if config.nproc > 1 else ""
    return (
        f"n={config.latent_dim} factors on the sphere, vMF $\\kappa$={config.kappa:g}, "
        f"$\\tau$ {temperature}{config.temperature:g}, batch {config.batch_size}, "
        f"{config.steps} steps, seed {config.seed}{processes}"
    )


def draw_training(config: DemoConfig, result: DemoResult) -> Figure:
    """training.png: the loss, the held-out R², and 1 - R² on a log scale, over the steps."""
    figure = _new_figure(15.0, 4.4)
    loss_axes, r2_axes, gap_axes = figure.subplots(1, 3)
    steps, losses = zip(*result.loss_history, strict=True)
    loss_axes.plot(steps, losses, color="tab:blue")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("InfoNCE loss (mean over the logged interval)")
    loss_axes.set_title("training loss")
    loss_axes.grid(alpha=0.3)
    if config.learn_temperature:
        temperature_axes = loss_axes.twinx()
        steps, temperatures = zip(*result.temperature_history, strict=True)
        temperature_axes.plot(steps, temperatures, color="tab:red", linestyle="--")
        temperature_axes.set_ylabel("learned temperature", color="tab:red")

    steps, r2s = zip(*result.r2_history, strict=True)
    baselines = (
        (result.before.r2, "gray", "--", "untrained encoder (baseline)"),
        (result.r2_observations, "tab:orange", ":", "raw observations g(z)"),
    )
    r2_axes.plot(steps, r2s, marker=".", color="tab:green", label="trained encoder")
    for value, color, style, label in baselines:
        r2_axes.axhline(value, color=color, linestyle=style, label=label)
    low = min(result.before.r2, result.r2_observations, min(r2s))
    r2_axes.set_ylim(max(-0.05, low - 0.05), 1.0)
    r2_axes.set_xlabel("step")
    r2_axes.set_ylabel("R²  (linear readout of z, held-out)")
    r2_axes.set_title(
        f"hidden factors recovered: R² {result.before.r2:.3f} → {result.after.r2:.4f}"
    )
    r2_axes.legend(loc="lower right")
    r2_axes.grid(alpha=0.3)

    # Near R² = 1 the linear axis is flat; the unexplained variance shows the progress.
    gap_axes.semilogy(steps, [max(1 - r2, 1e-6) for r2 in r2s], marker=".", color="tab:green")
    for value, color, style, _ in baselines:
        gap_axes.axhline(max(1 - value, 1e-6), color=color, linestyle=style)
    gap_axes.set_xlabel("step")
    gap_axes.set_ylabel("1 - R²  (unexplained variance, log scale)")
    gap_axes.set_title(f"what is left: 1 - R² = {1 - result.after.r2:.2g}")
    gap_axes.grid(alpha=0.3, which="both")
    figure.suptitle(_title(config))
    return figure


def draw_latents(config: DemoConfig, result: DemoResult) -> Figure:
    """latents.png: true vs linearly recovered factor, untrained (top) and trained (bottom)."""
    factors = min(LATENT_PANELS, config.latent_dim)
    figure = _new_figure(3.0 * factors, 6.4)
    grid = figure.subplots(2, factors, squeeze=False, sharex=True, sharey=True)
    rows = (("untrained encoder", result.before), ("trained encoder", result.after))
    points = min(2000, len(result.after.latents))  # enough to see the spread, not a blob
    for row, (label, evaluation) in enumerate(rows):
        for factor in range(factors):
            axes = grid[row][factor]
            true = evaluation.latents[:points, factor].numpy()
            recovered = evaluation.predictions[:points, factor].numpy()
            axes.scatter(true, recovered, s=2, alpha=0.35, color="tab:blue", rasterized=True)
            axes.plot([-1, 1], [-1, 1], color="black", linewidth=0.8)
            axes.set_xlim(-1, 1)
            axes.set_ylim(-1, 1)
            axes.set_aspect("equal")
            axes.set_title(
                f"{label}\nfactor {factor + 1}: R² {evaluation.r2_per_factor[factor]:.4f}"
            )
            if row == 1:
                axes.set_xlabel(f"true $z_{{{factor + 1}}}$")
            if factor == 0:
                axes.set_ylabel("linear readout of the embedding")
    figure.suptitle(_title(config))
    return figure


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``.

    A reader never sees a partial file, and a failure leaves no temporary behind.
    """
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp makes the file private (0600); give it the mode open() would have.
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_dir(output_dir: Path) -> str | None:
    """Why ``output_dir`` cannot take the outputs, or None if it can (probed by a real write).

    A missing directory is fine if its nearest existing ancestor is a writable
    directory: it is created only once there is something to write.
    """
    existing = output_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == output_dir:
            return f"--output-dir {output_dir} exists and is not a directory"
        return f"--output-dir {output_dir}: {existing} is not a directory"
    try:
        # os.access trusts permission bits; root, read-only mounts and ACLs need a real write.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"--output-dir {output_dir} is not writable: {error.strerror} ({existing})"
    return None


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block, the caller's count after it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``info-nce demo``."""
    parser.description = (
        "Contrastive learning inverts the data generating process (Zimmermann et al., "
        "ICML 2021), on a laptop: hidden factors z uniform on the unit sphere in n "
        "dimensions, positives from a von Mises-Fisher distribution around z, "
        "observations g(z) from a fixed random invertible MLP. An MLP encoder trained "
        "with InfoNCE (in-batch negatives) on pairs (g(z), g(z~)) recovers z up to a "
        "rotation: the R² of a linear readout of z from the normalised embedding, on "
        "held-out samples, goes from the untrained encoder's baseline to nearly 1. "
        f"Writes {METRICS_FILE}, {TRAINING_FILE} and {LATENTS_FILE} into --output-dir."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--steps", type=at_least(1), default=DEFAULT_STEPS, help="training steps")
    parser.add_argument(
        "--batch-size",
        type=at_least(2),
        default=DEFAULT_BATCH_SIZE,
        help="pairs per step, all processes together; each pair's negatives are the other pairs",
    )
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=DEFAULT_TEMPERATURE,
        help="loss temperature tau (the initial one with --learn-temperature); "
        "the theory's match is 1 / kappa",
    )
    parser.add_argument(
        "--kappa",
        type=positive_float,
        default=DEFAULT_KAPPA,
        help="concentration of the von Mises-Fisher positives around z",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=DEFAULT_LR, help="Adam's peak learning rate"
    )
    parser.add_argument(
        "--seed", type=at_least(0), default=DEFAULT_SEED, help="seeds g, the encoder and the data"
    )
    parser.add_argument(
        "--latent-dim", type=at_least(2), default=DEFAULT_LATENT_DIM, help="n, hidden factors"
    )
    parser.add_argument(
        "--symmetric",
        action="store_true",
        help="average with the key-to-query loss (CLIP's symmetric loss)",
    )
    parser.add_argument(
        "--learn-temperature",
        action="store_true",
        help="learn the temperature with the encoder (InfoNCE(learn_temperature=True))",
    )
    parser.add_argument(
        "--eval-every",
        type=at_least(1),
        default=DEFAULT_EVAL_EVERY,
        help="steps between held-out R² evaluations",
    )
    parser.add_argument(
        "--eval-samples",
        type=at_least(8),
        default=DEFAULT_EVAL_SAMPLES,
        help="held-out samples: the readout is fitted on half of them and scored on the rest",
    )
    parser.add_argument(
        "--hidden-width", type=at_least(1), default=DEFAULT_HIDDEN_WIDTH, help="encoder width"
    )
    parser.add_argument(
        "--hidden-layers",
        type=at_least(1),
        default=DEFAULT_HIDDEN_LAYERS,
        help="hidden layers of the encoder",
    )
    parser.add_argument(
        "--mixing-layers",
        type=at_least(1),
        default=DEFAULT_MIXING_LAYERS,
        help="linear layers of the mixing g (leaky ReLUs between them)",
    )
    parser.add_argument(
        "--grad-cache-chunk",
        type=at_least(1),
        default=None,
        help="embed through info_nce.grad_cache in chunks of this many rows (no activations "
        "kept; each chunk runs again in backward)",
    )
    parser.add_argument(
        "--nproc",
        type=at_least(1),
        default=1,
        help="local processes (torch.distributed, gloo), each drawing batch-size / nproc pairs",
    )
    parser.add_argument(
        "--threads",
        type=at_least(1),
        default=None,
        help="intra-op threads per process (default: torch's, split evenly across processes)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help="directory for the outputs, created if missing",
    )


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, write the three outputs, print a summary; return the exit code."""
    start = time.perf_counter()
    config = DemoConfig(
        latent_dim=args.latent_dim,
        kappa=args.kappa,
        temperature=args.temperature,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        hidden_width=args.hidden_width,
        hidden_layers=args.hidden_layers,
        mixing_layers=args.mixing_layers,
        symmetric=args.symmetric,
        learn_temperature=args.learn_temperature,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        nproc=args.nproc,
        grad_cache_chunk=args.grad_cache_chunk,
        threads=args.threads,
    )
    problem = _check_config(config)
    if problem is not None:
        print(f"info-nce demo: error: {problem}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401  # fail before the training, not after
        import tqdm  # noqa: F401
    except ImportError:
        print(MISSING_EXTRAS, file=sys.stderr)
        return 1
    output_dir: Path = args.output_dir
    problem = check_output_dir(output_dir)
    if problem is not None:
        print(f"info-nce demo: error: {problem}", file=sys.stderr)
        return 1

    if config.nproc > 1:
        try:
            result = run_distributed(config)
        except RuntimeError as error:
            print(f"info-nce demo: error: {error}", file=sys.stderr)
            return 1
    else:
        with _intra_op_threads(config.threads):
            single = train(config)
        assert single is not None  # rank 0 of a single process
        result = single

    # Everything is rendered before the first file is written.
    outputs = {
        TRAINING_FILE: _png_bytes(draw_training(config, result)),
        LATENTS_FILE: _png_bytes(draw_latents(config, result)),
    }
    seconds = time.perf_counter() - start
    metrics = metrics_dict(config, result, seconds)
    outputs[METRICS_FILE] = _metrics_json(metrics).encode()
    paths = [output_dir / name for name in (METRICS_FILE, TRAINING_FILE, LATENTS_FILE)]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in paths:
            _write_atomically(path, outputs[path.name])
    except OSError as error:
        print(f"info-nce demo: error: cannot write {output_dir}: {error}", file=sys.stderr)
        return 1

    print(
        f"info-nce demo: held-out R2 of the linear readout of z: {result.before.r2:.4f} "
        f"(untrained encoder) -> {result.after.r2:.4f} (trained); raw observations "
        f"{result.r2_observations:.4f}"
    )
    rate = metrics["steps_per_second"]
    print(
        f"{config.steps} steps of batch {config.batch_size} in {seconds:.1f} s"
        + (f" ({rate:.1f} steps/s training)" if rate else "")
    )
    for path in paths:
        print(f"  {path}")
    return 0


def _check_config(config: DemoConfig) -> str | None:
    """What the options cannot do together, or None; each option alone is checked by argparse."""
    if config.batch_size % config.nproc:
        return (
            f"--batch-size {config.batch_size} must be a multiple of --nproc {config.nproc}: "
            "each process draws an equal share"
        )
    # The affine readout has latent_dim + 1 unknowns per factor: fit it on more samples.
    if config.eval_samples // 2 < 2 * (config.latent_dim + 1):
        return (
            f"--eval-samples {config.eval_samples} is too small for --latent-dim "
            f"{config.latent_dim}: need at least {4 * (config.latent_dim + 1)}"
        )
    return None
