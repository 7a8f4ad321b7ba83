"""Every option on every device, against a float64 CPU reference.

The CPU always; CUDA where there is one (skipped otherwise, for that reason).
Each option of the grid (`grid.options`) runs in float32 on the device, on the
dense, engine and tiles paths, with every reduction (a random upstream
gradient for ``'none'``), and must give the float64 CPU loss and gradients
to float32 rounding. The CPU paths are tested against the formulas elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from grid import PATHS, inputs, options
from reference import assert_close
from tiling import tiles_on_path  # noqa: F401  (autouse: the tiles path)
from torch import Tensor

from info_nce import InfoNCE, MemoryQueue, info_nce
from info_nce.engine import walker

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(path, name) for path in PATHS for name in options(path)]


def loss_and_grads(
    path: str, name: str, reduction: str, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.requires_grad_() for x in inputs(0, dtype, device)]
    value = options(path, reduction)[name](*leaves)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.rand(value.shape, generator=generator, dtype=torch.float64)  # as `inputs`
    grads = torch.autograd.grad(value, leaves, upstream.to(device, dtype), allow_unused=True)
    zeros = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
    return value.cpu(), [g.cpu() for g in zeros]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("path", "name"), CASES)
def test_every_option_on_the_device_matches_float64(
    device: torch.device, path: str, name: str, reduction: str
) -> None:
    exact, exact_grads = loss_and_grads(path, name, reduction, torch.float64, torch.device("cpu"))
    value, grads = loss_and_grads(path, name, reduction, torch.float32, device)
    assert value.dtype == torch.float32
    assert_close(value, exact, rtol=1e-5, atol=1e-6, name=f"{name} loss")
    for got, want in zip(grads, exact_grads, strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-6, name=f"{name} gradient")


def test_a_queue_module_on_the_device(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(2)
    module = InfoNCE(queue=MemoryQueue(16, 8), chunk_size=4).to(device)
    pushed: list[Tensor] = []
    for _ in range(3):
        query, key = torch.randn(2, 6, 8, generator=generator)
        leaf = query.to(device, copy=True).requires_grad_()
        loss = module(leaf, key.to(device))
        loss.backward()
        stored = torch.nn.functional.normalize(torch.cat(pushed))[-16:] if pushed else None
        reference_query = query.double().requires_grad_()
        expected = info_nce(
            reference_query,
            key.double(),
            torch.zeros(0, 8, dtype=torch.float64) if stored is None else stored.double(),
        )
        expected.backward()
        assert leaf.grad is not None
        assert reference_query.grad is not None
        assert_close(loss.cpu(), expected, rtol=1e-5, atol=1e-6, name="loss")
        assert_close(leaf.grad.cpu(), reference_query.grad, rtol=1e-5, atol=1e-6, name="grad")
        pushed.append(key)
    assert module.queue is not None
    assert module.queue.entries.device.type == device.type


def test_accelerators_take_larger_blocks() -> None:
    # No accelerator needed: the limits are a function of the device type.
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert walker.default_block_rows(32768, 32768, cpu) == 256
    assert walker.default_block_rows(32768, 32768, cuda) == 1024
    shape = walker.default_block_shape(32768, 1 << 23, tileable=True, device=cuda)
    assert shape == (1024, 1 << 15)  # 16 complete rows would be too few: tiles
    assert (
        walker.BlockLimits.of(cuda).target_elements
        == 8 * walker.BlockLimits.of(cpu).target_elements
    )


def test_an_accelerator_with_little_free_memory_takes_smaller_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = torch.device("cuda")
    roomy = walker.BlockLimits.of(torch.device("cpu"))
    monkeypatch.setattr(walker, "free_bytes", lambda device: 64 << 30)  # 64 GiB free
    limits = walker.BlockLimits.of(cuda)
    assert limits.max_elements == 8 * roomy.max_elements  # the scaled limit, well within
    monkeypatch.setattr(walker, "free_bytes", lambda device: 256 << 20)  # 256 MiB free
    limits = walker.BlockLimits.of(cuda)
    assert limits.max_elements == (256 << 20) // 8 // 4  # an eighth of it, in float32 logits
    assert limits.target_elements == limits.max_elements
    assert walker.default_block_rows(32768, 32768, cuda) == (256 << 20) // 32 // 32768
    monkeypatch.setattr(walker, "free_bytes", lambda device: 1 << 20)  # nearly full
    assert walker.BlockLimits.of(cuda).max_elements == walker.TARGET_BLOCK_ELEMENTS
