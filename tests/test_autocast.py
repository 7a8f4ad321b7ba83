"""The autocast policy: one rule on every path, against a float32 ground truth.

Under ``torch.autocast`` (bfloat16, on each device) the similarity products (the
logits, and d loss / d logits times rows or keys) run in the autocast dtype;
log-sum-exp statistics, the loss and the gradient accumulation stay in
float32, and the loss is float32. The dense path gets this from autocast's
matmul and its float32 statistics; the engine rounds its product operands
itself. Both must agree with the float32 loss (no autocast) and with each
other to bfloat16 tolerance, and must really have taken bfloat16 products.
Outside autocast nothing changes (the rest of the suite).
"""

from __future__ import annotations

import pytest
import torch
from grid import PATHS, Loss, inputs, options
from reference import assert_close
from tiling import tiles_on_path  # noqa: F401  (autouse: the tiles path)
from torch import Tensor

from info_nce import engine

pytestmark = pytest.mark.usefixtures("one_thread")

# bfloat16 keeps 8 significant bits: each product operand is off by up to
# 2^-9 relative, so a logit of unit vectors over t = 0.3 by up to ~0.013, and
# the mean loss and its gradients by a few 1e-3. Measured worst over this
# grid against float32: loss 9.6e-3 (dense, unpaired), gradient entry 6.6e-3
# (engine, hard-negative objective); the loss is O(1), gradient entries up
# to 0.8 (the temperature's, 4.9).
LOSS_TOLERANCE = 2e-2
GRAD_TOLERANCE = 2e-2

CASES = [(path, name) for path in PATHS for name in options(path)]


def loss_and_grads(loss: Loss, autocast: bool, device: torch.device) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.requires_grad_() for x in inputs(0, torch.float32, device)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        value = loss(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value, [
        torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)
    ]


@pytest.mark.parametrize(("path", "name"), CASES)
def test_autocast_takes_bfloat16_products_and_matches_float32(
    device: torch.device, path: str, name: str
) -> None:
    loss = options(path)[name]
    exact, exact_grads = loss_and_grads(loss, autocast=False, device=device)
    value, grads = loss_and_grads(loss, autocast=True, device=device)
    assert value.dtype == torch.float32
    assert_close(value, exact, rtol=0, atol=LOSS_TOLERANCE, name=f"{name} loss")
    for got, want in zip(grads, exact_grads, strict=True):
        assert got.dtype == torch.float32
        assert_close(got, want, rtol=0, atol=GRAD_TOLERANCE, name=f"{name} gradient")
    # The products were bfloat16: the loss and the query's gradient moved.
    assert not torch.equal(value, exact)
    assert not torch.equal(grads[0], exact_grads[0])


@pytest.mark.parametrize("name", options("engine"))
def test_dense_and_engine_agree_under_autocast(device: torch.device, name: str) -> None:
    dense, dense_grads = loss_and_grads(options("dense")[name], autocast=True, device=device)
    engine, engine_grads = loss_and_grads(options("engine")[name], autocast=True, device=device)
    assert_close(engine, dense, rtol=0, atol=LOSS_TOLERANCE, name=f"{name} loss")
    for got, want in zip(engine_grads, dense_grads, strict=True):
        assert_close(got, want, rtol=0, atol=GRAD_TOLERANCE, name=f"{name} gradient")


def test_product_dtype_policy() -> None:
    """16-bit inputs keep their dtype for the products off the CPU; autocast's rule otherwise."""
    cpu = torch.empty(2, 2, dtype=torch.bfloat16)
    # The meta device stands in for an accelerator: only the device type is read.
    accelerator = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    assert engine.product_dtype(cpu) is None  # float32 products on the CPU
    assert engine.product_dtype(accelerator) == torch.bfloat16
    assert engine.product_dtype(accelerator.half()) == torch.float16
    assert engine.product_dtype(accelerator.float()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine.product_dtype(cpu) == torch.bfloat16
        assert engine.product_dtype(cpu.float()) == torch.bfloat16
        assert engine.product_dtype(cpu.double()) is None


@pytest.mark.parametrize(("path", "name"), [(p, n) for p in PATHS[1:] for n in options(p)])
def test_sixteen_bit_inputs_take_their_products_where_the_policy_says(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, path: str, name: str
) -> None:
    """bfloat16 inputs with bfloat16 products (as on a GPU): float32 loss and statistics.

    On CUDA the policy itself; on the CPU, where it takes float32 products,
    it is forced. Either agrees with the float32 loss of the same (rounded)
    inputs to bfloat16 tolerance, and really took bfloat16 products.
    """
    loss = options(path)[name]
    drawn = [x.to(torch.bfloat16) for x in inputs(0, torch.float32, device)]
    exact = [x.float().requires_grad_() for x in drawn]
    exact_value = loss(*exact)
    exact_grads = torch.autograd.grad(exact_value, exact, allow_unused=True)
    if device.type == "cpu":
        monkeypatch.setattr(
            engine,
            "product_dtype",
            lambda like: like.dtype if like.dtype == torch.bfloat16 else None,
        )
    leaves = [x.clone().requires_grad_() for x in drawn]
    value = loss(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    assert value.dtype == torch.float32
    assert_close(value, exact_value, rtol=0, atol=LOSS_TOLERANCE, name=f"{name} loss")
    for got, want in zip(grads, exact_grads, strict=True):
        if want is None:
            continue
        assert got is not None
        assert got.dtype == torch.bfloat16
        assert_close(got.float(), want, rtol=0, atol=GRAD_TOLERANCE, name=f"{name} gradient")
    assert not torch.equal(value, exact_value)
