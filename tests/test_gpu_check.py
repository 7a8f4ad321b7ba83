"""benchmarks/gpu.py, the GPU check, runs end to end (on the CPU, at tiny sizes, here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_check_runs_its_cases_and_writes_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    # A stand-in peer with a loss for the in-batch case only (no peer is installed here).
    monkeypatch.setattr(
        module,
        "peers",
        lambda: {"fake": lambda case, a, b: (a * b).sum() if case.kind == "in-batch" else None},
    )
    out = tmp_path / "gpu.json"
    # The correctness part is the device tests, which the suite runs itself.
    argv = ["--device", "cpu", "--small", "--repeats", "1", "--skip-tests", "--json", str(out)]
    assert module.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["case"].split()[0], row["precision"]) for row in rows] == [
        (kind, precision)
        for kind in ("in-batch", "symmetric", "nt_xent", "shared", "siglip")
        for precision in ("bf16-autocast", "fp32-tf32")
    ]
    for row in rows:
        for label in ("ours", "ours_torch", "dense", "floor"):
            assert isinstance(row[f"{label}_s"], float)
            assert row[f"{label}_s"] > 0
        assert row["peer_fake_applies"] == row["case"].startswith("in-batch")
        assert isinstance(row["peer_fake_s"], float) == row["peer_fake_applies"]
        share = row["ours_product_share"]
        assert isinstance(share, float)
        assert 0 < share < 1
    out = capsys.readouterr().out
    assert "| ours / floor |" in out
    assert "| ours: products' share | fake | fake / ours | fake MiB |" in out
