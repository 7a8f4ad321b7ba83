"""torch.compile (issue 14, in progress): the paths that already compile as one graph.

Each case is traced with `torch._dynamo.explain` (0 graph breaks) and run
compiled with ``fullgraph=True`` (the ``aot_eager`` backend: Dynamo and AOT
autograd without code generation, to keep the tests fast), against eager.
The options not listed here still break the graph (see the note of issue 14).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from reference import assert_close
from torch import Tensor

from info_nce import InfoNCE, info_nce

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(24, 8, generator=generator).requires_grad_()
    key = torch.randn(24, 8, generator=generator).requires_grad_()
    paired = torch.randn(24, 3, 8, generator=generator).requires_grad_()
    mask = torch.rand(24, 3, generator=generator) > 0.3
    temperature = torch.tensor(0.2, requires_grad=True)
    return query, key, paired, mask, temperature


CASES: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "engine-tensor-temperature": lambda q, k, n, m, t: info_nce(q, k, temperature=t, chunk_size=8),
    "engine-paired-mask": lambda q, k, n, m, t: info_nce(
        q, k, n, negative_mode="paired", negative_mask=m, chunk_size=8
    ),
    "dense-tensor-temperature": lambda q, k, n, m, t: info_nce(q, k, temperature=t),
}


@pytest.mark.parametrize("name", CASES)
def test_compiles_as_one_graph_and_equals_eager(name: str) -> None:
    function = CASES[name]
    args = inputs()
    explanation = torch._dynamo.explain(function)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    leaves = [x for x in args if x.requires_grad]
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    eager = function(*args)
    eager_grads = torch.autograd.grad(eager, leaves, allow_unused=True)
    assert_close(loss, eager, rtol=1e-6, atol=1e-6, name="loss")
    for got, want in zip(grads, eager_grads, strict=True):
        assert (got is None) == (want is None)  # the same inputs reach the loss
        if got is not None and want is not None:
            assert_close(got, want, rtol=1e-5, atol=1e-6, name="gradient")


def test_learnable_temperature_module_has_no_graph_break() -> None:
    # The temperature check used to sync with the host every step (bool() of
    # a tensor: a graph break); compiled, it is an assert op in the graph.
    query, key, *_ = inputs()
    module = InfoNCE(learn_temperature=True, chunk_size=8)
    explanation = torch._dynamo.explain(module)(query, key)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_a_bad_temperature_fails_inside_the_compiled_graph() -> None:
    query, key, *_ = inputs()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q, k, t: info_nce(q, k, temperature=t, chunk_size=8),
        backend="aot_eager",
        fullgraph=True,
    )
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        compiled(query, key, torch.tensor(-1.0))
