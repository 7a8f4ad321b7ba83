"""torch.func: ``grad``, ``vjp`` and ``functional_call`` on every path, against autograd.

The engine's Functions build their gradients in forward or recompute them in
backward; under torch.func both must give what plain autograd gives (the
reference: `torch.autograd.grad` of the same call, float64). What the engine
cannot do (vmap, forward mode, a second derivative) raises a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.func
from grid import PATHS, B, D, Loss, chunk, inputs, options
from ranks import init_gloo, run_ranks
from reference import assert_close
from tiling import TILES_PATH, tiles_on_path  # noqa: F401  (autouse: the tiles path)
from torch import Tensor

from info_nce import InfoNCE, MemoryQueue, NTXent, info_nce, nt_xent

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(path, name) for path in PATHS for name in options(path)]


def autograd_grads(loss: Loss, args: tuple[Tensor, ...], upstream: Tensor | None) -> list[Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in args]
    value = loss(*leaves)
    grads = torch.autograd.grad(value, leaves, upstream, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]


@pytest.mark.parametrize(("path", "name"), CASES)
def test_func_grad_equals_autograd(path: str, name: str) -> None:
    loss = options(path)[name]
    args = inputs()
    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(*args)
    want = autograd_grads(loss, args, None)
    for g, w, what in zip(got, want, ["query", "key", "negatives", "temperature"], strict=True):
        assert_close(g, w, rtol=1e-12, atol=1e-12, name=f"{name} d/d{what}")


@pytest.mark.parametrize(("path", "name"), CASES)
def test_func_vjp_with_a_random_upstream_gradient_equals_autograd(path: str, name: str) -> None:
    loss = options(path, reduction="none")[name]
    args = inputs(1)
    value, vjp = torch.func.vjp(loss, *args)
    upstream = torch.randn(
        value.shape, generator=torch.Generator().manual_seed(2), dtype=value.dtype
    )
    got = vjp(upstream)
    want = autograd_grads(loss, args, upstream)
    assert_close(value, loss(*args), rtol=1e-12, atol=1e-12, name="value")
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=1e-12, atol=1e-12, name=f"{name} gradient")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("module_name", ["InfoNCE", "NTXent"])
def test_functional_call_of_a_module_with_a_learnable_temperature(
    path: str, module_name: str
) -> None:
    module_type = InfoNCE if module_name == "InfoNCE" else NTXent
    module = module_type(learn_temperature=True, chunk_size=chunk(path)).double()
    query, key, *_ = inputs(3)
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert list(params) == ["logit_scale"]

    def loss(params: dict[str, Tensor], query: Tensor) -> Tensor:
        return torch.func.functional_call(module, params, (query, key))  # type: ignore[no-any-return]

    got_params, got_query = torch.func.grad(loss, argnums=(0, 1))(params, query)
    leaf = query.clone().requires_grad_()
    value = module(leaf, key)
    want_scale, want_query = torch.autograd.grad(value, [module.logit_scale, leaf])
    assert_close(got_params["logit_scale"], want_scale, rtol=1e-12, atol=1e-12, name="scale")
    assert_close(got_query, want_query, rtol=1e-12, atol=1e-12, name="query")


@pytest.mark.parametrize("path", ["engine", TILES_PATH])
@pytest.mark.parametrize("module_name", ["InfoNCE", "NTXent"])
def test_func_grad_with_a_queue_that_the_step_pushes_to(path: str, module_name: str) -> None:
    query, key, *_ = inputs(4)
    queue = MemoryQueue(8, D, dtype=torch.float64)
    queue.push(torch.randn(8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    frozen_queue = queue.keys.clone()
    c = chunk(path)
    if module_name == "InfoNCE":
        module: torch.nn.Module = InfoNCE(queue=queue, chunk_size=c)

        def loss(q: Tensor, k: Tensor) -> Tensor:
            return info_nce(q, k, frozen_queue, negative_mode="unpaired", chunk_size=c)

    else:
        module = NTXent(queue=queue, chunk_size=c)

        def loss(q: Tensor, k: Tensor) -> Tensor:
            return nt_xent([q, k], negative_keys=frozen_queue, chunk_size=c)

    got = torch.func.grad(lambda q, k: module(q, k), argnums=(0, 1))(query, key)
    want = autograd_grads(loss, (query, key), None)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=1e-12, atol=1e-12, name="gradient")
    # The step pushed the batch's keys (their values: the transform is gone).
    assert torch.equal(queue.keys[-B:][-5:], torch.nn.functional.normalize(key)[-5:])


def engine_loss(q: Tensor, k: Tensor) -> Tensor:
    return info_nce(q, k, chunk_size=4)


def paired_loss(q: Tensor, n: Tensor) -> Tensor:
    return info_nce(q, q, n, negative_mode="paired", chunk_size=4)


@pytest.mark.parametrize("loss", [engine_loss, paired_loss], ids=["LogSumExp", "PairedLogits"])
def test_what_the_engine_cannot_do_raises_a_clear_error(loss: Callable[..., Tensor]) -> None:
    query, key, negatives, _ = inputs(6)
    second = negatives if loss is paired_loss else key
    with pytest.raises(RuntimeError, match=r"does not support torch\.func\.vmap"):
        torch.func.vmap(loss)(query[None], second[None])
    with pytest.raises(RuntimeError, match=r"does not support torch\.func\.vmap"):
        torch.func.jacrev(loss)(query, second)
    with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
        torch.func.jvp(loss, (query, second), (query, second))
    with pytest.raises(RuntimeError, match="does not support differentiating the loss twice"):
        torch.func.grad(lambda q: torch.func.grad(loss)(q, second).sum())(query)

    def gradient_norm(q: Tensor) -> Tensor:  # create_graph inside one transform
        (grad,) = torch.autograd.grad(loss(q, second), q, create_graph=True)
        return grad.square().sum()

    with pytest.raises(RuntimeError, match="does not support differentiating the loss twice"):
        torch.func.grad(gradient_norm)(query)


def test_the_dense_path_takes_a_second_derivative_under_torch_func() -> None:
    # Small problems take the dense path, plain autograd: a Hessian-vector product works.
    query, key, *_ = inputs(7)
    hessian_row = torch.func.grad(lambda q: torch.func.grad(info_nce)(q, key).sum())(query)
    leaf = query.clone().requires_grad_()
    (grad,) = torch.autograd.grad(info_nce(leaf, key), leaf, create_graph=True)
    (want,) = torch.autograd.grad(grad.sum(), leaf)
    assert_close(hessian_row, want, rtol=1e-12, atol=1e-12, name="Hessian row sums")


def _func_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        generator = torch.Generator().manual_seed(rank)
        query = torch.randn(rank + 3, D, generator=generator, dtype=torch.float64)
        key = torch.randn(rank + 3, D, generator=generator, dtype=torch.float64)
        results = {}
        for path, c in [("dense", None), ("engine", 2)]:

            def loss(q: Tensor, k: Tensor, c: int | None = c) -> Tensor:
                return info_nce(q, k, symmetric=True, gather_distributed=True, chunk_size=c)

            got = torch.func.grad(loss, argnums=(0, 1))(query, key)
            value, vjp = torch.func.vjp(loss, query, key)
            results[path] = (
                got,
                vjp(torch.ones_like(value)),
                autograd_grads(loss, (query, key), None),
            )
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_func_grad_and_vjp_under_gather_distributed_on_two_ranks(tmp_path: Path) -> None:
    run_ranks(_func_worker, 2, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for path, (got, got_vjp, want) in results.items():
            for g, v, w in zip(got, got_vjp, want, strict=True):
                assert_close(g, w, rtol=1e-12, atol=1e-12, name=f"rank {rank} {path} grad")
                assert_close(v, w, rtol=1e-12, atol=1e-12, name=f"rank {rank} {path} vjp")
