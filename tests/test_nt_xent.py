"""`nt_xent` / `NTXent` against float64 formulas written here, on the dense path and the engine.

`reference_nt_xent` shares no code with the package: it loops over the
anchors and takes, for each, ``logsumexp`` over every other embedding's logit
minus the mean logit of its positives (the other views of its sample, or the
embeddings with its label). Two more formulas pin the equivalences the
documentation claims: SimCLR's NT-Xent as ``F.cross_entropy`` with a masked
(2B, 2B) matrix (what lightly's ``NTXentLoss`` computes), and SupCon's loss as
its authors write it (``contrast_mode='all'``/``'one'``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reference import REDUCTIONS, assert_close
from tiling import TILES_PATH, tiles_on_path  # noqa: F401  (an autouse fixture)
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import info_nce.functional as functional
from info_nce import NTXent, info_nce, nt_xent
from info_nce.engine.function import LogSumExp

pytestmark = pytest.mark.usefixtures("one_thread")

PATHS = ["dense", "chunk=1", "chunk=7", "chunk=VB-1", TILES_PATH]


def chunk_size_of(path: str, anchors: int) -> int | None:
    if path in ("dense", TILES_PATH):  # the tiles path: the engine chooses, see `tiling`
        return None
    if path == "chunk=VB-1":
        return max(1, anchors - 1)
    return int(path.removeprefix("chunk="))


def reference_nt_xent(
    views: Tensor,
    labels: Tensor | None,
    temperature: float | Tensor,
    reduction: str,
    *,
    anchors: str = "all",
    normalize: bool = True,
    negatives: Tensor | None = None,
    negative_labels: Tensor | None = None,
    decoupled: bool = False,
) -> Tensor:
    """NT-Xent in float64 from its definition, anchor by anchor.

    Extra ``negatives`` are candidates of every anchor, positives of those
    that share their ``negative_labels``. ``decoupled``: the log-sum-exp runs
    over the candidates that are not positives (0 without any).
    """
    num_views, batch, dim = views.shape
    z = views.double().reshape(num_views * batch, dim)
    extra = torch.zeros(0, dim, dtype=torch.float64) if negatives is None else negatives.double()
    if normalize:
        z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
        extra = extra / torch.linalg.vector_norm(extra, dim=1, keepdim=True).clamp_min(1e-12)
    z_all = torch.cat([z, extra])  # the views' embeddings, then the extra negatives
    sample_labels = list(range(batch)) if labels is None else labels.tolist()
    label_of = [sample_labels[a % batch] for a in range(len(z))]
    if negative_labels is not None:
        label_of += negative_labels.tolist()
    else:
        label_of += [None] * len(extra)  # no extra negative is anyone's positive
    losses = []
    for a in range(batch if anchors == "first" else len(z)):
        others = [b for b in range(len(z_all)) if b != a]
        positives = [b for b in others if label_of[b] == label_of[a]]
        negatives_of_a = [b for b in others if b not in positives]
        logits = z[a] @ z_all[negatives_of_a if decoupled else others].T / temperature
        positive_logits = z[a] @ z_all[positives].T / temperature
        if decoupled and not negatives_of_a:
            losses.append(positive_logits.sum() * 0.0)
            continue
        losses.append(torch.logsumexp(logits, dim=0) - positive_logits.mean())
    loss = torch.stack(losses)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.view(num_views, batch) if anchors == "all" else loss


def simclr_cross_entropy(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent as usually written: one masked (2B, 2B) matrix and F.cross_entropy."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    targets = torch.arange(len(z)).roll(len(z1))  # (v, i)'s positive is (1 - v, i)
    return F.cross_entropy(logits, targets)


def supcon_authors(
    features: Tensor, labels: Tensor, temperature: float, contrast_mode: str
) -> Tensor:
    """SupCon's loss as in its authors' code, ``base_temperature = temperature``.

    ``features`` is (B, V, D), normalised; the logits are shifted by their row
    maximum, the self-contrast cases masked out, ``log_prob`` averaged over the
    positives.
    """
    batch, num_views, _ = features.shape
    mask = (labels.view(-1, 1) == labels.view(1, -1)).double()  # (B, B)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # (V * B, D)
    anchor, anchor_count = (features[:, 0], 1) if contrast_mode == "one" else (contrast, num_views)
    logits = anchor @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(anchor_count, num_views)
    logits_mask = torch.ones_like(mask)
    logits_mask[torch.arange(batch * anchor_count), torch.arange(batch * anchor_count)] = 0
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-mean_log_prob_pos).mean()


def make_views(
    num_views: int, batch: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """(V, B, D) views: noisy copies of B samples, so positives are closer than negatives."""
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(num_views, batch, dim, generator=generator, dtype=torch.float64)
    return (samples + 0.7 * noise).to(dtype).requires_grad_()


def upstream_for(loss: Tensor, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=generator, dtype=loss.dtype) + 0.5


def labels_for(kind: str, batch: int) -> Tensor | None:
    if kind == "none":
        return None
    if kind == "distinct":
        return torch.randperm(batch, generator=torch.Generator().manual_seed(3)) + 10
    return torch.arange(batch) % 3  # repeats


def check_against_reference(
    views: Tensor,
    labels: Tensor | None,
    *,
    reduction: str,
    path: str,
    anchors: str = "all",
    normalize: bool = True,
    temperature: float = 0.2,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> None:
    """Loss and the views' gradient (random upstream for 'none') against `reference_nt_xent`."""
    num_views, batch, _ = views.shape
    anchor_rows = batch if anchors == "first" else num_views * batch
    options: dict[str, Any] = {"anchors": anchors, "normalize": normalize}
    loss = nt_xent(
        views,
        labels,
        temperature,
        reduction,
        chunk_size=chunk_size_of(path, anchor_rows),
        **options,
    )
    copy = views.detach().double().requires_grad_()
    expected = reference_nt_xent(copy, labels, temperature, reduction, **options)
    assert_close(loss, expected, rtol=rtol, atol=atol, name="loss")
    upstream = upstream_for(expected)
    (grad,) = torch.autograd.grad(loss, views, grad_outputs=upstream.to(loss.dtype))
    (expected_grad,) = torch.autograd.grad(expected, copy, grad_outputs=upstream)
    scale = max(1.0, float(expected_grad.abs().max()))
    assert_close(grad, expected_grad, rtol=rtol, atol=atol, name="gradient", scale=scale)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_kind", ["none", "repeats", "distinct"])
@pytest.mark.parametrize("num_views", [2, 3, 4])
def test_nt_xent_matches_the_formula(
    num_views: int, label_kind: str, reduction: str, path: str
) -> None:
    views = make_views(num_views, 6, 5, seed=num_views)
    check_against_reference(views, labels_for(label_kind, 6), reduction=reduction, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_kind", ["none", "repeats"])
def test_first_view_anchors(label_kind: str, reduction: str, path: str) -> None:
    views = make_views(3, 7, 4, seed=5)
    check_against_reference(
        views, labels_for(label_kind, 7), reduction=reduction, path=path, anchors="first"
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("num_views", "batch", "dim"),
    [(2, 1, 3), (2, 37, 1), (3, 37, 123), (2, 5, 123), (4, 1, 1)],
    ids=lambda value: str(value),
)
def test_odd_shapes(num_views: int, batch: int, dim: int, path: str) -> None:
    # B = 1 with V = 2: one candidate, which is the positive: loss 0.
    views = make_views(num_views, batch, dim, seed=batch + dim)
    check_against_reference(views, None, reduction="none", path=path)
    if (num_views, batch) == (2, 1):
        loss = nt_xent(views, chunk_size=chunk_size_of(path, 2))
        assert_close(loss, torch.zeros(()), rtol=0, atol=1e-12, name="B=1 loss")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_normalisation(reduction: str, path: str) -> None:
    views = make_views(2, 9, 4, seed=7) * 0.5
    check_against_reference(
        views, labels_for("repeats", 9), reduction=reduction, path=path, normalize=False
    )


@pytest.mark.parametrize("block_rows", [1, 2, 5, 6, 11, 12, 13])
def test_block_boundaries(block_rows: int) -> None:
    # V * B = 12 anchors: blocks that split the views, end exactly, or exceed them.
    views = make_views(2, 6, 3, seed=block_rows)
    loss = nt_xent(views, labels_for("repeats", 6), 0.3, "none", chunk_size=block_rows)
    copy = views.detach().requires_grad_()
    expected = reference_nt_xent(copy, labels_for("repeats", 6), 0.3, "none")
    assert_close(loss, expected, rtol=1e-10, atol=1e-12, name="loss")
    upstream = upstream_for(expected)
    (grad,) = torch.autograd.grad(loss, views, upstream)
    (expected_grad,) = torch.autograd.grad(expected, copy, upstream)
    assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12, name="gradient")


@pytest.mark.parametrize("path", PATHS)
def test_sequence_and_tensor_views_agree(path: str) -> None:
    views = make_views(3, 5, 4, seed=9)
    chunk_size = chunk_size_of(path, 15)
    from_tensor = nt_xent(views, chunk_size=chunk_size, reduction="none")
    from_list = nt_xent(list(views.unbind(0)), chunk_size=chunk_size, reduction="none")
    from_tuple = nt_xent(tuple(views.unbind(0)), chunk_size=chunk_size, reduction="none")
    assert torch.equal(from_tensor, from_list)
    assert torch.equal(from_tensor, from_tuple)


@pytest.mark.parametrize("path", PATHS)
def test_equals_simclr_cross_entropy(path: str) -> None:
    # V = 2 without labels: SimCLR's NT-Xent with 2B - 1 candidates per anchor.
    z1, z2 = make_views(2, 8, 6, seed=11).detach().unbind(0)
    loss = nt_xent([z1, z2], temperature=0.5, chunk_size=chunk_size_of(path, 16))
    expected = simclr_cross_entropy(z1, z2, 0.5)
    assert_close(loss, expected, rtol=1e-12, atol=1e-12, name="loss against SimCLR")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_equals_supcon(contrast_mode: str, path: str) -> None:
    views = make_views(3, 9, 5, seed=12).detach()
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 3, 3, 2])
    anchors = "all" if contrast_mode == "all" else "first"
    loss = nt_xent(
        views, labels, 0.1, anchors=anchors, chunk_size=chunk_size_of(path, 27 if anchors else 9)
    )
    features = F.normalize(views, dim=2).transpose(0, 1)  # (B, V, D)
    expected = supcon_authors(features, labels, 0.1, contrast_mode)
    assert_close(
        loss, expected, rtol=1e-12, atol=1e-12, name=f"loss against SupCon {contrast_mode}"
    )


def test_differs_from_symmetric_info_nce_by_the_same_view_negatives() -> None:
    # CLIP's symmetric InfoNCE has no same-view negatives: with them removed
    # (pushed to -inf) NT-Xent becomes exactly that loss.
    z1, z2 = make_views(2, 6, 4, seed=13).detach().unbind(0)
    clip = info_nce(z1, z2, temperature=0.2, symmetric=True)
    assert not torch.allclose(nt_xent([z1, z2], temperature=0.2), clip)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / 0.2
    same_view = torch.zeros(12, 12, dtype=torch.bool)
    same_view[:6, :6] = same_view[6:, 6:] = True
    logits = logits.masked_fill(same_view, float("-inf"))
    expected = F.cross_entropy(logits, torch.arange(12).roll(6))
    assert_close(clip, expected, rtol=1e-12, atol=1e-12, name="CLIP without same-view negatives")


@pytest.mark.parametrize("path", ["chunk=1", "chunk=7", "dense"])
def test_tensor_temperature_gradcheck(path: str) -> None:
    views = make_views(2, 4, 3, seed=14)
    temperature = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2])

    def function(views: Tensor, temperature: Tensor) -> Tensor:
        return nt_xent(views, labels, temperature, chunk_size=chunk_size_of(path, 8))

    assert torch.autograd.gradcheck(function, (views, temperature))
    loss = function(views, temperature)
    (grad,) = torch.autograd.grad(loss, temperature)
    copy = temperature.detach().requires_grad_()
    (expected,) = torch.autograd.grad(reference_nt_xent(views.detach(), labels, copy, "mean"), copy)
    assert_close(grad, expected, rtol=1e-10, atol=1e-12, name="temperature gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("path", ["dense", "chunk=7"])
def test_half_precision_at_low_temperature(path: str, dtype: torch.dtype, reduction: str) -> None:
    # Against the float32 result of the same (rounded) values.
    half = make_views(2, 16, 32, seed=15, dtype=dtype).detach().requires_grad_()
    upcast = half.detach().float().requires_grad_()
    chunk_size = chunk_size_of(path, 32)
    labels = labels_for("repeats", 16)
    loss = nt_xent(half, labels, 0.01, reduction, chunk_size=chunk_size)
    expected = nt_xent(upcast, labels, 0.01, reduction, chunk_size=chunk_size)
    assert loss.dtype == torch.float32
    upstream = upstream_for(expected)
    (grad,) = torch.autograd.grad(loss, half, upstream)
    (expected_grad,) = torch.autograd.grad(expected, upcast, upstream)
    assert grad.dtype == dtype
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad).all()
    tolerance = {torch.float16: (1e-2, 2e-3), torch.bfloat16: (5e-2, 1e-2)}[dtype]
    scale = 100.0 * (16 if reduction == "sum" else 1)  # logits are at most 1 / t
    assert_close(loss, expected, rtol=tolerance[0], atol=tolerance[1], name="loss", scale=scale)
    grad_scale = float(expected_grad.abs().max())
    assert_close(
        grad, expected_grad, rtol=tolerance[0], atol=tolerance[1], name="grad", scale=grad_scale
    )


def test_float32_engine_against_float64() -> None:
    views = make_views(2, 37, 16, seed=16)
    single = views.detach().float().requires_grad_()
    loss = nt_xent(single, temperature=0.05, chunk_size=8)
    copy = views.detach().requires_grad_()
    expected = reference_nt_xent(copy, None, 0.05, "mean")
    assert_close(loss, expected, rtol=1e-5, atol=1e-6, name="loss", scale=20.0)
    (grad,) = torch.autograd.grad(loss, single)
    (expected_grad,) = torch.autograd.grad(expected, copy)
    scale = float(expected_grad.abs().max())
    assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, name="gradient", scale=scale)


# --- The module -----------------------------------------------------------------


def test_module_takes_views_as_arguments_or_one_tensor() -> None:
    views = make_views(3, 5, 4, seed=17).detach()
    module = NTXent(temperature=0.3, reduction="none")
    expected = nt_xent(views, temperature=0.3, reduction="none")
    assert torch.equal(module(*views.unbind(0)), expected)
    assert torch.equal(module(views), expected)
    labels = torch.tensor([1, 1, 2, 2, 3])
    assert torch.equal(module(views, labels=labels), nt_xent(views, labels, 0.3, "none"))


def test_module_learns_its_temperature() -> None:
    views = make_views(2, 6, 4, seed=18).detach()
    module = NTXent(temperature=0.2, learn_temperature=True, chunk_size=4).double()
    assert module.logit_scale is not None
    module(views).backward()
    assert module.logit_scale.grad is not None
    scale = module.logit_scale.detach().clone().requires_grad_()
    expected = reference_nt_xent(views, None, torch.exp(-scale), "mean")
    (expected_grad,) = torch.autograd.grad(expected, scale)
    assert_close(module.logit_scale.grad, expected_grad, rtol=1e-10, atol=1e-12, name="grad")
    restored = NTXent(learn_temperature=True, chunk_size=4).double()
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored(views), module(views))
    with pytest.raises(AttributeError, match="read-only"):
        module.temperature = 0.5


def test_module_settings_and_repr() -> None:
    module = NTXent(0.5, "sum", anchors="first", chunk_size=3)
    assert repr(module) == (
        "NTXent(temperature=0.5, reduction='sum', anchors='first', normalize=True, "
        "learn_temperature=False, max_logit_scale=100, chunk_size=3, gather_distributed=False, "
        "decoupled=False, false_negative_rate=0, hard_negative_beta=0)"
    )
    module.temperature = 0.25
    views = make_views(2, 4, 3, seed=19).detach()
    assert torch.equal(
        module(views), nt_xent(views, None, 0.25, "sum", anchors="first", chunk_size=3)
    )


# --- Bad input -----------------------------------------------------------------

GOOD = torch.randn(2, 4, 3)

BAD_INPUTS = [
    pytest.param({"views": [GOOD[0]]}, ValueError, "at least 2 views", id="one-view-list"),
    pytest.param({"views": GOOD[:1]}, ValueError, "at least 2 views", id="one-view-tensor"),
    pytest.param({"views": GOOD[0]}, ValueError, "views.*3 dimensions", id="2-D-tensor"),
    pytest.param({"views": GOOD[None]}, ValueError, "views.*3 dimensions", id="4-D-tensor"),
    pytest.param(
        {"views": [GOOD[0], GOOD[1, 0]]}, ValueError, r"views\[1\].*2 dimensions", id="1-D-view"
    ),
    pytest.param(
        {"views": [GOOD[0], GOOD]}, ValueError, r"views\[1\].*2 dimensions", id="3-D-view"
    ),
    pytest.param({"views": [GOOD[0], GOOD[1, :3]]}, ValueError, r"views\[1\].*shape", id="shapes"),
    pytest.param(
        {"views": [GOOD[0], GOOD[1].double()]}, TypeError, r"views\[1\].*dtype", id="dtypes"
    ),
    pytest.param(
        {"views": [GOOD[0], GOOD[1].long()]}, TypeError, r"views\[1\].*floating", id="int-view"
    ),
    pytest.param({"views": "ab"}, TypeError, "views must be", id="string"),
    pytest.param({"views": 3}, TypeError, "views must be", id="number"),
    pytest.param({"views": torch.randn(2, 0, 3)}, ValueError, "at least one sample", id="empty"),
    pytest.param(
        {"labels": torch.arange(3)}, ValueError, r"labels must have shape \(B,\)", id="labels-len"
    ),
    pytest.param(
        {"labels": torch.ones(4)}, TypeError, "labels must be an integer", id="labels-float"
    ),
    pytest.param(
        {"labels": [0, 1, 2, 3]}, TypeError, "labels must be a torch.Tensor", id="labels-list"
    ),
    pytest.param(
        {"anchors": "one"}, ValueError, "anchors must be one of 'all', 'first'", id="anchors"
    ),
    pytest.param({"reduction": "avg"}, ValueError, "reduction must be one of", id="reduction"),
    pytest.param(
        {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0", id="t=0"
    ),
    pytest.param(
        {"temperature": "0.1"}, TypeError, "temperature must be a real number", id="t-str"
    ),
    pytest.param(
        {"chunk_size": 0}, ValueError, "chunk_size must be None or a positive int", id="chunk"
    ),
    pytest.param({"normalize": 1}, TypeError, "normalize must be a bool", id="normalize"),
    pytest.param(
        {"gather_distributed": None}, TypeError, "gather_distributed must be a bool", id="gather"
    ),
]


@pytest.mark.parametrize(("arguments", "error", "message"), BAD_INPUTS)
def test_bad_input_gets_a_clear_error(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    call = {"views": GOOD, **arguments}
    with pytest.raises(error, match=message):
        nt_xent(**call)


def test_views_on_different_devices_get_a_clear_error() -> None:
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"views\[1\].*same device"):
        nt_xent([GOOD[0], meta])


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"reduction": "max"}, ValueError, "reduction"),
        ({"anchors": "none"}, ValueError, "anchors"),
        ({"learn_temperature": "yes"}, TypeError, "learn_temperature"),
        ({"max_logit_scale": 0}, ValueError, "max_logit_scale"),
        ({"chunk_size": -2}, ValueError, "chunk_size"),
    ],
)
def test_module_settings_are_checked(
    settings: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        NTXent(**settings)


# --- Dispatch, memory shape, FLOPs -------------------------------------------------

aten = torch.ops.aten


class MatrixProducts(TorchDispatchMode):
    """Counts the multiply-adds of every matrix product, in place and ``out=`` ones included.

    (`torch.utils.flop_counter.FlopCounterMode` does not see ``addmm_``.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.multiply_adds = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.addmm_):
            a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
            self.multiply_adds += a.shape[0] * a.shape[1] * b.shape[1]
        elif packet in (aten.bmm, aten.baddbmm, aten.baddbmm_):
            a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
            self.multiply_adds += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return func(*args, **(kwargs or {}))


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"dense": 0, "engine": 0}
    dense, apply = functional.dense_nt_xent, LogSumExp.apply

    def dense_spy(*args: Any, **kwargs: Any) -> Tensor:
        counts["dense"] += 1
        return dense(*args, **kwargs)

    def apply_spy(*args: Any) -> Any:
        counts["engine"] += 1
        return apply(*args)

    monkeypatch.setattr(functional, "dense_nt_xent", dense_spy)
    monkeypatch.setattr(LogSumExp, "apply", apply_spy)
    return counts


def test_dispatch_small_problems_take_the_dense_loss(engine_calls: dict[str, int]) -> None:
    nt_xent(make_views(2, 8, 4))
    assert engine_calls == {"dense": 1, "engine": 0}


def test_dispatch_large_problems_take_the_engine(engine_calls: dict[str, int]) -> None:
    views = make_views(2, 300, 8, dtype=torch.float32)
    assert functional.DENSE_MAX_LOGITS < (2 * 300) ** 2
    loss = nt_xent(views)
    assert engine_calls == {"dense": 0, "engine": 1}
    expected = reference_nt_xent(views.detach(), None, 0.1, "mean")
    assert_close(loss, expected, rtol=1e-5, atol=1e-6, name="loss", scale=10.0)


def test_engine_takes_exactly_the_three_products() -> None:
    # Forward + backward of the engine: the logits and the two gradient products
    # of (V B)^2 D multiply-adds each, and no other matrix product.
    num_views, batch, dim = 2, 64, 16
    views = make_views(num_views, batch, dim, dtype=torch.float32)
    with MatrixProducts() as counter:
        nt_xent(views, chunk_size=16).backward()
    anchors = num_views * batch
    assert counter.multiply_adds == 3 * anchors * anchors * dim


def test_engine_block_holds_no_square_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    # Memory O(V B D): no tensor of (V B)^2 elements is allocated (the largest
    # are the chunk_size x V B block and the (V B, D) gradients).
    sizes: list[int] = []
    empty = torch.Tensor.new_empty

    def recording_new_empty(self: Tensor, *shape: Any, **kwargs: Any) -> Tensor:
        result = empty(self, *shape, **kwargs)
        sizes.append(result.numel())
        return result

    monkeypatch.setattr(torch.Tensor, "new_empty", recording_new_empty)
    views = make_views(2, 200, 8, dtype=torch.float32)
    nt_xent(views, chunk_size=10).backward()
    assert sizes, "the engine allocated nothing through new_empty"
    assert max(sizes) <= 10 * 400 + 400 * 8 * 2


# --- Frozen key segments -----------------------------------------------------------


def test_a_frozen_key_segment_costs_no_gradient_product() -> None:
    # In-batch candidates plus M frozen negatives: the only difference between
    # trainable and frozen negatives is the (M, D) gradient product, B * M * D
    # multiply-adds.
    batch, negatives, dim = 32, 48, 8
    generator = torch.Generator().manual_seed(20)
    query, positive_key = (torch.randn(batch, dim, generator=generator) for _ in range(2))
    bank = torch.randn(negatives, dim, generator=generator)

    def flops(bank_needs_grad: bool) -> int:
        inputs = [query.clone().requires_grad_(), positive_key.clone().requires_grad_()]
        keys = bank.clone().requires_grad_(bank_needs_grad)
        with MatrixProducts() as counter:
            loss = info_nce(*inputs, keys, in_batch_negatives=True, chunk_size=8)
            loss.backward()
        assert (keys.grad is not None) == bank_needs_grad
        return counter.multiply_adds

    # The three products over B + M candidates, less (M, D)'s when frozen.
    assert flops(True) == 3 * batch * (batch + negatives) * dim
    assert flops(False) == flops(True) - batch * negatives * dim


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_frozen_queries_cost_no_row_gradient_product(symmetric: bool, reduction: str) -> None:
    # A frozen query tower: the keys' gradient needs one product less.
    batch, dim = 24, 8
    generator = torch.Generator().manual_seed(22)
    query, positive_key = (torch.randn(batch, dim, generator=generator) for _ in range(2))

    def products(query_needs_grad: bool) -> int:
        q = query.clone().requires_grad_(query_needs_grad)
        p = positive_key.clone().requires_grad_()
        with MatrixProducts() as counter:
            loss = info_nce(q, p, symmetric=symmetric, reduction=reduction, chunk_size=8)
            loss.backward(torch.ones_like(loss))
        assert (q.grad is not None) == query_needs_grad
        return counter.multiply_adds

    # Gradients built in forward (one-way, scalar): 3 products; otherwise a
    # statistics pass, then a gradient pass of 3.
    passes = 4 if symmetric or reduction == "none" else 3
    assert products(True) == passes * batch * batch * dim
    assert products(False) == products(True) - batch * batch * dim


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_segment_gradients_are_still_exact(reduction: str) -> None:
    generator = torch.Generator().manual_seed(21)
    query, positive_key = (
        torch.randn(9, 4, generator=generator, dtype=torch.float64).requires_grad_()
        for _ in range(2)
    )
    bank = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    options: dict[str, Any] = {"in_batch_negatives": True, "reduction": reduction}
    loss = info_nce(query, positive_key, bank, chunk_size=2, **options)
    expected = info_nce(query, positive_key, bank.clone().requires_grad_(), **options)
    upstream = upstream_for(expected)
    grads = torch.autograd.grad(loss, (query, positive_key), upstream)
    expected_grads = torch.autograd.grad(expected, (query, positive_key), upstream)
    assert_close(loss, expected, rtol=1e-12, atol=1e-12, name="loss")
    for name, got, want in zip(("query", "positive_key"), grads, expected_grads, strict=True):
        assert_close(got, want, rtol=1e-10, atol=1e-12, name=name)


# --- Extra negatives (a queue) ----------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("anchors", ["all", "first"])
@pytest.mark.parametrize("matches", ["no labels", "some", "none", "all"])
def test_extra_negatives_match_the_formula(
    matches: str, anchors: str, decoupled: bool, reduction: str, path: str
) -> None:
    # Every anchor's candidates are the other embeddings and 11 negatives;
    # with negative_labels, a negative with the anchor's label is a positive.
    views = make_views(3, 5, 4, seed=11)
    generator = torch.Generator().manual_seed(12)
    negatives = torch.randn(11, 4, generator=generator, dtype=torch.float64).requires_grad_()
    labels = negative_labels = None
    if matches != "no labels":
        labels = torch.arange(5) % 2
        negative_labels = torch.randint(0, 3, (11,), generator=generator)
        if matches == "none":
            negative_labels = negative_labels + 10
        elif matches == "all":
            labels, negative_labels = labels * 0, negative_labels * 0
    anchor_rows = 5 if anchors == "first" else 15
    loss = nt_xent(
        views,
        labels,
        0.3,
        reduction,  # type: ignore[arg-type]
        anchors=anchors,  # type: ignore[arg-type]
        chunk_size=chunk_size_of(path, anchor_rows),
        decoupled=decoupled,
        negative_keys=negatives,
        negative_labels=negative_labels,
    )
    expected = reference_nt_xent(
        views,
        labels,
        0.3,
        reduction,
        anchors=anchors,
        negatives=negatives,
        negative_labels=negative_labels,
        decoupled=decoupled,
    )
    assert_close(loss, expected, rtol=1e-10, atol=1e-12, name="loss")
    upstream = upstream_for(expected)
    grads = torch.autograd.grad(loss, (views, negatives), grad_outputs=upstream)
    wanted = torch.autograd.grad(expected, (views, negatives), grad_outputs=upstream)
    for got, want, name in zip(grads, wanted, ("views", "negatives"), strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-11, name=f"{name} gradient")


def test_extra_negatives_errors() -> None:
    views = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"<negative_keys> must have shape \(M, D\) = \(M, 4\)"):
        nt_xent(views, negative_keys=torch.randn(5, 3))
    with pytest.raises(
        TypeError, match=r"<negative_keys> must have the same dtype as <views> \(torch.float32\)"
    ):
        nt_xent(views, negative_keys=torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="negative_labels need labels"):
        nt_xent(views, negative_keys=torch.randn(5, 4), negative_labels=torch.zeros(5).long())
    with pytest.raises(ValueError, match="got negative_keys=None"):
        nt_xent(views, torch.zeros(3).long(), negative_labels=torch.zeros(5).long())
