"""Peer libraries' losses, for the tests that compare with them and for the docs' snippets.

pytorch-metric-learning and sentence-transformers come with the ``dev`` extra and are
imported as they are. lightly and open_clip need torchvision (their packages import it
on start), which has no build for the CPU torch on the package index here, so their loss
files are read out of their wheels (``make setup`` downloads them into .venv/reference)
and run as modules under stand-in parent packages. The classes are the peers' own code:
``from lightly.loss import NTXentLoss`` in a snippet gets lightly's ``NTXentLoss``.
"""

from __future__ import annotations

import sys
import types
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".venv" / "reference"
LIGHTLY_WHEEL = REFERENCE_DIR / "lightly-1.6.0-py3-none-any.whl"
OPEN_CLIP_WHEEL = REFERENCE_DIR / "open_clip_torch-3.3.0-py3-none-any.whl"


def _check(wheel: Path) -> None:
    if not wheel.is_file():
        raise FileNotFoundError(
            f"{wheel.name} not found in {REFERENCE_DIR}: run `make setup`, which downloads it"
        )


def run_source(archive: zipfile.ZipFile, wheel: Path, path: str, name: str) -> types.ModuleType:
    """One source file of a wheel, executed as a fresh module called ``name``."""
    module = types.ModuleType(name)
    module.__file__ = f"{wheel}/{path}"
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    source = archive.read(path).decode("utf-8")
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@contextmanager
def _modules_as(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """Within: ``modules`` in ``sys.modules``; after: those names as they were.

    Unlike ``mock.patch.dict(sys.modules, ...)``, which restores the whole
    dict, modules first imported inside (torch's submodules, a peer's
    dependencies) stay imported: re-importing them later would run them twice.
    Names added to ``modules`` while inside are removed too.
    """
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            previous = saved.get(name)
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _package(name: str, **members: object) -> types.ModuleType:
    package = types.ModuleType(name)
    package.__path__ = []  # a package: submodules resolve through sys.modules
    for key, value in members.items():
        setattr(package, key, value)
    return package


@cache
def _lightly_modules() -> dict[str, types.ModuleType]:
    """lightly 1.6.0's NT-Xent, DCL and memory bank files, under stand-in packages.

    ``lightly.models.utils`` (torchvision) stands in empty: the memory bank calls it
    only to gather across processes.
    """
    _check(LIGHTLY_WHEEL)
    modules: dict[str, types.ModuleType] = {
        "lightly": _package("lightly"),
        "lightly.utils": _package("lightly.utils"),
        "lightly.models": _package("lightly.models"),
        "lightly.models.utils": types.ModuleType("lightly.models.utils"),
        "lightly.models.modules": _package("lightly.models.modules"),
        "lightly.loss": _package("lightly.loss"),
    }
    with zipfile.ZipFile(LIGHTLY_WHEEL) as archive, _modules_as(modules):
        files = {
            "lightly.utils.dist": "lightly/utils/dist.py",
            "lightly.models.modules.memory_bank": "lightly/models/modules/memory_bank.py",
            "lightly.loss.ntx_ent_loss": "lightly/loss/ntx_ent_loss.py",
            "lightly.loss.dcl_loss": "lightly/loss/dcl_loss.py",
        }
        for name, path in files.items():
            parent, _, leaf = name.rpartition(".")
            modules[name] = run_source(archive, LIGHTLY_WHEEL, path, name)
            setattr(modules[parent], leaf, modules[name])
    modules["lightly.utils"].dist = modules["lightly.utils.dist"]  # type: ignore[attr-defined]
    modules["lightly.models"].utils = modules["lightly.models.utils"]  # type: ignore[attr-defined]
    modules["lightly.models.modules"].MemoryBankModule = modules[  # type: ignore[attr-defined]
        "lightly.models.modules.memory_bank"
    ].MemoryBankModule
    loss = modules["lightly.loss"]
    loss.NTXentLoss = modules["lightly.loss.ntx_ent_loss"].NTXentLoss  # type: ignore[attr-defined]
    loss.DCLLoss = modules["lightly.loss.dcl_loss"].DCLLoss  # type: ignore[attr-defined]
    return modules


@cache
def _open_clip_modules() -> dict[str, types.ModuleType]:
    """open_clip 3.3.0's ``loss.py`` (torch only) under a stand-in ``open_clip`` package."""
    _check(OPEN_CLIP_WHEEL)
    modules = {"open_clip": _package("open_clip")}
    with zipfile.ZipFile(OPEN_CLIP_WHEEL) as archive, _modules_as(modules):
        modules["open_clip.loss"] = run_source(
            archive, OPEN_CLIP_WHEEL, "open_clip/loss.py", "open_clip.loss"
        )
    modules["open_clip"].loss = modules["open_clip.loss"]  # type: ignore[attr-defined]
    modules["open_clip"].ClipLoss = modules["open_clip.loss"].ClipLoss  # type: ignore[attr-defined]
    return modules


def lightly_loss(name: str) -> type:
    """A loss class of lightly 1.6.0, e.g. ``"DCLLoss"``."""
    loss: type = getattr(_lightly_modules()["lightly.loss"], name)
    return loss


@contextmanager
def peer_packages() -> Iterator[None]:
    """``lightly.loss`` and ``open_clip.loss`` importable, for as long as the block runs."""
    with _modules_as({**_lightly_modules(), **_open_clip_modules()}):
        yield
