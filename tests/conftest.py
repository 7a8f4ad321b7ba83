"""Shared fixtures: info-nce-pytorch 0.1.4 and lightly's DCL loss from their wheels, one thread."""

from __future__ import annotations

import os
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from reference import single_thread

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_WHEEL_ENV = "INFO_NCE_SEED_WHEEL"
DEFAULT_SEED_WHEEL = REPO_ROOT / ".venv" / "reference" / "info_nce_pytorch-0.1.4-py3-none-any.whl"
SEED_MODULE_NAME = "info_nce_pytorch_0_1_4"
LIGHTLY_WHEEL = REPO_ROOT / ".venv" / "reference" / "lightly-1.6.0-py3-none-any.whl"


def seed_wheel_path() -> Path:
    """The info-nce-pytorch 0.1.4 wheel: $INFO_NCE_SEED_WHEEL, else .venv/reference/."""
    override = os.environ.get(SEED_WHEEL_ENV)
    return Path(override) if override else DEFAULT_SEED_WHEEL


def load_seed_module(wheel: Path) -> types.ModuleType:
    """info-nce-pytorch's ``info_nce/__init__.py``, executed as module `SEED_MODULE_NAME`.

    Its import name is also ``info_nce``: installing it would replace ours, so
    its single source file is read out of the wheel and run in a fresh module.
    """
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("info_nce/__init__.py").decode("utf-8")
    module = types.ModuleType(SEED_MODULE_NAME)
    module.__file__ = f"{wheel}/info_nce/__init__.py"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@pytest.fixture(scope="session")
def info_nce_pytorch() -> types.ModuleType:
    """info-nce-pytorch 0.1.4 (its ``info_nce`` and ``InfoNCE``); never downloaded here."""
    wheel = seed_wheel_path()
    if not wheel.is_file():
        pytest.fail(
            f"info-nce-pytorch 0.1.4 wheel not found at {wheel}. Run `make test`, which "
            "downloads it (pip download --no-deps info-nce-pytorch==0.1.4 -d .venv/reference), "
            f"or point ${SEED_WHEEL_ENV} at the wheel.",
            pytrace=False,
        )
    module = load_seed_module(wheel)
    assert callable(module.info_nce), f"{wheel} has no info_nce function"
    return module


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread for the whole module (`reference.single_thread`)."""
    with single_thread():
        yield


def _run_source(archive: zipfile.ZipFile, wheel: Path, path: str, name: str) -> types.ModuleType:
    """One source file of a wheel, executed as a fresh module called ``name``."""
    module = types.ModuleType(name)
    module.__file__ = f"{wheel}/{path}"
    source = archive.read(path).decode("utf-8")
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@pytest.fixture(scope="session")
def lightly_dcl_loss() -> type:
    """lightly 1.6.0's ``DCLLoss``, from its wheel; never downloaded here.

    lightly itself needs torchvision, pytorch-lightning and hydra (its wheel's
    metadata), none of which this project wants. ``lightly/loss/dcl_loss.py``
    imports only torch and ``lightly.utils.dist`` (torch only), so those two
    files are read out of the wheel and run as modules, the second standing in
    for the package during the first's import.
    """
    if not LIGHTLY_WHEEL.is_file():
        pytest.fail(
            f"lightly 1.6.0 wheel not found at {LIGHTLY_WHEEL}. Run `make test`, which "
            "downloads it (pip download --no-deps lightly==1.6.0 -d .venv/reference).",
            pytrace=False,
        )
    with zipfile.ZipFile(LIGHTLY_WHEEL) as archive:
        dist = _run_source(archive, LIGHTLY_WHEEL, "lightly/utils/dist.py", "lightly.utils.dist")
        package = types.ModuleType("lightly.utils")
        package.dist = dist  # type: ignore[attr-defined]
        stand_ins = {"lightly": types.ModuleType("lightly"), "lightly.utils": package}
        with mock.patch.dict(sys.modules, {**stand_ins, "lightly.utils.dist": dist}):
            module = _run_source(archive, LIGHTLY_WHEEL, "lightly/loss/dcl_loss.py", "dcl_loss")
    loss: type = module.DCLLoss
    return loss


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="CUDA is not available on this machine"
        ),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a correctness test runs on: the CPU always, CUDA where there is one."""
    return torch.device(request.param)
