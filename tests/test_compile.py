"""torch.compile: every option compiles as one graph and gives the eager result.

Each case is compiled with ``fullgraph=True`` (any graph break is an error)
on the ``aot_eager`` backend (Dynamo and AOT autograd without code
generation, to keep the tests fast) and must equal eager, loss and
gradients, to float32 rounding; `torch._dynamo.explain` counts 0 breaks on
representative cases too. Modules run several steps: at fixed shapes they
must not recompile (a queue: once it is full).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from grid import TILES_PATH, inputs, options
from reference import assert_close
from tiling import tiles_on_path  # noqa: F401  (autouse: the tiles path)
from torch import Tensor
from torch._dynamo.utils import counters

from info_nce import InfoNCE, MemoryQueue, NTXent, info_nce

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINE_OPTIONS = list(options("engine"))
# Reduction 'none' (gradients in backward) and the other paths, on a few options.
MORE = [
    ("engine", "none", "in-batch"),
    ("engine", "none", "symmetric"),
    ("dense", "mean", "labels"),
    ("dense", "none", "nt_xent-hard-negative"),
    (TILES_PATH, "mean", "unpaired"),
    (TILES_PATH, "none", "in-batch+hard"),
]


def assert_compiled_equals_eager(function: Callable[..., Tensor], args: list[Tensor]) -> None:
    """Compiled as one graph, the loss and gradients equal eager's, to float32 rounding."""
    torch._dynamo.reset()
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    loss = compiled(*args)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(loss, args, upstream, allow_unused=True)
    eager = function(*args)
    eager_grads = torch.autograd.grad(eager, args, upstream, allow_unused=True)
    assert_close(loss, eager, rtol=1e-6, atol=1e-6, name="loss")
    for got, want in zip(grads, eager_grads, strict=True):
        assert (got is None) == (want is None)  # the same inputs reach the loss
        if got is not None and want is not None:
            assert_close(got, want, rtol=1e-5, atol=1e-6, name="gradient")


def float_inputs() -> list[Tensor]:
    return [x.requires_grad_() for x in inputs(0, torch.float32)]


@pytest.mark.parametrize("name", ENGINE_OPTIONS)
def test_every_option_compiles_as_one_graph_and_equals_eager(name: str) -> None:
    assert_compiled_equals_eager(options("engine")[name], float_inputs())


@pytest.mark.parametrize(("path", "reduction", "name"), MORE)
def test_other_paths_and_reductions_compile_as_one_graph(
    path: str, reduction: str, name: str
) -> None:
    assert_compiled_equals_eager(options(path, reduction)[name], float_inputs())


@pytest.mark.parametrize("name", ["labels", "nt_xent"])
def test_explain_counts_no_graph_break(name: str) -> None:
    # Once broken by torch.unique, a strided out= product and a Function
    # given one tensor twice.
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(options("engine")[name])(*float_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons


def unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def run_steps(
    module: torch.nn.Module, steps: int, *, batch: int = 16, labelled: bool = False
) -> list[int]:
    """Compiled and eager copies of ``module`` take the same steps; graphs after each step."""
    torch._dynamo.reset()
    counters.clear()
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(3)
    graphs = []
    for _ in range(steps):
        query, key = torch.randn(2, batch, 8, generator=generator)
        labels = torch.randint(0, 3, (batch,), generator=generator) if labelled else None
        results = []
        for loss_module in (compiled, eager):
            leaf = query.clone().requires_grad_()
            loss = loss_module(leaf, key, labels=labels)
            (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
            results.append((loss, leaf.grad))
        (loss, grad), (eager_loss, eager_grad) = results
        assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6, name="loss")
        assert grad is not None
        assert eager_grad is not None
        assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6, name="gradient")
        graphs.append(unique_graphs())
    for name, buffer in module.named_buffers():  # the compiled steps' pushes, as eager's
        assert torch.equal(buffer, dict(eager.named_buffers())[name]), name
    return graphs


def test_learnable_temperature_module_compiles_once() -> None:
    graphs = run_steps(InfoNCE(learn_temperature=True, chunk_size=8), 3)
    assert graphs == [1, 1, 1]


@pytest.mark.parametrize(
    ("module_type", "settings"),
    [
        (InfoNCE, {}),
        (InfoNCE, {"labels": True}),
        (InfoNCE, {"reduction": "none", "decoupled": True}),  # backward reads the ring
        (NTXent, {}),
    ],
    ids=["InfoNCE", "InfoNCE-labels", "InfoNCE-none-decoupled", "NTXent"],
)
def test_a_queue_module_compiles_and_stops_recompiling_once_full(
    module_type: type[torch.nn.Module], settings: dict[str, object]
) -> None:
    # A 40-key queue and batches of 16 keys: full after 3 steps, then its
    # write position takes 5 values; the count and the position are dynamic.
    options = dict(settings)
    labelled = bool(options.pop("labels", False))
    queue = MemoryQueue(40, 8, labels=labelled)
    module = module_type(queue=queue, chunk_size=8, **options)
    graphs = run_steps(module, 7, labelled=labelled)
    assert graphs[-1] <= 4, graphs  # while the queue fills
    assert graphs[3:] == [graphs[3]] * 4, graphs  # full: no recompilation


def test_a_bad_temperature_fails_inside_the_compiled_graph() -> None:
    query, key, *_ = float_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q, k, t: info_nce(q, k, temperature=t, chunk_size=8),
        backend="aot_eager",
        fullgraph=True,
    )
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        compiled(query, key, torch.tensor(-1.0))
