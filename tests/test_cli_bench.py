"""`info-nce bench`: the harness measures what it says, without timing assertions."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from info_nce import info_nce, nt_xent, siglip_loss
from info_nce.cli import bench
from info_nce.cli.__main__ import main

TINY = {
    mode: bench.Config("T", mode, 8, 5, 4, repeats=2) for mode in ("in-batch", "unpaired", "paired")
}


@pytest.mark.parametrize("mode", list(TINY))
@pytest.mark.parametrize("implementation", ["ours", "reference", "floor"])
def test_measure_reports_times_and_memory(mode: str, implementation: str) -> None:
    result = bench.measure(TINY[mode], implementation, bench.References())
    times = result["times_s"]
    assert isinstance(times, list)
    assert len(times) == 2
    assert all(t > 0 for t in times)
    assert result["median_s"] == statistics.median(times)
    assert isinstance(result["peak_extra_bytes"], int)
    assert result["peak_extra_bytes"] >= 0


def test_measure_uses_the_reference_wheel(info_nce_pytorch: object) -> None:
    # The conftest fixture fails if the wheel is missing; reading it here checks the path.
    assert bench.DEFAULT_REFERENCE_WHEEL.exists()
    references = bench.References(info_nce_pytorch=bench.DEFAULT_REFERENCE_WHEEL)
    result = bench.measure(TINY["unpaired"], "reference", references)
    assert isinstance(result["median_s"], float)


def test_symmetric_and_label_references_are_the_dense_losses() -> None:
    config_symmetric = bench.Config("T", "in-batch", 8, 0, 4, repeats=1, symmetric=True)
    config_labels = bench.Config("T", "in-batch", 8, 0, 4, repeats=1, classes=3)
    for config in (config_symmetric, config_labels):
        result = bench.measure(config, "reference", bench.References())
        assert result["median_s"] > 0  # type: ignore[operator]


@pytest.mark.parametrize("name", ["C8", "C9", "C10"])
def test_nt_xent_references_compute_the_benchmarked_loss(name: str) -> None:
    # The dense loss each NT-Xent configuration is timed against is the loss
    # that `ours` computes there (float64, both of our paths).
    config = bench.CONFIGS[name]
    reference = bench.DENSE_NT_XENT[config.objective]
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 13, 5, generator=generator, dtype=torch.float64)
    expected = reference(z1, z2, config.temperature)
    options = bench.OBJECTIVE_OPTIONS[config.objective]
    for chunk_size in (None, 4):
        loss = nt_xent([z1, z2], temperature=config.temperature, chunk_size=chunk_size, **options)  # type: ignore[arg-type]
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    plain = nt_xent([z1, z2], temperature=config.temperature)
    assert config.objective == "" or not torch.allclose(plain, expected)


def test_combine_takes_the_median_of_process_medians_and_the_largest_peak() -> None:
    combined = bench._combine(
        [
            {"median_s": 3.0, "peak_extra_bytes": 10},
            {"median_s": 1.0, "peak_extra_bytes": 30},
            {"median_s": 2.0, "peak_extra_bytes": 20},
        ]
    )
    assert combined["median_s"] == 2.0
    assert combined["peak_extra_bytes"] == 30
    assert bench._combine([{"median_s": 1.0}, {"error": ["boom"]}]) == {"error": ["boom"]}


def test_markdown_row_shows_ratios() -> None:
    row = {
        "config": "C9",
        "problem": "in-batch B=1, D=1",
        "reference_s": 2.0,
        "ours_s": 1.0,
        "floor_s": 0.5,
        "speedup_vs_reference": 2.0,
        "ratio_to_floor": 2.0,
        "reference_peak_bytes": 2 * 2**20,
        "ours_peak_bytes": 2**20,
    }
    line = bench._markdown_row(row)
    assert line.startswith("| C9 | in-batch B=1, D=1 |")
    assert "| 2.00x | 2.00x | 2 | 1 |" in line


def test_unknown_configuration_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "C42"]) == 2
    assert "C42" in capsys.readouterr().out


def test_every_issue_configuration_is_defined() -> None:
    assert {f"C{k}" for k in range(17)} <= set(bench.CONFIGS)
    assert bench.CONFIGS["C11"].queue
    assert not bench._inputs(bench.CONFIGS["C11"])[2].requires_grad
    assert bench.CONFIGS["C10"].temperature == 0.5
    assert bench.CONFIGS["C2"].batch == 16384
    assert not bench.CONFIGS["C5"].reference_fits


def test_machine_description_names_the_cpu_and_its_vector_extensions() -> None:
    description = bench.machine_description()
    assert f"({torch.backends.cpu.get_cpu_capability()})" in description
    assert description.split(" (")[0].strip()  # a CPU name, whatever the platform
    assert f"torch {torch.__version__}" in description


def test_embedding_recipe_references_compute_the_benchmarked_loss() -> None:
    # C14's and C15's dense losses (written as sentence-transformers writes
    # them) are the losses `ours` computes there, in float64 at a small size.
    generator = torch.Generator().manual_seed(0)
    shared = dataclasses.replace(bench.CONFIGS["C14"], batch=9, negatives=3, dim=5, guide_width=4)
    query, key = torch.randn(2, 9, 5, generator=generator, dtype=torch.float64)
    negatives = torch.randn(9, 3, 5, generator=generator, dtype=torch.float64)
    guide = tuple(x.double() for x in bench._guide(shared, [query, key, negatives]))
    expected = bench._dense_shared_loss(query, key, negatives, guide, shared)
    for chunk_size in (None, 4):
        loss = info_nce(
            query,
            key,
            negatives,
            temperature=shared.temperature,
            negative_mode="shared",
            hardness_mode="all_negatives",
            hardness_strength=shared.hardness,
            false_negative_margin=shared.margin,
            guide=guide,
            chunk_size=chunk_size,
        )
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    gte = bench.CONFIGS["C15"]
    expected = bench._dense_gte_loss(query, key, gte.temperature)
    for chunk_size in (None, 4):
        loss = info_nce(
            query,
            key,
            temperature=gte.temperature,
            directions=gte.directions,  # type: ignore[arg-type]
            chunk_size=chunk_size,
        )
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("open_clip", [False, True], ids=["formula", "open_clip-wheel"])
def test_siglip_references_compute_the_benchmarked_loss(open_clip: bool) -> None:
    # C13's dense loss (open_clip's SigLipLoss, or its formula written in the
    # bench) is the loss `ours` computes there, in float64 at a small size.
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 9, 5, generator=generator, dtype=torch.float64)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    reference = bench._dense_siglip_loss
    if open_clip:
        assert bench.DEFAULT_OPEN_CLIP_WHEEL.exists()
        reference = bench.load_open_clip_siglip(bench.DEFAULT_OPEN_CLIP_WHEEL)()
    unit = torch.nn.functional.normalize
    expected = reference(unit(query, dim=1), unit(key, dim=1), scale, bias)
    for chunk_size in (None, 4):
        loss = siglip_loss(query, key, 1 / scale, bias, chunk_size=chunk_size)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["ours", "reference", "floor"])
def test_siglip_configuration_measures_each_implementation(implementation: str) -> None:
    tiny = dataclasses.replace(bench.CONFIGS["C13"], batch=8, dim=4, repeats=2)
    references = bench.References(open_clip=bench.DEFAULT_OPEN_CLIP_WHEEL)
    result = bench.measure(tiny, implementation, references)
    assert isinstance(result["median_s"], float)
    assert bench.References(None, bench.DEFAULT_OPEN_CLIP_WHEEL).arguments() == [
        "--open-clip-wheel",
        str(bench.DEFAULT_OPEN_CLIP_WHEEL),
    ]
