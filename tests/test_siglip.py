"""SigLIP's sigmoid loss: `siglip_loss` and `SigLIPLoss`.

Every path (the dense loss, the engine's default blocks, blocks of a few
rows) against a float64 formula written here, sharing no code with the
package: pair (i, j) of the (B, B + M) logits ``cos(q_i, k_j) / t + b`` is
positive when j == i (with labels: when their labels are equal; never for a
negative key) and costs ``-log sigmoid(+-logit)``. And against open_clip's
own ``SigLipLoss``, which takes the scale 1 / t and the bias.
"""

from __future__ import annotations

import itertools
from typing import Any
from unittest import mock

import pytest
import torch
from peers import peer_packages
from reference import HALF_TOLERANCES, assert_close
from torch import Tensor

import info_nce.functional as functional
from info_nce import SigLIPLoss, grad_cache, siglip_loss
from info_nce.engine import walker
from info_nce.objectives import SigmoidObjective

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPERATURE, BIAS = 0.3, -2.0
# The dense loss; the engine at its own block size; blocks of a few rows
# (37 rows: 8 + 8 + 8 + 8 + 5, a block boundary inside every label run).
PATHS = ("dense", "engine", 8)
LABELS = ("none", "repeats", "all-equal", "all-distinct")


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def reference(
    query: Tensor,
    key: Tensor,
    temperature: Tensor | float,
    bias: Tensor | float,
    *,
    reduction: str = "mean",
    labels: Tensor | None = None,
    negatives: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """The sigmoid loss in float64, from its definition (module docstring)."""
    unit = _unit if normalize else (lambda x: x)
    q, k = unit(query.double()), unit(key.double())
    keys = k if negatives is None else torch.cat([k, unit(negatives.double())])
    t = temperature.double() if isinstance(temperature, Tensor) else temperature
    b = bias.double() if isinstance(bias, Tensor) else bias
    logits = q @ keys.T / t + b  # (B, B + M)
    positive = torch.zeros(logits.shape, dtype=torch.bool)
    batch = len(q)
    if labels is None:
        positive[:, :batch] = torch.eye(batch, dtype=torch.bool)
    else:
        positive[:, :batch] = labels[:, None] == labels[None, :]
    per_pair = torch.where(
        positive, -torch.nn.functional.logsigmoid(logits), -torch.nn.functional.logsigmoid(-logits)
    )
    per_query = per_pair.sum(dim=1)  # (B,)
    if reduction == "mean":
        return per_query.sum() / batch
    return per_query.sum() if reduction == "sum" else per_query


def make_labels(kind: str, batch: int) -> Tensor | None:
    generator = torch.Generator().manual_seed(7)
    if kind == "repeats":
        return torch.randint(0, 4, (batch,), generator=generator)
    if kind == "all-equal":
        return torch.full((batch,), 3)
    if kind == "all-distinct":
        return torch.randperm(batch, generator=generator) * 5 - 7
    return None


def draw(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def run_path(path: str | int, **kwargs: Any) -> Tensor:
    """`siglip_loss` on ``path``: 'dense', 'engine' (its own blocks) or blocks of that many rows."""
    if path == "dense":
        assert "chunk_size" not in kwargs
        return siglip_loss(**kwargs)
    if path == "engine":
        with mock.patch.object(functional, "SIGLIP_DENSE_MAX_LOGITS", -1):
            return siglip_loss(**kwargs)
    return siglip_loss(**kwargs, chunk_size=int(path))


def check_against_reference(
    path: str | int,
    *,
    batch: int,
    dim: int,
    dtype: torch.dtype,
    reduction: str,
    labels: Tensor | None = None,
    num_negatives: int = 0,
    normalize: bool = True,
    scale: float = 1.0,
) -> None:
    """Loss and the gradients of q, k, negatives, temperature and bias against `reference`."""
    query = (draw(batch, dim, seed=1) * scale).to(dtype).requires_grad_()
    key = (draw(batch, dim, seed=2) * scale).to(dtype).requires_grad_()
    negatives = None
    if num_negatives:
        negatives = draw(num_negatives, dim, seed=3).to(dtype).requires_grad_()
    temperature = torch.tensor(TEMPERATURE, dtype=dtype, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=dtype, requires_grad=True)
    inputs = [x for x in (query, key, negatives, temperature, bias) if x is not None]
    loss = run_path(
        path,
        query=query,
        key=key,
        temperature=temperature,
        bias=bias,
        reduction=reduction,
        labels=labels,
        negative_keys=negatives,
        normalize=normalize,
    )
    detached = [x.detach().double().requires_grad_() for x in inputs]
    q64, k64, *rest = detached
    n64 = rest[0] if negatives is not None else None
    t64, b64 = rest[-2:]
    expected = reference(
        q64,
        k64,
        t64,
        b64,
        reduction=reduction,
        labels=labels,
        negatives=n64,
        normalize=normalize,
    )
    upstream = torch.rand(expected.shape, generator=torch.Generator().manual_seed(5)) + 0.5
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    want = torch.autograd.grad(expected, detached, upstream)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    # Each row's loss sums B + M terms: the scale of its error.
    terms = float(expected.detach().abs().max()) + 1
    assert_close(loss, expected, rtol=rtol, atol=atol, name="loss", scale=terms)
    names = ["query", "key", "negative_keys", "temperature", "bias"]
    if negatives is None:
        names.remove("negative_keys")
    for name, got, expect in zip(names, grads, want, strict=True):
        assert got.shape == expect.shape, name
        magnitude = max(1.0, float(expect.abs().max()))
        assert_close(got, expect, rtol=rtol, atol=atol, name=name, scale=magnitude)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("num_negatives", [0, 4])
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", PATHS)
def test_matches_the_formula(
    path: str | int, reduction: str, labels: str, num_negatives: int, dtype: torch.dtype
) -> None:
    check_against_reference(
        path,
        batch=37,
        dim=9,
        dtype=dtype,
        reduction=reduction,
        labels=make_labels(labels, 37),
        num_negatives=num_negatives,
    )


@pytest.mark.parametrize(
    ("batch", "dim", "chunk"),
    [(1, 1, 1), (1, 123, 4), (37, 1, 8), (37, 123, 36), (37, 123, 37), (37, 5, 1), (64, 7, 32)],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_odd_shapes_and_block_boundaries(batch: int, dim: int, chunk: int, reduction: str) -> None:
    for path in ("dense", chunk):
        check_against_reference(
            path,
            batch=batch,
            dim=dim,
            dtype=torch.float64,
            reduction=reduction,
            labels=make_labels("repeats", batch),
            num_negatives=3,
        )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_raw_dot_products_without_normalize(path: str | int, reduction: str) -> None:
    # Logits far beyond softplus's linear range (|z| > 40): still exact.
    for scale in (0.3, 6.0):
        check_against_reference(
            path,
            batch=37,
            dim=9,
            dtype=torch.float64,
            reduction=reduction,
            num_negatives=4,
            normalize=False,
            scale=scale,
        )


def test_float_temperature_and_bias_match_tensor_ones() -> None:
    query, key = draw(37, 9, seed=1), draw(37, 9, seed=2)
    for path in PATHS:
        with_floats = run_path(path, query=query, key=key, temperature=0.2, bias=-4.0)
        with_tensors = run_path(
            path,
            query=query,
            key=key,
            temperature=torch.tensor([0.2], dtype=torch.float64),
            bias=torch.tensor([[-4.0]], dtype=torch.float64),
        )
        assert_close(with_floats, with_tensors, rtol=1e-12, atol=1e-12)


def test_tensor_gradients_keep_their_shape() -> None:
    temperature = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([[-4.0]], dtype=torch.float64, requires_grad=True)
    for path in PATHS:
        loss = run_path(
            path,
            query=draw(37, 9, seed=1),
            key=draw(37, 9, seed=2),
            temperature=temperature,
            bias=bias,
        )
        grad_t, grad_b = torch.autograd.grad(loss, (temperature, bias))
        assert grad_t.shape == (1,)
        assert grad_b.shape == (1, 1)


@pytest.mark.parametrize("labels", ["none", "repeats"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction: str, labels: str) -> None:
    query = draw(6, 4, seed=1).requires_grad_()
    key = draw(6, 4, seed=2).requires_grad_()
    negatives = draw(3, 4, seed=3).requires_grad_()
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    label_tensor = make_labels(labels, 6)

    def loss(q: Tensor, k: Tensor, n: Tensor, t: Tensor, b: Tensor) -> Tensor:
        return siglip_loss(
            q, k, t, b, reduction, labels=label_tensor, negative_keys=n, chunk_size=4
        )

    assert torch.autograd.gradcheck(loss, (query, key, negatives, temperature, bias))


@pytest.mark.parametrize("labels", ["none", "repeats"])
@pytest.mark.parametrize("path", PATHS)
def test_equals_open_clip_siglip_loss(path: str | int, labels: str) -> None:
    with peer_packages():
        from open_clip.loss import SigLipLoss

    batch, dim = 37, 16
    query = draw(batch, dim, seed=1, dtype=torch.float32).requires_grad_()
    key = draw(batch, dim, seed=2, dtype=torch.float32).requires_grad_()
    temperature = torch.tensor(0.1, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    inputs = (query, key, temperature, bias)
    label_tensor = make_labels(labels, batch)
    ours = run_path(
        path, query=query, key=key, temperature=temperature, bias=bias, labels=label_tensor
    )
    peer = SigLipLoss()
    if label_tensor is not None:  # open_clip's ground truth from the labels, as ours
        same = (label_tensor[:, None] == label_tensor[None, :]).float()
        peer.get_ground_truth = lambda device, dtype, n, negative_only=False: 2 * same - 1
    theirs = peer(_unit(query), _unit(key), 1 / temperature, bias)  # open_clip's are unit
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6, name="loss")
    for name, got, want in zip(
        ("query", "key", "temperature", "bias"),
        torch.autograd.grad(ours, inputs),
        torch.autograd.grad(theirs, inputs),
        strict=True,
    ):
        assert_close(got, want, rtol=1e-4, atol=1e-6, name=name)


def test_equals_open_clip_on_a_large_batch_in_float32() -> None:
    # Rows of 700 keys, several blocks: the engine's float32 against the peer's.
    with peer_packages():
        from open_clip.loss import SigLipLoss

    query = draw(700, 32, seed=1, dtype=torch.float32).requires_grad_()
    key = draw(700, 32, seed=2, dtype=torch.float32).requires_grad_()
    ours = siglip_loss(query, key, 0.1, -10.0, chunk_size=256)
    theirs = SigLipLoss()(_unit(query), _unit(key), torch.tensor(10.0), torch.tensor(-10.0))
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6, name="loss")
    for got, want in zip(
        torch.autograd.grad(ours, (query, key)),
        torch.autograd.grad(theirs, (query, key)),
        strict=True,
    ):
        assert_close(got, want, rtol=1e-4, atol=1e-6, name="gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("path", PATHS)
def test_half_precision_inputs_against_float32(path: str | int, dtype: torch.dtype) -> None:
    query, key = draw(37, 9, seed=1, dtype=dtype), draw(37, 9, seed=2, dtype=dtype)
    loss = run_path(path, query=query, key=key, temperature=0.1, bias=-5.0)
    truth = reference(query.float(), key.float(), 0.1, -5.0)
    assert loss.dtype == torch.float32
    tolerance = HALF_TOLERANCES[dtype]
    scale = float(truth.abs()) + 1
    assert_close(loss, truth, rtol=tolerance.rtol, atol=tolerance.atol, scale=scale)


def test_autocast_runs_the_products_in_bfloat16_and_the_rest_in_float32() -> None:
    query = draw(37, 9, seed=1, dtype=torch.float32).requires_grad_()
    key = draw(37, 9, seed=2, dtype=torch.float32).requires_grad_()
    truth = reference(query.detach(), key.detach(), 0.1, -5.0)
    results = []
    for path in PATHS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run_path(path, query=query, key=key, temperature=0.1, bias=-5.0)
        assert loss.dtype == torch.float32
        tolerance = HALF_TOLERANCES[torch.bfloat16]
        scale = float(truth.abs()) + 1
        assert_close(loss, truth, rtol=tolerance.rtol, atol=tolerance.atol, scale=scale)
        results.append(loss)
    # The dense path and the engine round the same products alike.
    assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_cache_equals_one_backward(reduction: str) -> None:
    torch.manual_seed(0)
    image_tower, text_tower = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    images, texts = torch.randn(24, 6), torch.randn(24, 6)
    loss_fn = SigLIPLoss(reduction=reduction, chunk_size=8)
    upstream = torch.linspace(0.5, 1.5, 24) if reduction == "none" else torch.tensor(1.0)
    modules = (image_tower, text_tower, loss_fn)

    def plain() -> list[Tensor]:
        loss = loss_fn(image_tower(images), text_tower(texts))
        grads = torch.autograd.grad(loss, [p for m in modules for p in m.parameters()], upstream)
        return [loss.detach(), *grads]

    expected = plain()
    query = grad_cache(image_tower, images, chunk_size=7)  # the towers run again in backward
    key = grad_cache(text_tower, texts, chunk_size=5)
    loss = loss_fn(query, key)
    loss.backward(upstream)
    assert_close(loss, expected[0], rtol=1e-6, atol=1e-6, name="loss")
    params = [p for m in modules for p in m.parameters()]
    for param, want in zip(params, expected[1:], strict=True):
        assert param.grad is not None
        assert_close(param.grad, want, rtol=1e-5, atol=1e-6, name="parameter gradient")


class TestModule:
    def test_starts_as_siglip_does(self) -> None:
        loss_fn = SigLIPLoss()
        assert loss_fn.logit_scale is not None
        assert loss_fn.logit_scale.item() == pytest.approx(torch.tensor(10.0).log().item())
        assert loss_fn.temperature.item() == pytest.approx(0.1)
        assert isinstance(loss_fn.bias, torch.nn.Parameter)
        assert loss_fn.bias.item() == -10.0
        assert sorted(name for name, _ in loss_fn.named_parameters()) == ["bias", "logit_scale"]

    def test_forward_equals_the_function(self) -> None:
        loss_fn = SigLIPLoss(0.2, -3.0, reduction="sum", chunk_size=8)
        query, key = (
            draw(37, 9, seed=1, dtype=torch.float32),
            draw(37, 9, seed=2, dtype=torch.float32),
        )
        labels, negatives = make_labels("repeats", 37), draw(5, 9, seed=3, dtype=torch.float32)
        got = loss_fn(query, key, labels, negatives)
        want = reference(query, key, 0.2, -3.0, reduction="sum", labels=labels, negatives=negatives)
        assert_close(got, want, rtol=1e-5, atol=1e-6, scale=float(want) + 1)

    def test_fixed_settings_are_no_parameters(self) -> None:
        loss_fn = SigLIPLoss(0.2, -3.0, learn_temperature=False, learn_bias=False)
        assert list(loss_fn.parameters()) == []
        assert loss_fn.temperature == 0.2
        assert loss_fn.bias == -3.0

    def test_parameters_train(self) -> None:
        torch.manual_seed(0)
        # Two views of 16 samples: a tower learns to align them.
        samples = torch.randn(16, 8)
        tower = torch.nn.Linear(8, 8)
        loss_fn = SigLIPLoss()
        optimizer = torch.optim.SGD([*tower.parameters(), *loss_fn.parameters()], lr=0.5)
        start = (loss_fn.logit_scale.item(), loss_fn.bias.item())
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = loss_fn(tower(samples + 0.1 * torch.randn(16, 8)), samples)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert loss_fn.logit_scale.item() != start[0]
        assert loss_fn.bias.item() != start[1]

    def test_state_dict_round_trips(self) -> None:
        loss_fn = SigLIPLoss()
        with torch.no_grad():
            loss_fn.logit_scale.add_(0.5)  # type: ignore[union-attr]
            loss_fn.bias.sub_(1.5)  # type: ignore[union-attr]
        other = SigLIPLoss()
        other.load_state_dict(loss_fn.state_dict())
        assert other.temperature.item() == loss_fn.temperature.item()
        assert other.bias.item() == -11.5

    def test_the_scale_is_clamped_at_max_logit_scale(self) -> None:
        loss_fn = SigLIPLoss(max_logit_scale=20.0)
        with torch.no_grad():
            loss_fn.logit_scale.fill_(5.0)  # type: ignore[union-attr]
        assert loss_fn.temperature.item() == pytest.approx(1 / 20)
        loss_fn(torch.randn(8, 4), torch.randn(8, 4)).backward()
        assert float(loss_fn.logit_scale.grad) == 0.0  # type: ignore[union-attr,arg-type]

    def test_repr_lists_the_settings(self) -> None:
        text = repr(SigLIPLoss(learn_bias=False))
        assert "temperature=0.1" in text
        assert "bias=-10" in text
        assert "learn_bias=False" in text


BAD_CALLS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"bias": float("nan")}, ValueError, "bias must be a finite number"),
    ({"bias": float("inf")}, ValueError, "bias must be a finite number"),
    ({"bias": "big"}, TypeError, "bias must be a real number"),
    ({"bias": torch.tensor([1.0, 2.0])}, TypeError, "bias must be a number or a floating"),
    ({"bias": torch.tensor(1)}, TypeError, "bias must be a number or a floating"),
    ({"bias": torch.tensor(float("nan"))}, ValueError, "bias must be finite"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": torch.tensor(-1.0)}, ValueError, "temperature must be finite and > 0"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"labels": torch.zeros(5, dtype=torch.long)}, ValueError, "labels"),
    ({"labels": torch.zeros(8)}, TypeError, "labels"),
    ({"key": torch.randn(7, 4)}, ValueError, "<query> and <key> must have the same number"),
    ({"key": torch.randn(8, 4, dtype=torch.float64)}, TypeError, "<key> must have the same dtype"),
    ({"key": torch.randn(8)}, ValueError, "<key> must have 2 dimensions"),
    ({"negative_keys": torch.randn(3, 5)}, ValueError, "<negative_keys> should have the same"),
    ({"negative_keys": torch.randn(2, 3, 4)}, ValueError, "<negative_keys> must have 2"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be None or a positive int"),
    ({"normalize": 1}, TypeError, "normalize must be a bool"),
    ({"query": torch.randn(0, 4), "key": torch.randn(0, 4)}, ValueError, "at least one sample"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_CALLS)
def test_bad_input_gets_a_clear_error(
    change: dict[str, Any], error: type[Exception], message: str
) -> None:
    arguments: dict[str, Any] = {"query": torch.randn(8, 4), "key": torch.randn(8, 4)}
    arguments.update(change)
    with pytest.raises(error, match=message):
        siglip_loss(**arguments)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"bias": float("nan")}, ValueError, "bias must be a finite number"),
        ({"learn_bias": 1}, TypeError, "learn_bias must be a bool"),
        ({"temperature": 0.001}, ValueError, "below 1 / max_logit_scale"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ],
)
def test_bad_settings_get_a_clear_error(
    settings: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        SigLIPLoss(**settings)


def test_every_pair_of_paths_agrees_on_a_random_grid() -> None:
    # A denser sweep of sizes around the engine's block boundaries, float32.
    for batch, chunk in itertools.product((2, 9, 16, 17), (1, 3, 8, 16)):
        query, key = draw(batch, 6, seed=batch), draw(batch, 6, seed=batch + 1)
        labels = make_labels("repeats", batch)
        dense = siglip_loss(query, key, labels=labels, reduction="none")
        blocks = siglip_loss(query, key, labels=labels, reduction="none", chunk_size=chunk)
        assert_close(blocks, dense, rtol=1e-10, atol=1e-12)


def test_sigmoid_walks_take_taller_blocks_up_to_the_cap() -> None:
    # `block_scale`: 4x the walker's target logits, never past its maximum.
    scale = SigmoidObjective.block_scale
    assert walker.default_block_shape(16384, 16384, tileable=False, scale=scale) == (1024, None)
    assert walker.default_block_shape(65536, 65536, tileable=False, scale=scale) == (256, None)
    assert walker.default_block_shape(16384, 16384, tileable=False) == (256, None)


@pytest.mark.parametrize(("path", "engine"), [("dense", False), ("engine", True), (8, True)])
def test_each_path_runs_where_it_says(path: str | int, engine: bool) -> None:
    walks = []
    original = walker.statistics_pass

    def spy(*args: Any, **kwargs: Any) -> walker.BlockPass:
        walks.append(args[4].block_rows)
        return original(*args, **kwargs)

    with mock.patch.object(walker, "statistics_pass", spy):
        run_path(path, query=draw(37, 9, seed=1), key=draw(37, 9, seed=2))
    assert bool(walks) == engine
    if path == 8:
        assert walks == [8]
