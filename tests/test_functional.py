"""The drop-in API (issue 2): `info_nce` and `InfoNCE` against the formula and the seed.

Every mode (in-batch, unpaired, paired) and reduction is compared, loss and the
gradient of every input, with the float64 formula of `reference.py` and with
info-nce-pytorch 0.1.4 itself (the `info_nce_pytorch` fixture), on the default
dispatch and on the forced blockwise engine.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    HALF_TOLERANCES,
    INPUT_NAMES,
    MODES,
    REDUCTIONS,
    TOLERANCES,
    Mode,
    Tolerance,
    assert_close,
    assert_matches,
    dtype_id,
    make_inputs,
    negative_mode_of,
    reference_info_nce,
    reference_loss_and_grads,
    upstream_gradient,
)
from torch import Tensor

from info_nce import InfoNCE, info_nce
from info_nce.dense import dense_info_nce

pytestmark = pytest.mark.usefixtures("one_thread")

FLOAT_DTYPES = (torch.float64, torch.float32)


def loss_and_grads(
    loss_fn: Callable[..., Tensor], inputs: list[Tensor], upstream: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``loss_fn(*inputs)`` and the gradients of its inputs for the upstream gradient."""
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, inputs, grad_outputs=upstream.to(loss.dtype))
    return loss, grads


def check_against_reference(
    inputs: list[Tensor],
    mode: Mode,
    reduction: str,
    *,
    temperature: float,
    chunk_size: int | None,
    tolerance: Tolerance,
) -> Tensor:
    """Loss and gradients (random upstream gradient) against the reference; returns the loss."""
    negative_mode = negative_mode_of(mode)
    upstream = upstream_gradient(torch.Size([len(inputs[0])] if reduction == "none" else []))
    loss, grads = loss_and_grads(
        lambda *x: info_nce(
            *x,
            temperature=temperature,
            reduction=reduction,
            negative_mode=negative_mode,
            chunk_size=chunk_size,
        ),
        inputs,
        upstream,
    )
    expected = reference_loss_and_grads(
        inputs, upstream, temperature=temperature, reduction=reduction, negative_mode=negative_mode
    )
    assert_matches(loss, grads, expected, tolerance)
    return loss


# --- Against the float64 formula ----------------------------------------------

REFERENCE_CASES = [
    pytest.param(mode, batch, dim, num_negatives, id=f"{mode}-B{batch}-D{dim}-M{num_negatives}")
    for mode in MODES
    for batch in (1, 2, 37)
    for dim in (1, 3, 123)
    for num_negatives in ((1,) if mode == "in-batch" else (1, 5))
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("mode", "batch", "dim", "num_negatives"), REFERENCE_CASES)
def test_loss_and_gradients_match_float64_reference(
    mode: Mode, batch: int, dim: int, num_negatives: int, reduction: str, dtype: torch.dtype
) -> None:
    inputs = make_inputs(mode, batch, dim, num_negatives, dtype=dtype, seed=batch * dim)
    loss = check_against_reference(
        inputs, mode, reduction, temperature=0.07, chunk_size=None, tolerance=TOLERANCES[dtype]
    )
    assert loss.dtype == dtype
    assert loss.shape == ((batch,) if reduction == "none" else ())


def test_reference_formula_on_a_hand_computed_case() -> None:
    # Two orthogonal unit queries and keys: logits [[1, 0], [0, 1]] / t.
    eye = torch.eye(2, dtype=torch.float64)
    expected_row = math.log(math.exp(1 / 0.5) + 1) - 1 / 0.5
    loss = reference_info_nce(3 * eye, eye, temperature=0.5, reduction="none")
    expected = torch.full((2,), expected_row, dtype=torch.float64)
    assert_close(loss, expected, rtol=1e-15, atol=0, name="loss")
    # Unpaired: one negative equal to the positive makes the two logits equal: log 2.
    loss = reference_info_nce(eye[:1], eye[:1], eye[:1], temperature=0.5)
    assert_close(
        loss, torch.tensor(math.log(2), dtype=torch.float64), rtol=1e-15, atol=0, name="loss"
    )


def test_assert_close_fails_and_names_the_worst_element() -> None:
    # The comparisons above are only as good as this helper.
    expected = torch.zeros(3, 4, dtype=torch.float64)
    actual = expected.clone()
    actual[1, 2], actual[2, 0] = 1e-3, 1e-5
    with pytest.raises(AssertionError, match=r"2 of 12 .* index \(1, 2\): actual 0\.001"):
        assert_close(actual, expected, rtol=0, atol=1e-6, name="x")
    actual[:] = torch.nan
    with pytest.raises(AssertionError, match="12 of 12"):
        assert_close(actual, expected, rtol=1, atol=1, name="x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(expected[:2], expected, rtol=1, atol=1, name="x")
    # A scale per row: a large row does not loosen the others.
    actual = expected.clone()
    actual[0] += 1e-3
    row_scale = torch.tensor([[1e3], [1.0], [1.0]])
    assert_close(actual, expected, rtol=0, atol=1e-6, scale=row_scale)
    actual[1, 3] = 1e-5
    with pytest.raises(AssertionError, match=r"index \(1, 3\)"):
        assert_close(actual, expected, rtol=0, atol=1e-6, scale=row_scale)


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    reduction=st.sampled_from(REDUCTIONS),
    batch=st.integers(1, 40),
    dim=st.integers(1, 48),
    num_negatives=st.integers(0, 8),
    temperature=st.floats(0.01, 10.0),
    chunk_size=st.none() | st.integers(1, 45),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_problems_match_reference(
    mode: Mode,
    reduction: str,
    batch: int,
    dim: int,
    num_negatives: int,
    temperature: float,
    chunk_size: int | None,
    seed: int,
) -> None:
    inputs = make_inputs(mode, batch, dim, num_negatives, seed=seed)
    check_against_reference(
        inputs,
        mode,
        reduction,
        temperature=temperature,
        chunk_size=chunk_size,
        tolerance=TOLERANCES[torch.float64],
    )


@settings(max_examples=30, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    batch=st.integers(1, 20),
    dim=st.integers(1, 16),
    temperature=st.floats(0.05, 5.0),
    chunk_size=st.none() | st.integers(1, 25),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_invariant_to_row_scale_and_equivariant_to_row_order(
    mode: Mode, batch: int, dim: int, temperature: float, chunk_size: int | None, seed: int
) -> None:
    # Normalisation makes each row's length irrelevant; permuting the samples
    # (and their paired negatives) permutes the per-sample losses.
    inputs = make_inputs(mode, batch, dim, 4, seed=seed, requires_grad=False)
    generator = torch.Generator().manual_seed(seed)
    options = {
        "temperature": temperature,
        "reduction": "none",
        "negative_mode": negative_mode_of(mode),
        "chunk_size": chunk_size,
    }
    loss = info_nce(*inputs, **options)

    row_scales = [torch.rand(x.shape[:-1], generator=generator) * 100 + 0.01 for x in inputs]
    scaled = [x * scale.unsqueeze(-1) for x, scale in zip(inputs, row_scales, strict=True)]
    assert_close(info_nce(*scaled, **options), loss, rtol=1e-10, atol=1e-12, name="scaled loss")

    order = torch.randperm(batch, generator=generator)
    permuted = [inputs[0][order], inputs[1][order]]
    if mode == "unpaired":
        permuted.append(inputs[2])
    elif mode == "paired":
        permuted.append(inputs[2][order])
    assert_close(info_nce(*permuted, **options), loss[order], rtol=1e-10, atol=1e-12, name="loss")


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode: Mode, reduction: str, chunk_size: int | None) -> None:
    inputs = make_inputs(mode, 4, 3, 3)

    def loss_fn(*x: Tensor) -> Tensor:
        return info_nce(
            *x,
            temperature=0.5,
            reduction=reduction,
            negative_mode=negative_mode_of(mode),
            chunk_size=chunk_size,
        )

    assert torch.autograd.gradcheck(loss_fn, tuple(inputs))


# --- Against info-nce-pytorch 0.1.4 ---------------------------------------------

SEED_SHAPES = [(1, 1, 1), (2, 3, 5), (37, 123, 5)]
SEED_CASES = [
    pytest.param(mode, *shape, id=f"{mode}-B{shape[0]}-D{shape[1]}-M{shape[2]}")
    for mode in MODES
    for shape in SEED_SHAPES
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("chunk_size", [None, 5], ids=["auto", "chunk5"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("mode", "batch", "dim", "num_negatives"), SEED_CASES)
def test_matches_info_nce_pytorch(
    info_nce_pytorch: types.ModuleType,
    mode: Mode,
    batch: int,
    dim: int,
    num_negatives: int,
    reduction: str,
    chunk_size: int | None,
    dtype: torch.dtype,
) -> None:
    inputs = make_inputs(mode, batch, dim, num_negatives, dtype=dtype, seed=dim)
    options = {
        "temperature": 0.05,
        "reduction": reduction,
        "negative_mode": negative_mode_of(mode),
    }
    upstream = upstream_gradient(torch.Size([batch] if reduction == "none" else []))
    loss, grads = loss_and_grads(
        lambda *x: info_nce(*x, **options, chunk_size=chunk_size), inputs, upstream
    )
    seed_loss, seed_grads = loss_and_grads(
        lambda *x: info_nce_pytorch.info_nce(*x, **options), inputs, upstream
    )
    assert loss.dtype == seed_loss.dtype
    scales = reference_loss_and_grads(inputs, upstream, **options)
    assert_matches(
        loss, grads, scales, TOLERANCES[dtype], expected_loss=seed_loss, expected_grads=seed_grads
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_module_matches_info_nce_pytorch_module(
    info_nce_pytorch: types.ModuleType, mode: Mode, reduction: str
) -> None:
    inputs = make_inputs(mode, 6, 5, 3, seed=3)
    options = {"temperature": 0.3, "reduction": reduction, "negative_mode": negative_mode_of(mode)}
    upstream = upstream_gradient(torch.Size([6] if reduction == "none" else []))
    loss, grads = loss_and_grads(InfoNCE(**options), inputs, upstream)
    seed_loss, seed_grads = loss_and_grads(info_nce_pytorch.InfoNCE(**options), inputs, upstream)
    scales = reference_loss_and_grads(inputs, upstream, **options)
    tolerance = TOLERANCES[torch.float64]
    assert_matches(
        loss, grads, scales, tolerance, expected_loss=seed_loss, expected_grads=seed_grads
    )


@pytest.mark.parametrize("mode", MODES)
def test_defaults_match_info_nce_pytorch(info_nce_pytorch: types.ModuleType, mode: Mode) -> None:
    # No options at all: temperature 0.1, reduction 'mean', negative_mode 'unpaired'
    # (the module's) or the seed's positional order (the function's).
    inputs = make_inputs(mode, 5, 4, 3, seed=11, requires_grad=False)
    tolerance = TOLERANCES[torch.float64]
    if mode == "paired":
        actual = info_nce(*inputs, 0.1, "mean", "paired")
        expected = info_nce_pytorch.info_nce(*inputs, 0.1, "mean", "paired")
    else:
        actual = info_nce(*inputs)
        expected = info_nce_pytorch.info_nce(*inputs)
        module_loss = InfoNCE()(*inputs)
        assert_close(module_loss, expected, rtol=tolerance.rtol, atol=tolerance.atol, name="loss")
    assert_close(actual, expected, rtol=tolerance.rtol, atol=tolerance.atol, name="loss")


@pytest.mark.parametrize("path", ["info_nce", "InfoNCE.__init__", "InfoNCE.forward"])
def test_signature_extends_info_nce_pytorch_with_keyword_only_options(
    info_nce_pytorch: types.ModuleType, path: str
) -> None:
    root, *attributes = path.split(".")
    ours = functools.reduce(getattr, attributes, {"info_nce": info_nce, "InfoNCE": InfoNCE}[root])
    theirs = functools.reduce(getattr, attributes, getattr(info_nce_pytorch, root))
    our_parameters = list(inspect.signature(ours).parameters.values())
    their_parameters = list(inspect.signature(theirs).parameters.values())
    count = len(their_parameters)

    def describe(parameters: list[inspect.Parameter]) -> list[tuple[str, object, object]]:
        return [(p.name, p.default, p.kind) for p in parameters]

    assert describe(our_parameters[:count]) == describe(their_parameters)
    additions = [p.name for p in our_parameters[count:] if p.kind is not p.KEYWORD_ONLY]
    assert not additions, f"additions that are not keyword-only: {additions}"


# --- Zero vectors -------------------------------------------------------------


def with_zero_rows(inputs: list[Tensor], pattern: str) -> list[Tensor]:
    """Leaf copies of `inputs` with all-zero vectors: some rows, or everything."""
    zeroed = [x.detach().clone() for x in inputs]
    if pattern == "all":
        zeroed = [torch.zeros_like(x) for x in zeroed]
    else:
        zeroed[0][0] = 0  # a query
        zeroed[1][1] = 0  # a positive key (in-batch: a candidate of every query)
        if len(zeroed) == 3:
            zeroed[2][1] = 0  # a negative key (paired: all of query 1's negatives)
            if zeroed[2].dim() == 3:
                zeroed[2][2, 0] = 0  # and one of query 2's
    return [x.requires_grad_(True) for x in zeroed]


@pytest.mark.parametrize("pattern", ["rows", "all"])
@pytest.mark.parametrize("chunk_size", [None, 3], ids=["auto", "chunk3"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_zero_vectors_finite_and_match_info_nce_pytorch(
    info_nce_pytorch: types.ModuleType,
    mode: Mode,
    reduction: str,
    dtype: torch.dtype,
    chunk_size: int | None,
    pattern: str,
) -> None:
    inputs = with_zero_rows(make_inputs(mode, 5, 4, 3, dtype=dtype, seed=5), pattern)
    options = {"temperature": 0.1, "reduction": reduction, "negative_mode": negative_mode_of(mode)}
    upstream = upstream_gradient(torch.Size([5] if reduction == "none" else []))
    loss, grads = loss_and_grads(
        lambda *x: info_nce(*x, **options, chunk_size=chunk_size), inputs, upstream
    )
    seed_loss, seed_grads = loss_and_grads(
        lambda *x: info_nce_pytorch.info_nce(*x, **options), inputs, upstream
    )
    assert torch.isfinite(loss).all(), f"loss {loss}"
    for name, grad in zip(INPUT_NAMES, grads, strict=False):
        assert torch.isfinite(grad).all(), f"gradient of {name} is not finite: {grad}"
    # A zero vector's gradient is 1 / eps = 1e12 times that of a unit vector
    # (as in F.normalize); the reference's scales are per row, so each row is
    # compared at its own size.
    expected = reference_loss_and_grads(inputs, upstream, **options)
    tolerance = TOLERANCES[dtype]
    assert_matches(loss, grads, expected, tolerance)
    assert_matches(
        loss, grads, expected, tolerance, expected_loss=seed_loss, expected_grads=seed_grads
    )


# --- Half precision -----------------------------------------------------------

HALF_DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_at_low_temperature(mode: Mode, reduction: str, dtype: torch.dtype) -> None:
    # Finite, a float32 loss (documented), gradients in the inputs' dtype, and
    # close to the float32 result of the same values upcast.
    half = [x.detach().to(dtype).requires_grad_(True) for x in make_inputs(mode, 16, 32, 5)]
    upcast = [x.detach().float().requires_grad_(True) for x in half]
    options = {"temperature": 0.01, "reduction": reduction, "negative_mode": negative_mode_of(mode)}
    upstream = upstream_gradient(torch.Size([16] if reduction == "none" else []))
    loss, grads = loss_and_grads(lambda *x: info_nce(*x, **options), half, upstream)
    float32_loss, float32_grads = loss_and_grads(
        lambda *x: info_nce(*x, **options), upcast, upstream
    )
    assert loss.dtype == torch.float32, "half-precision inputs give a float32 loss (documented)"
    assert torch.isfinite(loss).all(), f"loss {loss}"
    for name, grad in zip(INPUT_NAMES, grads, strict=False):
        assert grad.dtype == dtype, f"gradient of {name} has dtype {grad.dtype}"
        assert torch.isfinite(grad).all(), f"gradient of {name} is not finite"
    scales = reference_loss_and_grads(upcast, upstream, **options)
    assert_matches(
        loss,
        grads,
        scales,
        HALF_TOLERANCES[dtype],
        expected_loss=float32_loss,
        expected_grads=float32_grads,
    )


# --- info-nce-pytorch's README examples (test_docs.py runs ours) -------------

# The usage snippets of info-nce-pytorch's README, verbatim (they assume `import torch`).
SEED_README_IMPORT = "from info_nce import InfoNCE, info_nce\n"
SEED_README_EXAMPLES = {
    "in-batch": """\
loss = InfoNCE()
batch_size, embedding_size = 32, 128
query = torch.randn(batch_size, embedding_size)
positive_key = torch.randn(batch_size, embedding_size)
output = loss(query, positive_key)
""",
    "unpaired": """\
loss = InfoNCE(negative_mode='unpaired') # negative_mode='unpaired' is the default value
batch_size, num_negative, embedding_size = 32, 48, 128
query = torch.randn(batch_size, embedding_size)
positive_key = torch.randn(batch_size, embedding_size)
negative_keys = torch.randn(num_negative, embedding_size)
output = loss(query, positive_key, negative_keys)
""",
    "paired": """\
loss = InfoNCE(negative_mode='paired')
batch_size, num_negative, embedding_size = 32, 6, 128
query = torch.randn(batch_size, embedding_size)
positive_key = torch.randn(batch_size, embedding_size)
negative_keys = torch.randn(batch_size, num_negative, embedding_size)
output = loss(query, positive_key, negative_keys)
""",
}


def run_snippet(source: str, namespace: dict[str, object], seed: int = 0) -> None:
    with torch.random.fork_rng():  # the snippets draw from the global generator
        torch.manual_seed(seed)
        exec(compile(source, "<README example>", "exec"), namespace)


@pytest.mark.parametrize("example", list(SEED_README_EXAMPLES))
def test_seed_readme_examples_run_and_match_info_nce_pytorch(
    info_nce_pytorch: types.ModuleType, example: str
) -> None:
    ours: dict[str, object] = {"torch": torch}
    run_snippet(SEED_README_IMPORT, ours)
    assert ours["InfoNCE"] is InfoNCE
    assert ours["info_nce"] is info_nce
    run_snippet(SEED_README_EXAMPLES[example], ours)
    theirs: dict[str, object] = {"torch": torch, "InfoNCE": info_nce_pytorch.InfoNCE}
    run_snippet(SEED_README_EXAMPLES[example], theirs)
    output, expected = ours["output"], theirs["output"]
    assert isinstance(output, Tensor)
    assert isinstance(expected, Tensor)
    assert output.shape == ()
    assert torch.isfinite(output)
    assert_close(output, expected, rtol=1e-5, atol=1e-6, name="output")


@pytest.mark.parametrize("labels", [False, True], ids=["no-labels", "labels"])
@pytest.mark.parametrize("mode", ["unpaired", "paired"])
def test_dense_default_in_batch_resolves_as_the_public_api(mode: str, labels: bool) -> None:
    # dense_info_nce(in_batch=None) must mean what info_nce(in_batch_negatives=None) means.
    inputs = make_inputs(mode, 6, 4, 3, seed=21)  # type: ignore[arg-type]
    label_tensor = torch.tensor([0, 1, 0, 2, 1, 0]) if labels else None
    units = [x / x.norm(dim=-1, keepdim=True) for x in inputs]
    dense = dense_info_nce(*units, 0.1, "none", mode, labels=label_tensor)  # type: ignore[arg-type]
    public = info_nce(*inputs, negative_mode=mode, labels=label_tensor, reduction="none")
    assert_close(dense, public, rtol=1e-12, atol=1e-12, name="loss")
