"""Tests of `info-nce demo` (src/info_nce/cli/demo.py)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import single_thread

from info_nce import info_nce
from info_nce.cli.__main__ import main
from info_nce.cli.demo import (
    LATENTS_FILE,
    METRICS_FILE,
    MISSING_EXTRAS,
    TRAINING_FILE,
    DemoConfig,
    linear_readout,
    make_mixing,
    sample_sphere,
    sample_von_mises_fisher,
    train,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A few seconds on two cores; enough training for the R² to rise well above the baseline.
SMALL = [
    "--latent-dim", "3",
    "--batch-size", "64",
    "--steps", "40",
    "--hidden-width", "32",
    "--hidden-layers", "2",
    "--eval-samples", "512",
    "--eval-every", "20",
    "--lr", "3e-3",
    "--threads", "1",  # on a busy machine, threads of tiny ops mostly wait for each other
]  # fmt: skip
SMALL_CONFIG = DemoConfig(
    latent_dim=3,
    batch_size=64,
    steps=40,
    hidden_width=32,
    hidden_layers=2,
    eval_samples=512,
    eval_every=20,
    lr=3e-3,
    threads=1,
    progress=False,
)
TIMING_KEYS = {"seconds", "train_seconds", "eval_seconds", "steps_per_second"}
REQUIRED_KEYS = {"r2_before", "r2_after", "steps", "batch_size", "seconds"}


def run_demo(output_dir: Path, *extra: str) -> dict[str, object]:
    """Run ``info-nce demo`` in this process; return its metrics.json."""
    assert main(["demo", *SMALL, *extra, "--output-dir", str(output_dir)]) == 0
    metrics: dict[str, object] = json.loads((output_dir / METRICS_FILE).read_text())
    return metrics


def assert_png(path: Path) -> None:
    """The file is a PNG that matplotlib reads back as a non-blank image."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)  # (H, W, 4) float32 in [0, 1]
    assert image.shape[0] > 200
    assert image.shape[1] > 400
    assert image[..., :3].std() > 0.05, "the figure is (nearly) one flat colour"


def test_short_run_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output_dir = tmp_path / "new" / "demo"  # missing directories are created
    metrics = run_demo(output_dir)
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(
        [METRICS_FILE, TRAINING_FILE, LATENTS_FILE]
    )
    assert_png(output_dir / TRAINING_FILE)
    assert_png(output_dir / LATENTS_FILE)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in output_dir.iterdir():  # written via a private temporary file, then renamed
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert metrics.keys() >= REQUIRED_KEYS
    assert metrics["steps"] == 40
    assert metrics["batch_size"] == 64
    assert isinstance(metrics["seconds"], float)
    assert metrics["seconds"] > 0
    before, after = metrics["r2_before"], metrics["r2_after"]
    assert isinstance(before, float)
    assert isinstance(after, float)
    assert after > before + 0.1, (before, after)
    history = metrics["r2_history"]
    assert isinstance(history, list)
    assert [step for step, _ in history] == [0, 20, 40]
    assert history[0][1] == before
    assert history[-1][1] == after
    options = metrics["options"]
    assert isinstance(options, dict)
    assert options["latent_dim"] == 3
    assert options["kappa"] == DemoConfig().kappa
    out = capsys.readouterr().out
    for name in (METRICS_FILE, TRAINING_FILE, LATENTS_FILE):
        assert str(output_dir / name) in out


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    first = run_demo(tmp_path / "a", "--seed", "5")
    second = run_demo(tmp_path / "b", "--seed", "5")
    for metrics in (first, second):
        for key in TIMING_KEYS:
            del metrics[key]
    assert first == second
    assert first["options"]["seed"] == 5  # type: ignore[index]
    with single_thread():
        other = train(dataclasses.replace(SMALL_CONFIG, seed=6))
    assert other is not None
    assert other.after.r2 != first["r2_after"]
    assert other.before.r2 != first["r2_before"]


def assert_trains_as_the_plain_run(cached: dict[str, object], plain: dict[str, object]) -> None:
    """A run through grad_cache (chunks of 16) against the same run without it."""
    assert cached["options"]["grad_cache_chunk"] == 16  # type: ignore[index]
    assert abs(cached["r2_after"] - plain["r2_after"]) < 1e-6  # type: ignore[operator]
    for (step, got), (want_step, want) in zip(
        cached["loss_history"],
        plain["loss_history"],
        strict=True,  # type: ignore[call-overload]
    ):
        assert step == want_step
        assert abs(got - want) < 1e-5


def test_grad_cache_chunks_train_as_the_plain_run(tmp_path: Path) -> None:
    # The encoder (an MLP: no dropout, no BatchNorm) through grad_cache in
    # chunks of 16 of the 128 embeddings: the same training to float32
    # rounding (the chunks' parameter gradients are summed in another order,
    # so not bit for bit; measured: R² 4.5e-8 apart, losses 4.8e-7).
    plain = run_demo(tmp_path / "plain", "--seed", "5")
    cached = run_demo(tmp_path / "cached", "--seed", "5", "--grad-cache-chunk", "16")
    assert_trains_as_the_plain_run(cached, plain)


def test_nproc_2_trains(tmp_path: Path) -> None:
    # Fails, not skips, until info_nce gathers keys across ranks: the demo relies on it.
    assert "gather_distributed" in inspect.signature(info_nce).parameters, (
        "info_nce() has no gather_distributed keyword yet; `info-nce demo --nproc` needs it"
    )
    metrics = run_demo(tmp_path, "--nproc", "2")
    assert metrics["options"]["nproc"] == 2  # type: ignore[index]
    before, after = metrics["r2_before"], metrics["r2_after"]
    assert isinstance(before, float)
    assert isinstance(after, float)
    assert after > before + 0.1, (before, after)
    assert (tmp_path / TRAINING_FILE).is_file()
    assert (tmp_path / LATENTS_FILE).is_file()
    # Keys gathered from the other rank: each query has as many candidates as in
    # one process on the whole batch, so the losses match. Without the gather a
    # rank's queries would see half the candidates: about log(2) = 0.69 lower.
    with single_thread():
        single = train(SMALL_CONFIG)
    assert single is not None
    history = metrics["loss_history"]
    assert isinstance(history, list)
    distributed_loss = sum(loss for _, loss in history) / len(history)
    single_loss = sum(loss for _, loss in single.loss_history) / len(single.loss_history)
    assert abs(distributed_loss - single_loss) < 0.2, (distributed_loss, single_loss)


def test_grad_cache_chunks_on_two_processes_train_as_the_plain_run(tmp_path: Path) -> None:
    # grad_cache under gather_distributed: the gather's backward brings each rank
    # the gradient of its own embeddings, then the chunks are replayed.
    plain = run_demo(tmp_path / "plain", "--nproc", "2")
    cached = run_demo(tmp_path / "cached", "--nproc", "2", "--grad-cache-chunk", "16")
    assert_trains_as_the_plain_run(cached, plain)


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "1"], "--batch-size"),
        (["--steps", "-3"], "--steps"),
        (["--steps", "many"], "--steps"),
        (["--latent-dim", "1"], "--latent-dim"),
        (["--kappa", "0"], "--kappa"),
        (["--temperature", "nan"], "--temperature"),
        (["--lr", "-1e-3"], "--lr"),
        (["--eval-every", "0"], "--eval-every"),
        (["--nproc", "0"], "--nproc"),
        (["--threads", "0"], "--threads"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_option_exits_with_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], option: str
) -> None:
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *arguments, "--output-dir", str(output_dir)])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["--batch-size", "63", "--nproc", "2"], "--nproc"),
        (["--latent-dim", "10", "--eval-samples", "30"], "--eval-samples"),
    ],
)
def test_options_that_do_not_fit_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], option: str
) -> None:
    output_dir = tmp_path / "out"
    assert main(["demo", *arguments, "--output-dir", str(output_dir)]) == 2
    assert option in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["is_a_file", "below_a_file"])
def test_unusable_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    output_dir = blocker if where == "is_a_file" else blocker / "demo"
    assert main(["demo", *SMALL, "--output-dir", str(output_dir)]) == 1
    err = capsys.readouterr().err
    assert "--output-dir" in err
    assert "not a directory" in err
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    assert blocker.read_text() == "not a directory"


def test_package_and_parser_work_without_extras(tmp_path: Path) -> None:
    # `import torch` itself imports tqdm when it is installed (torch.hub), so
    # checking sys.modules would prove nothing: block both extras instead.
    output_dir = tmp_path / "out"
    code = (
        "import sys; sys.modules['tqdm'] = None; sys.modules['matplotlib'] = None\n"
        "import info_nce, info_nce.cli.demo\n"
        "from info_nce.cli.__main__ import build_parser, main\n"
        "build_parser()\n"
        f"sys.exit(main(['demo', '--output-dir', {str(output_dir)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1, result.stderr
    assert MISSING_EXTRAS in result.stderr
    assert not output_dir.exists()


@pytest.mark.parametrize("kappa", [0.5, 4.0, 50.0])
def test_von_mises_fisher_mean_resultant_length(kappa: float) -> None:
    # On S^2 (m = 3) the mean cosine with the mean direction is coth(kappa) - 1/kappa.
    generator = torch.Generator().manual_seed(0)
    count = 40_000
    mean = sample_sphere(count, 3, generator)  # (N, 3)
    sample = sample_von_mises_fisher(mean, kappa, generator)  # (N, 3)
    torch.testing.assert_close(sample.norm(dim=1), torch.ones(count, dtype=torch.float64))
    cosine = (sample * mean).sum(dim=1)  # (N,)
    expected = 1 / math.tanh(kappa) - 1 / kappa
    tolerance = 5 * cosine.std().item() / math.sqrt(count)
    assert abs(cosine.mean().item() - expected) < tolerance, (cosine.mean().item(), expected)
    # The part orthogonal to the mean has no preferred direction.
    residual = sample - cosine.unsqueeze(1) * mean  # (N, 3)
    assert residual.mean(dim=0).abs().max().item() < 5 / math.sqrt(count)


def test_von_mises_fisher_two_dims_matches_bessel_ratio() -> None:
    # On the circle (m = 2) the mean cosine is I1(kappa) / I0(kappa).
    kappa = 2.0
    generator = torch.Generator().manual_seed(1)
    mean = sample_sphere(40_000, 2, generator)
    cosine = (sample_von_mises_fisher(mean, kappa, generator) * mean).sum(dim=1)
    expected = (
        torch.special.i1(torch.tensor(kappa)) / torch.special.i0(torch.tensor(kappa))
    ).item()
    tolerance = 5 * cosine.std().item() / math.sqrt(len(cosine))
    assert abs(cosine.mean().item() - expected) < tolerance


def test_mixing_is_orthogonal_and_nonlinear() -> None:
    mixing = make_mixing(6, 3, torch.Generator().manual_seed(0))
    weights = [m.weight for m in mixing if isinstance(m, torch.nn.Linear)]
    assert len(weights) == 3
    for weight in weights:
        torch.testing.assert_close(weight @ weight.T, torch.eye(6, dtype=torch.float64))
    latents = sample_sphere(2000, 6, torch.Generator().manual_seed(1))
    # Not linear: a linear readout of z from g(z) is clearly imperfect.
    assert linear_readout(mixing(latents), latents).r2 < 0.98


def test_linear_readout_scores_held_out_half() -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(400, 4, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    exact = linear_readout(latents @ rotation + 3.0, latents)
    assert exact.r2 == pytest.approx(1.0, abs=1e-9)
    assert exact.latents.shape == (200, 4)
    noise = torch.randn(400, 4, generator=generator, dtype=torch.float64)
    # Unrelated features: the held-out R² is about 0 (slightly below, from overfitting).
    assert abs(linear_readout(noise, latents).r2) < 0.1


def test_learned_temperature_moves_and_symmetric_trains() -> None:
    config = dataclasses.replace(SMALL_CONFIG, learn_temperature=True, symmetric=True)
    with single_thread():
        result = train(config)
    assert result is not None
    final_temperature = result.temperature_history[-1][1]
    assert final_temperature != pytest.approx(config.temperature, rel=1e-3)
    assert result.after.r2 > result.before.r2 + 0.1
