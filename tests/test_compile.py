"""torch.compile (issue 14, in progress): the paths that already compile as one graph.

Each case is traced with `torch._dynamo.explain` (0 graph breaks) and run
compiled with ``fullgraph=True`` (the ``aot_eager`` backend: Dynamo and AOT
autograd without code generation, to keep the tests fast), against eager.
The options in `WITH_BREAKS` still break the graph; compiled, they must
still give the eager result.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from reference import assert_close
from torch import Tensor

from info_nce import InfoNCE, info_nce, nt_xent

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
    # Compiled, the column statistics always take their exact pass of their
    # own (eagerly a host sync decides whether they need it).
    "engine-symmetric": lambda q, k, n, m, t: info_nce(
        q, k, temperature=t, symmetric=True, chunk_size=8
    ),
    # Compiled, the decoupled loss always masks rows without negatives
    # (eagerly a host sync skips the masking where there are none).
    "engine-decoupled": lambda q, k, n, m, t: info_nce(q, k, decoupled=True, chunk_size=8),
}

# Options that still break the graph (Dynamo then runs the pieces it cannot
# trace eagerly): their compiled results must equal eager all the same.
WITH_BREAKS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "in-batch+hard": lambda q, k, n, m, t: info_nce(
        q, k, n, negative_mode="paired", in_batch_negatives=True, chunk_size=8
    ),
    "labels": lambda q, k, n, m, t: info_nce(q, k, labels=torch.arange(24) % 5, chunk_size=8),
    "nt_xent-decoupled": lambda q, k, n, m, t: nt_xent([q, k], decoupled=True, chunk_size=8),
    "nt_xent-hard-negative": lambda q, k, n, m, t: nt_xent(
        [q, k], false_negative_rate=0.1, hard_negative_beta=1.0, chunk_size=8
    ),
}


def assert_compiled_equals_eager(
    function: Callable[..., Tensor], args: tuple[Tensor, ...], *, fullgraph: bool
) -> None:
    """The compiled loss and gradients equal eager's, to float32 rounding."""
    torch._dynamo.reset()
    compiled = torch.compile(function, backend="aot_eager", fullgraph=fullgraph)
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


@pytest.mark.parametrize("name", CASES)
def test_compiles_as_one_graph_and_equals_eager(name: str) -> None:
    function = CASES[name]
    args = inputs()
    explanation = torch._dynamo.explain(function)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_compiled_equals_eager(function, args, fullgraph=True)


@pytest.mark.parametrize("name", WITH_BREAKS)
def test_options_with_graph_breaks_compile_to_the_eager_result(name: str) -> None:
    function = WITH_BREAKS[name]
    assert_compiled_equals_eager(function, inputs(), fullgraph=False)


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
