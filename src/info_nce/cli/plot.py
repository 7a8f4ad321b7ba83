"""`info-nce plot`: the "Loss graph" of the info-nce-pytorch README, for both negative modes.

Three mean vectors ``mu_q``, ``mu_p``, ``mu_n`` are drawn once from N(0, I_D)
with a seeded generator. For interpolation weights ``alpha`` and ``beta`` on a
grid over [0, 1], with ``Sigma = sigma_scale * I`` (``I/10`` by default):

* queries (B, D) come from ``N(mu_q, Sigma)``;
* positive keys (B, D) from ``N(alpha*mu_q + (1-alpha)*mu_p, Sigma)``;
* negative keys from ``N(beta*mu_q + (1-beta)*mu_n, Sigma)``: (M, D) shared by
  all queries for ``negative_mode='unpaired'``, (B, M, D) for ``'paired'``.

The loss of every grid cell is ``info_nce.info_nce`` with ``reduction='mean'``.
The standard-normal noise is drawn once and reused by every cell (common random
numbers), so each cell still samples exactly its distributions while the surface
is smooth rather than speckled by resampling.

matplotlib is imported only when the figure is drawn, so ``import info_nce``
and ``info-nce --help`` do not need it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from info_nce import info_nce
from info_nce.cli._arguments import at_least, positive_float

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_GRID = 21
DEFAULT_DIM = 128
DEFAULT_BATCH_SIZE = 64
DEFAULT_NUM_NEGATIVES = 64
DEFAULT_SIGMA_SCALE = 0.1
DEFAULT_TEMPERATURE = 0.1
DEFAULT_SEED = 0
DEFAULT_OUTPUT = Path("info_nce_loss.png")

MISSING_MATPLOTLIB = "info-nce plot needs matplotlib: pip install 'info-nce[cli]'"


class LossSurface(NamedTuple):
    """The loss over the (alpha, beta) grid; ``losses[i, j]`` is at ``(alphas[i], betas[j])``."""

    alphas: Tensor  # (G,) float64
    betas: Tensor  # (G,) float64
    unpaired_losses: Tensor  # (G, G) float64
    paired_losses: Tensor  # (G, G) float64


def loss_surface(
    *,
    grid: int = DEFAULT_GRID,
    dim: int = DEFAULT_DIM,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_negatives: int = DEFAULT_NUM_NEGATIVES,
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = DEFAULT_SEED,
) -> LossSurface:
    """Compute the InfoNCE loss on a ``grid`` x ``grid`` lattice of (alpha, beta) in [0, 1]².

    Deterministic for a given set of arguments: every random number comes from
    one ``torch.Generator`` seeded with ``seed``, drawn in a fixed order. Runs
    on one intra-op thread and restores the caller's thread count.

    Args:
        grid: number of alpha (and beta) values, evenly spaced from 0 to 1.
        dim: D, features per embedding.
        batch_size: B, queries (and positive keys) per grid cell.
        num_negatives: M, negative keys per cell ('unpaired') or per query ('paired').
        sigma_scale: the covariance is ``sigma_scale * I``.
        temperature: passed to ``info_nce``.
        seed: seeds the generator of the means and the noise.

    Shape:
        - alphas, betas: (G,), G = ``grid``.
        - unpaired_losses, paired_losses: (G, G), indexed [alpha, beta].

    Returns:
        The grid and the two loss surfaces, as float64 CPU tensors.
    """
    generator = torch.Generator().manual_seed(seed)

    def standard_normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    mean_query, mean_positive, mean_negative = standard_normal(3, dim)  # (D,) each
    std = math.sqrt(sigma_scale)
    query_noise = std * standard_normal(batch_size, dim)  # (B, D)
    positive_noise = std * standard_normal(batch_size, dim)  # (B, D)
    unpaired_noise = std * standard_normal(num_negatives, dim)  # (M, D)
    paired_noise = std * standard_normal(batch_size, num_negatives, dim)  # (B, M, D)

    alphas = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)  # (G,)
    betas = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)  # (G,)
    unpaired_losses = torch.empty(grid, grid, dtype=torch.float64)  # (G, G)
    paired_losses = torch.empty(grid, grid, dtype=torch.float64)  # (G, G)

    query = mean_query + query_noise  # (B, D)
    # Positives depend only on alpha: build them once, not once per cell.
    positives = [
        float(alpha) * mean_query + (1 - float(alpha)) * mean_positive + positive_noise
        for alpha in alphas
    ]  # G x (B, D)
    # Each cell is a tiny problem: intra-op threads only add synchronisation, which
    # costs 40x on a busy machine. One thread also fixes the reduction order.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for j, beta in enumerate(betas.tolist()):
                mean = beta * mean_query + (1 - beta) * mean_negative  # (D,)
                unpaired_negatives = mean + unpaired_noise  # (M, D)
                paired_negatives = mean + paired_noise  # (B, M, D)
                for i, positive in enumerate(positives):
                    unpaired_losses[i, j] = info_nce(
                        query, positive, unpaired_negatives, temperature, negative_mode="unpaired"
                    ).item()
                    paired_losses[i, j] = info_nce(
                        query, positive, paired_negatives, temperature, negative_mode="paired"
                    ).item()
    finally:
        torch.set_num_threads(num_threads)
    return LossSurface(alphas, betas, unpaired_losses, paired_losses)


def draw_figure(surface: LossSurface, title: str) -> Figure:
    """Draw the two loss surfaces side by side as 3-D plots on an Agg canvas.

    Raises:
        ImportError: matplotlib is not installed.
    """
    # A bare Figure on an Agg canvas: no pyplot, so no global backend or figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from mpl_toolkits.mplot3d import Axes3D  # type: ignore[import-untyped]

    figure = Figure(figsize=(13, 5.8), layout="constrained")
    FigureCanvasAgg(figure)
    alpha_grid, beta_grid = torch.meshgrid(surface.alphas, surface.betas, indexing="ij")
    panels = (
        (
            "negative_mode='unpaired'\nM negatives (M, D) shared by all queries",
            surface.unpaired_losses,
        ),
        (
            "negative_mode='paired'\nM negatives (B, M, D), each query its own",
            surface.paired_losses,
        ),
    )
    for index, (panel_title, losses) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, index, projection="3d")
        assert isinstance(axes, Axes3D)
        axes.plot_surface(
            alpha_grid.numpy(),
            beta_grid.numpy(),
            losses.numpy(),
            cmap="viridis",
            edgecolor="none",
            antialiased=True,
        )
        axes.set_xlabel(r"$\alpha$  (positives → queries)")
        axes.set_ylabel(r"$\beta$  (negatives → queries)")
        axes.set_zlabel("loss")
        axes.set_title(panel_title)
        # The high corner (alpha = 0, beta = 1) at the back, so it hides none of the surface.
        axes.view_init(elev=25, azim=-130)
    figure.suptitle(title)
    return figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``info-nce plot``."""
    parser.description = (
        "Plot the InfoNCE loss of samples from interpolated Gaussians, as in the "
        "info-nce-pytorch README: queries ~ N(mu_q, S), positives ~ "
        "N(alpha*mu_q + (1-alpha)*mu_p, S), negatives ~ N(beta*mu_q + (1-beta)*mu_n, S), "
        "with S = sigma_scale * I and mu_q, mu_p, mu_n drawn once from N(0, I); the "
        "noise is drawn once and shared by all (alpha, beta) cells. One 3-D surface "
        "per negative mode ('unpaired': (M, D) negatives; 'paired': (B, M, D)), "
        "written as a PNG whose path is printed."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--grid",
        type=at_least(2),
        default=DEFAULT_GRID,
        help="alpha and beta values each, evenly spaced over [0, 1]",
    )
    parser.add_argument("--dim", type=at_least(1), default=DEFAULT_DIM, help="D, features")
    parser.add_argument(
        "--batch-size", type=at_least(1), default=DEFAULT_BATCH_SIZE, help="B, queries per cell"
    )
    parser.add_argument(
        "--num-negatives",
        type=at_least(1),
        default=DEFAULT_NUM_NEGATIVES,
        help="M, negatives per cell (unpaired) or per query (paired)",
    )
    parser.add_argument(
        "--sigma-scale",
        type=positive_float,
        default=DEFAULT_SIGMA_SCALE,
        help="covariance is sigma_scale * I",
    )
    parser.add_argument(
        "--temperature", type=positive_float, default=DEFAULT_TEMPERATURE, help="loss temperature"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="seed of the means and the noise"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG file to write")


def run(args: argparse.Namespace) -> int:
    """Compute both loss surfaces, write the figure, print its path; return the exit code."""
    output: Path = args.output
    if not output.parent.is_dir():
        print(
            f"info-nce plot: cannot write {output}: directory {output.parent} does not exist",
            file=sys.stderr,
        )
        return 1
    try:
        import matplotlib  # noqa: F401  # fail before the computation, not after
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 1

    surface = loss_surface(
        grid=args.grid,
        dim=args.dim,
        batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        sigma_scale=args.sigma_scale,
        temperature=args.temperature,
        seed=args.seed,
    )
    title = (
        f"InfoNCE loss, B={args.batch_size}, M={args.num_negatives}, D={args.dim}, "
        f"$\\Sigma$ = {args.sigma_scale:g} I, temperature={args.temperature:g}, seed={args.seed}"
    )
    figure = draw_figure(surface, title)
    try:
        figure.savefig(output, format="png", dpi=100)
    except OSError as error:
        print(f"info-nce plot: cannot write {output}: {error.strerror}", file=sys.stderr)
        return 1
    print(output)
    return 0
