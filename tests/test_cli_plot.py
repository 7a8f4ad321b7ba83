"""Tests of `info-nce plot` (src/info_nce/cli/plot.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from info_nce.cli.__main__ import main
from info_nce.cli.plot import MISSING_MATPLOTLIB, loss_surface

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = ["--grid", "3", "--dim", "16", "--batch-size", "4", "--num-negatives", "5"]


def assert_png(path: Path) -> None:
    """The file is a PNG that matplotlib reads back as a non-blank image."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)  # (H, W, 4) float32 in [0, 1]
    assert image.ndim == 3
    assert image.shape[0] > 200
    assert image.shape[1] > 400
    assert image[..., :3].std() > 0.05, "the figure is (nearly) one flat colour"


def test_plot_writes_png_and_prints_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "loss.png"
    assert main(["plot", *SMALL, "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    assert_png(output)


def test_module_entry_point_in_subprocess(tmp_path: Path) -> None:
    output = tmp_path / "loss.png"
    result = subprocess.run(
        [sys.executable, "-m", "info_nce", "plot", *SMALL, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(output)
    assert_png(output)


def test_import_info_nce_does_not_import_matplotlib() -> None:
    code = (
        "import sys, info_nce, info_nce.cli.__main__; "
        "info_nce.cli.__main__.build_parser(); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_loss_surface_is_deterministic_per_seed() -> None:
    kwargs = {"grid": 4, "dim": 16, "batch_size": 8, "num_negatives": 6}
    first = loss_surface(seed=3, **kwargs)
    second = loss_surface(seed=3, **kwargs)
    other = loss_surface(seed=4, **kwargs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.unpaired_losses, other.unpaired_losses)
    assert not torch.equal(first.paired_losses, other.paired_losses)


def test_loss_surface_restores_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loss_surface(grid=2, dim=8, batch_size=3, num_negatives=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_loss_surface_shape_and_grid() -> None:
    surface = loss_surface(grid=5, dim=8, batch_size=3, num_negatives=2)
    expected_grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    assert torch.equal(surface.alphas, expected_grid)
    assert torch.equal(surface.betas, expected_grid)
    assert surface.unpaired_losses.shape == (5, 5)
    assert surface.paired_losses.shape == (5, 5)
    assert torch.isfinite(surface.unpaired_losses).all()
    assert torch.isfinite(surface.paired_losses).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["unpaired_losses", "paired_losses"])
def test_loss_falls_with_alpha_and_rises_with_beta(mode: str, seed: int) -> None:
    # Default D, sigma and temperature: the means dominate the noise, so the
    # cosine similarity of a query with a key is about 0.9 when the key's mean is
    # mu_q and about 0 (+- 0.1) when it is an unrelated mean.
    num_negatives = 16
    surface = loss_surface(grid=5, batch_size=32, num_negatives=num_negatives, seed=seed)
    losses = getattr(surface, mode)  # (5, 5), [alpha, beta]
    assert (losses[:-1, :] > losses[1:, :]).all(), f"not falling along alpha:\n{losses}"
    assert (losses[:, :-1] < losses[:, 1:]).all(), f"not rising along beta:\n{losses}"
    # Positives on the queries, negatives unrelated: the loss is nearly zero.
    assert losses[-1, 0] < 0.1, losses
    # Negatives on the queries, positives unrelated: logit gap ~0.9 / 0.1 = 9 nats.
    assert losses[0, -1] > 8.0, losses
    # Everything on the queries: the positive is one of 1 + M equals, ~log(1 + M).
    chance = math.log(1 + num_negatives)
    assert abs(losses[-1, -1] - chance) < 1.0, losses


def test_paired_and_unpaired_agree_in_distribution() -> None:
    # Both modes sample negatives from the same distributions, so their surfaces
    # differ only by noise: a large gap would mean the modes were mixed up.
    surface = loss_surface(grid=3, batch_size=32, num_negatives=16)
    gap = (surface.unpaired_losses - surface.paired_losses).abs().max()
    assert gap < 1.0, surface


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--grid", "1"),
        ("--grid", "two"),
        ("--dim", "0"),
        ("--batch-size", "-1"),
        ("--num-negatives", "0"),
        ("--sigma-scale", "0"),
        ("--sigma-scale", "inf"),
        ("--temperature", "-0.1"),
        ("--temperature", "nan"),
    ],
)
def test_bad_option_exits_2_naming_it(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "loss.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", *SMALL, option, value, "--output", str(output)])
    assert exit_info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err
    assert not output.exists()


def test_missing_output_directory_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "missing" / "loss.png"
    assert main(["plot", *SMALL, "--output", str(output)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot write {output}" in captured.err
    assert "does not exist" in captured.err


def test_output_that_is_a_directory_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", *SMALL, "--output", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot write {tmp_path}" in captured.err


def test_missing_matplotlib_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    output = tmp_path / "loss.png"
    assert main(["plot", *SMALL, "--output", str(output)]) != 0
    assert MISSING_MATPLOTLIB in capsys.readouterr().err
    assert MISSING_MATPLOTLIB == "info-nce plot needs matplotlib: pip install 'info-nce[cli]'"
    assert not output.exists()
