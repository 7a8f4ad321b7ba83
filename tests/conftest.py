"""Shared fixtures: info-nce-pytorch 0.1.4 and lightly's DCL loss from their wheels, one thread."""

from __future__ import annotations

import os
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The Triton kernels run on CPU tensors under Triton's interpreter, which
# Triton reads when a kernel is first built (tests/test_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from peers import lightly_loss
from reference import single_thread

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_WHEEL_ENV = "INFO_NCE_SEED_WHEEL"
DEFAULT_SEED_WHEEL = REPO_ROOT / ".venv" / "reference" / "info_nce_pytorch-0.1.4-py3-none-any.whl"
SEED_MODULE_NAME = "info_nce_pytorch_0_1_4"


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


@pytest.fixture(scope="session")
def lightly_dcl_loss() -> type:
    """lightly 1.6.0's ``DCLLoss``, from its wheel (`peers`); never downloaded here."""
    try:
        return lightly_loss("DCLLoss")
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)


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
