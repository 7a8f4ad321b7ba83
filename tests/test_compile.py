"""torch.compile: every option compiles as one graph and gives the eager result.

Compiled, the engine is two custom ops (`info_nce.engine.op`); the rest of
the loss (validation, the problem, dense paths, class sums) is traced. Each
case is compiled with ``fullgraph=True`` (any graph break is an error)
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

from info_nce import InfoNCE, MemoryQueue, NTXent, SigLIPLoss, info_nce
from info_nce.engine import op, walker
from info_nce.engine.function import LogSumExpOptions
from info_nce.objectives import DecoupledObjective, SigmoidObjective

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    (path, reduction, name)
    for path in ("engine", "dense", TILES_PATH)
    for reduction in ("mean", "none")
    for name in options(path)
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


@pytest.mark.parametrize(("path", "reduction", "name"), CASES)
def test_every_option_compiles_as_one_graph_and_equals_eager(
    path: str, reduction: str, name: str
) -> None:
    assert_compiled_equals_eager(options(path, reduction)[name], float_inputs())


@pytest.mark.parametrize("name", ["unpaired", "labels", "nt_xent"])
def test_explain_counts_no_graph_break(name: str) -> None:
    # Traced through the walker, these broke the graph: a strided out=
    # product, torch.unique, a Function given one tensor twice.
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


@pytest.mark.parametrize("labelled", [False, True])
def test_siglip_module_with_learnable_temperature_and_bias_compiles_once(labelled: bool) -> None:
    graphs = run_steps(SigLIPLoss(chunk_size=8, reduction="none"), 3, labelled=labelled)
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


def op_cases() -> list[tuple[LogSumExpOptions, tuple[Tensor, ...]]]:
    """The engine op's inputs for both kinds of walk, float64."""
    generator = torch.Generator().manual_seed(4)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    rows, keys, frozen, extra = draw(5, 3), draw(5, 3), draw(4, 3), draw(5, 2)
    temperature = torch.tensor(0.4, dtype=torch.float64)
    labels = walker.LabelRule(torch.arange(5) % 2, (torch.arange(5) % 2, torch.arange(4) % 2))
    two_pass = LogSumExpOptions(
        reduction="none",
        block_rows=2,
        column_keys=5,
        row_scale=0.5,
        column_scale=0.5,
        target_offset=0,
        normalize=True,
    )
    in_forward = LogSumExpOptions(
        reduction="mean",
        block_rows=2,
        target_extra=True,
        exclude_target=True,
        exclude_labels=labels,
        normalize=True,
        grads_in_forward=True,
        objective=DecoupledObjective(),
    )
    # Shared negatives: each row's band of 2 own negatives excluded, padding
    # masked, the in-batch keys and the negatives raised (hardness).
    shared = LogSumExpOptions(
        reduction="sum",
        block_rows=2,
        target_offset=0,
        exclusions=(walker.Diagonal(0, segment=1, width=2),),
        valid_keys=(None, torch.arange(10) % 3 > 0),
        raised_segments=(0, 1),
        raise_strength=2.0,
        normalize=True,
    )
    # SigLIP: positives by label, a bias tensor (the last segment input).
    sigmoid = LogSumExpOptions(
        reduction="none",
        block_rows=2,
        target_labels=walker.LabelRule(torch.arange(5) % 2, (torch.arange(5) % 2,)),
        bias_input=True,
        normalize=True,
        objective=SigmoidObjective(),
    )
    bias = torch.tensor(-1.5, dtype=torch.float64)
    return [
        (two_pass, (rows, None, temperature, keys)),
        (in_forward, (rows, extra, temperature, keys, frozen)),
        (shared, (rows, extra, temperature, keys, draw(10, 3))),
        (sigmoid, (rows, None, temperature, keys, frozen, bias)),
    ]


@pytest.mark.parametrize(
    "case", [0, 1, 2, 3], ids=["two-pass", "grads-in-forward", "shared", "sigmoid"]
)
def test_the_engine_ops_pass_torch_library_opcheck(case: int) -> None:
    # Schema, fake (meta) shapes, autograd registration and AOT dispatch.
    options, (rows, extra, temperature, *segments) = op_cases()[case]
    rule = options.exclude_labels
    inputs = (rows, extra, temperature, *segments)
    # Every input needs a gradient but a second segment (frozen keys, a queue).
    needs = [True, extra is not None, True, True] + [case == 2] * (len(segments) - 1)
    if case == 3:  # the bias
        needs[-1] = True
    for x, flag in zip(inputs, needs, strict=True):
        if x is not None:
            x.requires_grad_(flag)
    args = (
        rows,
        extra,
        temperature,
        list(segments),
        None if rule is None else rule.rows,
        [] if rule is None else list(rule.segments),
        options.rule_tensors(),
        op._key(options.parts()),
        needs,
    )
    torch.library.opcheck(torch.ops.info_nce.log_sum_exp.default, args)


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
