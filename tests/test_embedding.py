"""The embedding-model recipes: shared hard negatives, directions, hardness weighting.

Every path (the dense loss, the engine's blocks, its column tiles) against a
float64 reference written here from the definitions, row by row, sharing no
code with the package; and against sentence-transformers' own
`MultipleNegativesRankingLoss` where its options coincide.

* ``negative_mode='shared'``: negatives (B, M, D); every query is scored
  against all B * M of them (and, by default, the B positive keys); query
  i's own are ``negative_keys[i]``; ``negative_mask`` (B, M) marks padding,
  absent for every query.
* ``hardness_mode``/``hardness_strength`` alpha: the query-to-key logit of a
  selected negative is ``s / t + alpha * stopgrad(s)``. "Hard" negatives are
  the query's own explicit ones (paired, shared; every unpaired one), the
  "in-batch" ones the other candidates; the positive is never raised.
* ``directions`` with ``partition='joint'``: pair i's loss is one
  cross-entropy over its rows in every direction (query to key, key to
  query, query to query, key to key), its target s(q_i, k_i).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from reference import assert_close
from tiling import TILES_PATH, tiles_on_path  # noqa: F401  (autouse: the tiles path)
from torch import Tensor

from info_nce import InfoNCE, info_nce

pytestmark = pytest.mark.usefixtures("one_thread")

B, M, D = 37, 3, 9
TEMPERATURE = 0.07
PATHS = ("dense", "engine", TILES_PATH)
MODES = ("in-batch", "unpaired", "paired", "shared")
HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def reference(
    query: Tensor,
    key: Tensor,
    negatives: Tensor | None,
    temperature: Tensor | float,
    *,
    mode: str,
    reduction: str = "mean",
    in_batch: bool = True,
    mask: Tensor | None = None,
    hardness_mode: str | None = None,
    strength: float = 0.0,
    symmetric: bool = False,
    normalize: bool = True,
    directions: tuple[str, ...] = ("query_to_key",),
    margin: float | None = None,
    relative: bool = False,
    guide: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """The loss in float64, one pair at a time, from the definitions above.

    Pair i's candidates are listed group by group with their similarity to
    the row's anchor, whether hardness raises them, their guide cosine with
    the anchor and whether they are protected from the filter (the pair's
    own positive); several ``directions`` make their joint partition.
    """
    unit = _unit if normalize else (lambda x: x)
    q, k = unit(query.double()), unit(key.double())
    n = None if negatives is None else unit(negatives.double())
    t = temperature.double() if isinstance(temperature, Tensor) else temperature
    raise_hard = hardness_mode in ("hard_negatives", "all_negatives")
    raise_in_batch = hardness_mode in ("in_batch_negatives", "all_negatives")
    # The guide: given, or the model's own embeddings (their cosines), detached.
    found = guide or (query, key, *(() if negatives is None else (negatives,)))
    gq, gk, *gn_list = (_unit(x.detach().double()) for x in found)
    gn = gn_list[0] if gn_list else None
    batch = len(q)
    losses = []
    for i in range(batch):
        others = [j for j in range(batch) if j != i]
        # Groups of (anchor, guide anchor, candidates, their guides, raised, protected).
        groups: list[tuple[Tensor, Tensor, Tensor, Tensor, bool, Tensor | None]] = []

        def group(
            anchor: Tensor,
            guide_anchor: Tensor,
            x: Tensor,
            g: Tensor,
            raised: bool = False,
            protected: Tensor | None = None,
            groups: list[tuple[Tensor, Tensor, Tensor, Tensor, bool, Tensor | None]] = groups,
        ) -> None:
            groups.append((anchor, guide_anchor, x, g, raised, protected))

        own = torch.zeros(batch, dtype=torch.bool)
        own[i] = True
        group(q[i], gq[i], k[i : i + 1], gk[i : i + 1], protected=torch.tensor([True]))
        if in_batch:
            group(q[i], gq[i], k[others], gk[others], raise_in_batch)
        if n is not None and gn is not None and mode == "unpaired":
            group(q[i], gq[i], n, gn, raise_hard)
        valid = torch.ones(batch, 1 if n is None else n.shape[1], dtype=torch.bool)
        if mask is not None:
            valid = mask
        if n is not None and gn is not None and mode in ("paired", "shared"):
            group(q[i], gq[i], n[i][valid[i]], gn[i][valid[i]], raise_hard)
        if n is not None and gn is not None and mode == "shared":
            group(q[i], gq[i], n[others][valid[others]], gn[others][valid[others]], raise_in_batch)
        if "key_to_query" in directions:  # k_i against all queries, q_i kept
            group(k[i], gk[i], q, gq, protected=own)
        if "query_to_query" in directions:  # q_i against the other queries
            group(q[i], gq[i], q[others], gq[others])
        if "key_to_key" in directions:  # k_i against the keys among q_i's, not pair i's
            if in_batch:
                group(k[i], gk[i], k[others], gk[others])
            if n is not None and gn is not None and mode == "unpaired":
                group(k[i], gk[i], n, gn)
            if n is not None and gn is not None and mode == "shared":
                group(k[i], gk[i], n[others][valid[others]], gn[others][valid[others]])
        positive_guide = gq[i] @ gk[i]
        threshold = positive_guide - (positive_guide.abs() if relative else 1.0) * (margin or 0.0)
        logits = []
        for anchor, guide_anchor, x, g, raised, protected in groups:
            s = x @ anchor  # (C,)
            logit = s / t + strength * s.detach() * float(raised)
            if margin is not None:
                removed = g @ guide_anchor > threshold
                if protected is not None:
                    removed = removed & ~protected
                logit = logit[~removed]
            logits.append(logit)
        loss = torch.logsumexp(torch.cat(logits), 0) - (q[i] @ k[i]) / t
        if symmetric:  # key i against all queries, query i its positive
            kept = torch.ones(batch, dtype=torch.bool)
            if margin is not None:
                kept = ~(gq @ gk[i] > threshold) | own
            key_logits = (q @ k[i]) / t
            loss = (loss + torch.logsumexp(key_logits[kept], 0) - key_logits[i]) / 2
        losses.append(loss)
    result = torch.stack(losses)
    if reduction == "mean":
        return result.mean()
    return result.sum() if reduction == "sum" else result


def make_inputs(
    mode: str, batch: int = B, dim: int = D, negatives: int = M, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Float64 query, positive key, negatives of ``mode``, and a (B, M) mask with padding.

    The keys lie near their queries, so that the positives are not lost in
    the noise and hardness weighting has hard negatives to act on.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query = randn(batch, dim)
    key = query + 0.8 * randn(batch, dim)
    shapes = {"unpaired": (negatives, dim), "paired": (batch, negatives, dim)}
    shapes["shared"] = shapes["paired"]
    negative_keys = None
    if mode in shapes:
        negative_keys = randn(*shapes[mode])
        if mode != "unpaired":  # hard: near their own query
            negative_keys = negative_keys + query.unsqueeze(1)
    mask = torch.rand(batch, negatives, generator=generator) > 0.3
    mask[0] = False  # a query without negatives
    return query, key, negative_keys, mask


def chunk_size(path: str) -> int | None:
    return 5 if path == "engine" else None  # 37 rows: 7 blocks of 5 and one of 2


def grads_of(loss: Tensor, inputs: list[Tensor], seed: int = 1) -> list[Tensor | None]:
    """Gradients for a random upstream gradient (one weight per row for 'none')."""
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed))
    upstream = upstream.to(loss.dtype) + 0.5
    return list(torch.autograd.grad(loss, inputs, upstream, allow_unused=True))


def reference_options(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """`reference`'s keywords for the loss that `info_nce`'s ``options`` ask for.

    In-batch candidates: as asked, else info-nce-pytorch's default (none with
    unpaired or paired negatives) or shared mode's (all positive keys).
    """
    return {
        "in_batch": options.get("in_batch_negatives", mode in ("in-batch", "shared")),
        "reduction": options.get("reduction", "mean"),
        "hardness_mode": options.get("hardness_mode"),
        "strength": options.get("hardness_strength", 0.0),
        "symmetric": options.get("symmetric", False),
        "normalize": options.get("normalize", True),
        "directions": options.get("directions", ("query_to_key",)),
        "margin": options.get("false_negative_margin"),
        "relative": options.get("margin_strategy") == "relative",
        "guide": options.get("guide"),
    }


def assert_matches_reference(
    dtype: torch.dtype, path: str, mode: str, options: dict[str, Any]
) -> None:
    """The loss and every gradient (query, key, negatives, temperature) on ``path``.

    ``options`` are `info_nce`'s, plus ``mask``: use the inputs' padding mask.
    """
    query, key, negatives, mask = make_inputs(mode)
    temperature = torch.tensor(TEMPERATURE, dtype=torch.float64)
    leaves = [x for x in (query, key, negatives, temperature) if x is not None]
    inputs = [x.to(dtype).requires_grad_() for x in leaves]
    q, k, *rest = inputs
    n = rest[0] if negatives is not None else None
    t = rest[-1]
    options = dict(options)
    use_mask = mask if options.pop("mask", False) else None
    negative_mode = {"in-batch": "unpaired"}.get(mode, mode)
    loss = info_nce(
        q,
        k,
        n,
        t,
        negative_mode=negative_mode,
        negative_mask=use_mask,
        chunk_size=chunk_size(path),
        **options,
    )
    expected_inputs = [x.detach().double().requires_grad_() for x in inputs]
    eq, ek, *erest = expected_inputs
    en = erest[0] if negatives is not None else None
    expected = reference(
        eq, ek, en, erest[-1], mode=mode, mask=use_mask, **reference_options(mode, options)
    )
    assert loss.shape == expected.shape
    grads, expected_grads = grads_of(loss, inputs), grads_of(expected, expected_inputs)
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)
    assert_close(loss.double(), expected, rtol=rtol, atol=atol, name="loss")
    names = ["query", "positive_key", "negative_keys", "temperature"][: len(inputs)]
    if negatives is None:
        names = ["query", "positive_key", "temperature"]
    for got, want, name in zip(grads, expected_grads, names, strict=True):
        assert got is not None, name
        assert want is not None, name
        assert_close(got.double(), want, rtol=rtol, atol=atol, name=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("hardness_mode", HARDNESS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
def test_matches_reference(path: str, mode: str, hardness_mode: str | None, reduction: str) -> None:
    strength = 0.0 if hardness_mode is None else 5.0
    options: dict[str, Any] = {
        "hardness_mode": hardness_mode,
        "hardness_strength": strength,
        "reduction": reduction,
    }
    if mode == "paired":
        options["in_batch_negatives"] = True
    assert_matches_reference(torch.float64, path, mode, options)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("shared", {"mask": True}),
        ("shared", {"mask": True, "hardness_mode": "all_negatives", "hardness_strength": 9.0}),
        (
            "shared",
            {
                "in_batch_negatives": False,
                "hardness_mode": "all_negatives",
                "hardness_strength": 2.0,
            },
        ),
        (
            "shared",
            {"symmetric": True, "hardness_mode": "in_batch_negatives", "hardness_strength": 3.0},
        ),
        (
            "shared",
            {"symmetric": True, "hardness_mode": "hard_negatives", "hardness_strength": 3.0},
        ),
        (
            "shared",
            {"normalize": False, "hardness_mode": "all_negatives", "hardness_strength": 0.5},
        ),
        ("paired", {"mask": True, "hardness_mode": "hard_negatives", "hardness_strength": 4.0}),
        (
            "unpaired",
            {
                "in_batch_negatives": True,
                "hardness_mode": "all_negatives",
                "hardness_strength": 4.0,
            },
        ),
        (
            "in-batch",
            {"symmetric": True, "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0},
        ),
    ],
)
def test_options_match_reference(path: str, mode: str, options: dict[str, Any]) -> None:
    assert_matches_reference(torch.float64, path, mode, {**options, "reduction": "none"})


@pytest.mark.parametrize("path", ["dense", "engine"])
@pytest.mark.parametrize("mode", ["shared", "paired"])
def test_float32_matches_reference(path: str, mode: str) -> None:
    options = {"mask": True, "hardness_mode": "all_negatives", "hardness_strength": 5.0}
    if mode == "paired":
        options["in_batch_negatives"] = True
    assert_matches_reference(torch.float32, path, mode, options)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("batch", "dim", "negatives"), [(1, 1, 1), (1, 7, 4), (6, 1, 2), (17, 123, 5)]
)
def test_odd_shapes(path: str, batch: int, dim: int, negatives: int) -> None:
    query, key, negative_keys, mask = make_inputs("shared", batch, dim, negatives, seed=3)
    assert negative_keys is not None
    inputs = [x.requires_grad_() for x in (query, key, negative_keys)]
    options = dict(hardness_mode="all_negatives", hardness_strength=5.0)
    loss = info_nce(
        *inputs,
        temperature=0.1,
        negative_mode="shared",
        negative_mask=mask,
        reduction="none",
        chunk_size=chunk_size(path),
        **options,
    )
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    expected = reference(
        *leaves,
        0.1,
        mode="shared",
        mask=mask,
        reduction="none",
        hardness_mode="all_negatives",
        strength=5.0,
    )
    assert_close(loss, expected, rtol=1e-10, atol=1e-10, name="loss")
    expected_grads = grads_of(expected, leaves)
    for got, want, x in zip(grads_of(loss, inputs), expected_grads, inputs, strict=True):
        assert got is not None
        want = torch.zeros_like(x) if want is None else want  # all padding: in no logit
        assert_close(got, want, rtol=1e-10, atol=1e-10, name="gradient")


@pytest.mark.parametrize("block_rows", [1, 2, 3, 4, 7, 8])
def test_block_boundaries(block_rows: int) -> None:
    # Each row's band of own negatives falls across blocks and chunks in every way.
    query, key, negative_keys, mask = make_inputs("shared", 8, 5, 3, seed=4)
    options: dict[str, Any] = dict(
        temperature=0.2, negative_mode="shared", negative_mask=mask, reduction="sum"
    )
    options.update(hardness_mode="all_negatives", hardness_strength=2.0)
    inputs = [x.requires_grad_() for x in (query, key, negative_keys)]
    loss = info_nce(*inputs, chunk_size=block_rows, **options)
    dense = info_nce(*inputs, **options)
    assert_close(loss, dense, rtol=1e-12, atol=1e-12, name="loss")
    for got, want in zip(grads_of(loss, inputs), grads_of(dense, inputs), strict=True):
        assert got is not None
        assert want is not None
        assert_close(got, want, rtol=1e-12, atol=1e-12, name="gradient")


@pytest.mark.parametrize("path", PATHS)
def test_hardness_with_a_frozen_queue(path: str) -> None:
    # Unpaired negatives without gradient (a queue): the tiled walk builds
    # statistics and gradients in one pass, raising the queue's logits there.
    query, key, _, _ = make_inputs("in-batch", seed=5)
    queue = torch.randn(23, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    inputs = [query.requires_grad_(), key.requires_grad_()]
    options = dict(hardness_mode="hard_negatives", hardness_strength=4.0)
    loss = info_nce(*inputs, queue, temperature=0.1, chunk_size=chunk_size(path), **options)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    expected = reference(
        *leaves,
        queue,
        0.1,
        mode="unpaired",
        in_batch=False,
        hardness_mode="hard_negatives",
        strength=4.0,
    )
    assert_close(loss, expected, rtol=1e-10, atol=1e-10, name="loss")
    for got, want in zip(grads_of(loss, inputs), grads_of(expected, leaves), strict=True):
        assert got is not None
        assert want is not None
        assert_close(got, want, rtol=1e-10, atol=1e-10, name="gradient")


def test_zero_strength_is_the_plain_loss() -> None:
    query, key, negatives, mask = make_inputs("shared")
    for hardness_mode in HARDNESS[1:]:
        loss = info_nce(
            query,
            key,
            negatives,
            negative_mode="shared",
            negative_mask=mask,
            hardness_mode=hardness_mode,
        )
        plain = info_nce(query, key, negatives, negative_mode="shared", negative_mask=mask)
        assert torch.equal(loss, plain)


def test_shared_mode_is_unpaired_negatives_without_padding() -> None:
    # Without hardness, who owns a shared negative does not matter: the loss is
    # unpaired mode's over the flattened negatives, with in-batch candidates.
    query, key, negatives, _ = make_inputs("shared")
    assert negatives is not None
    for chunk in (None, 4):
        shared = info_nce(query, key, negatives, negative_mode="shared", chunk_size=chunk)
        unpaired = info_nce(
            query, key, negatives.flatten(0, 1), in_batch_negatives=True, chunk_size=chunk
        )
        assert_close(shared, unpaired, rtol=1e-12, atol=1e-12, name="loss")


@pytest.mark.parametrize("recipe", ["shared", "gte", "gte-guide"])
def test_gradcheck(recipe: str) -> None:
    # The engine's Functions with the band exclusion, the key mask, partner
    # rows and the guide's filter. Not with hardness weighting: its gradient
    # is by definition not the derivative of the loss (the added term's is
    # stopped), which finite differences would see; the reference's autograd
    # checks it above.
    query, key, negatives, mask = make_inputs("shared", 6, 4, 2, seed=7)
    options: dict[str, Any] = {}
    if recipe != "shared":
        options["directions"] = GTE
    if recipe == "gte-guide":
        options.update(false_negative_margin=0.0, guide=guide_of(query, key, negatives))
    inputs = tuple(x.requires_grad_() for x in (query, key, negatives))
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def loss(q: Tensor, k: Tensor, n: Tensor, t: Tensor) -> Tensor:
        return info_nce(
            q,
            k,
            n,
            t,
            negative_mode="shared",
            negative_mask=mask,
            reduction="none",
            chunk_size=4,
            **options,
        )

    assert torch.autograd.gradcheck(loss, (*inputs, temperature))


def test_module_takes_the_options() -> None:
    query, key, negatives, mask = make_inputs("shared")
    module = InfoNCE(
        0.05, negative_mode="shared", hardness_mode="all_negatives", hardness_strength=5.0
    )
    expected = info_nce(
        query,
        key,
        negatives,
        0.05,
        negative_mode="shared",
        negative_mask=mask,
        hardness_mode="all_negatives",
        hardness_strength=5.0,
    )
    assert torch.equal(module(query, key, negatives, negative_mask=mask), expected)


DIRECTION_SETS = [
    ("query_to_key", *others)
    for count in range(4)
    for others in itertools.combinations(("key_to_query", "query_to_query", "key_to_key"), count)
]
GTE = ("query_to_key", "key_to_query", "query_to_query", "key_to_key")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("directions", DIRECTION_SETS, ids="+".join)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["dense", "engine"])
def test_joint_directions_match_reference(
    path: str, mode: str, directions: tuple[str, ...], reduction: str
) -> None:
    options: dict[str, Any] = {"directions": directions, "reduction": reduction}
    if mode == "paired":
        options["in_batch_negatives"] = True
    if mode in ("paired", "shared"):
        options["mask"] = True
    assert_matches_reference(torch.float64, path, mode, options)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("shared", {"hardness_mode": "all_negatives", "hardness_strength": 5.0}),
        ("shared", {"in_batch_negatives": False}),
        ("paired", {}),
        ("unpaired", {"in_batch_negatives": True, "normalize": False}),
        ("in-batch", {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}),
    ],
)
def test_gte_options_match_reference(path: str, mode: str, options: dict[str, Any]) -> None:
    mask = mode in ("paired", "shared")
    options = {**options, "directions": GTE, "reduction": "sum", "mask": mask}
    assert_matches_reference(torch.float64, path, mode, options)


@pytest.mark.parametrize("path", ["dense", "engine"])
def test_float32_joint_matches_reference(path: str) -> None:
    options = {"directions": GTE, "mask": True}
    assert_matches_reference(torch.float32, path, "shared", options)


@pytest.mark.parametrize("block_rows", [1, 3, 4, 8])
def test_joint_block_boundaries(block_rows: int) -> None:
    query, key, negative_keys, mask = make_inputs("shared", 8, 5, 3, seed=8)
    options: dict[str, Any] = dict(
        temperature=0.2,
        negative_mode="shared",
        negative_mask=mask,
        reduction="none",
        directions=GTE,
        hardness_mode="all_negatives",
        hardness_strength=2.0,
    )
    inputs = [x.requires_grad_() for x in (query, key, negative_keys)]
    loss = info_nce(*inputs, chunk_size=block_rows, **options)
    dense = info_nce(*inputs, **options)
    assert_close(loss, dense, rtol=1e-12, atol=1e-12, name="loss")
    for got, want in zip(grads_of(loss, inputs), grads_of(dense, inputs), strict=True):
        assert got is not None
        assert want is not None
        assert_close(got, want, rtol=1e-12, atol=1e-12, name="gradient")


def test_per_direction_is_the_symmetric_loss() -> None:
    query, key, negatives, mask = make_inputs("shared")
    both = ("query_to_key", "key_to_query")
    for chunk in (None, 5):
        options: dict[str, Any] = dict(negative_mode="shared", negative_mask=mask, chunk_size=chunk)
        per_direction = info_nce(
            query, key, negatives, directions=both, partition="per_direction", **options
        )
        symmetric = info_nce(query, key, negatives, symmetric=True, **options)
        assert torch.equal(per_direction, symmetric)
        consistent = info_nce(query, key, negatives, symmetric=True, directions=both, **options)
        assert torch.equal(consistent, symmetric)
        one = info_nce(
            query, key, negatives, directions=("query_to_key",), partition="joint", **options
        )
        assert torch.equal(one, info_nce(query, key, negatives, **options))


def test_module_takes_the_directions() -> None:
    query, key, negatives, mask = make_inputs("shared")
    module = InfoNCE(0.05, negative_mode="shared", directions=GTE)
    expected = info_nce(
        query, key, negatives, 0.05, negative_mode="shared", negative_mask=mask, directions=GTE
    )
    assert torch.equal(module(query, key, negatives, negative_mask=mask), expected)
    assert "directions=" in repr(module)


# sentence-transformers' MultipleNegativesRankingLoss, its own code on given embeddings.
st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


ST_NAMES = {
    "query_to_key": "query_to_doc",
    "key_to_query": "doc_to_query",
    "query_to_query": "query_to_query",
    "key_to_key": "doc_to_doc",
}
ST_SETTINGS = [(directions, "joint") for directions in DIRECTION_SETS] + [
    (("query_to_key",), "per_direction"),
    (("query_to_key", "key_to_query"), "per_direction"),
]


@pytest.mark.parametrize("path", ["dense", "engine"])
@pytest.mark.parametrize("hardness_mode", HARDNESS)
@pytest.mark.parametrize("columns", [2, 3, 5])  # pairs, triplets, 5-tuples
@pytest.mark.parametrize(
    ("directions", "partition"), ST_SETTINGS, ids=[f"{'+'.join(d)}-{p}" for d, p in ST_SETTINGS]
)
def test_matches_sentence_transformers(
    path: str,
    hardness_mode: str | None,
    columns: int,
    directions: tuple[str, ...],
    partition: str,
) -> None:
    # Their n-tuple columns 2.. are our shared negatives, (B, M, D) stacked.
    query, key, negatives, _ = make_inputs("shared", negatives=columns - 2)
    assert negatives is not None
    strength = 0.0 if hardness_mode is None else 5.0
    inputs = [x.float().requires_grad_() for x in (query, key, negatives)]
    theirs_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    mnrl = st_losses.MultipleNegativesRankingLoss(
        model=None,
        scale=1 / TEMPERATURE,
        directions=tuple(ST_NAMES[d] for d in directions),
        partition_mode=partition,
        hardness_mode=hardness_mode,
        hardness_strength=strength,
    )
    if columns == 2:  # pairs: no negatives
        inputs, theirs_inputs = inputs[:2], theirs_inputs[:2]
    q, k, *n = theirs_inputs
    embeddings = [q, k, *(n[0].unbind(1) if n else ())]
    theirs = mnrl.compute_loss_from_embeddings(embeddings, labels=None)
    ours = info_nce(
        *inputs,
        temperature=TEMPERATURE,
        negative_mode="shared",
        chunk_size=chunk_size(path),
        hardness_mode=hardness_mode,
        hardness_strength=strength,
        directions=directions,
        partition=partition,
    )
    assert_close(ours, theirs, rtol=2e-6, atol=2e-6, name="loss")
    ours_grads = torch.autograd.grad(ours, inputs)
    theirs_grads = torch.autograd.grad(theirs, theirs_inputs)
    for got, want in zip(ours_grads, theirs_grads, strict=True):
        assert_close(got, want, rtol=2e-5, atol=2e-6, name="gradient")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"hardness_mode": "hard"}, ValueError, "hardness_mode must be None or one of"),
        (
            {"hardness_mode": "all_negatives", "hardness_strength": -1.0},
            ValueError,
            ">= 0, got -1.0",
        ),
        (
            {"hardness_mode": "all_negatives", "hardness_strength": float("nan")},
            ValueError,
            "finite",
        ),
        (
            {"hardness_mode": "all_negatives", "hardness_strength": "5"},
            TypeError,
            "hardness_strength",
        ),
        ({"hardness_strength": 5.0}, ValueError, "needs a hardness_mode"),
        (
            {"hardness_mode": "all_negatives", "hardness_strength": 1.0, "labels": True},
            ValueError,
            "does not combine with labels",
        ),
        (
            {"hardness_mode": "all_negatives", "hardness_strength": 1.0, "decoupled": True},
            ValueError,
            "InfoNCE objective only",
        ),
        ({"negative_mode": "shared", "decoupled": True}, ValueError, "negative_mode='shared'"),
        (
            {"negative_mode": "shared", "false_negative_rate": 0.1},
            ValueError,
            "negative_mode='shared'",
        ),
        ({"negative_mode": "shared", "flat": True}, ValueError, "if <negative_mode> == 'shared'"),
        ({"negative_mode": "shared", "rows": 5}, ValueError, "same number of samples"),
        ({"negative_mode": "shared", "mask_shape": (37, 2)}, ValueError, "negative_mask must have"),
        (
            {"negative_mode": "unpaired", "flat": True, "mask_shape": (37, 3)},
            ValueError,
            "paired or shared",
        ),
        ({"directions": ("key_to_query",)}, ValueError, "must contain 'query_to_key'"),
        ({"directions": ("query_to_key", "doc_to_doc")}, ValueError, "got 'doc_to_doc'"),
        ({"directions": "query_to_key"}, TypeError, "directions must be None or a tuple"),
        ({"directions": ("query_to_key", "query_to_key")}, ValueError, "must not repeat"),
        ({"partition": "both"}, ValueError, "partition must be None or one of"),
        (
            {"directions": ("query_to_key", "query_to_query"), "partition": "per_direction"},
            ValueError,
            "use partition='joint'",
        ),
        (
            {"directions": ("query_to_key", "key_to_key"), "symmetric": True},
            ValueError,
            "symmetric=True is directions=",
        ),
        ({"symmetric": True, "partition": "joint"}, ValueError, "symmetric=True is directions="),
        ({"directions": GTE, "labels": True}, ValueError, "labels take the default direction"),
        ({"directions": GTE, "negative_mode": "paired", "decoupled": True}, ValueError, "only"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], error: type, match: str) -> None:
    query, key, negatives, _ = make_inputs("shared")
    assert negatives is not None
    options = {"negative_mode": "shared", **options}
    if options.pop("flat", False):
        negatives = negatives[:, 0]
    if "rows" in options:
        negatives = negatives[: options.pop("rows")]
    if "mask_shape" in options:
        options["negative_mask"] = torch.ones(options.pop("mask_shape"), dtype=torch.bool)
    if options.pop("labels", False):
        options["labels"] = torch.arange(len(query)) % 3
    with pytest.raises(error, match=match):
        info_nce(query, key, negatives, **options)


MARGINS = [(0.0, "absolute"), (0.1, "absolute"), (0.05, "relative"), (-0.1, "absolute")]


def guide_of(
    query: Tensor, key: Tensor, negatives: Tensor | None, seed: int = 11
) -> tuple[Tensor, ...]:
    """A guide model's embeddings of the same inputs: a fixed map to G = 6 features, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(query.shape[-1], 6, generator=generator, dtype=torch.float64)

    def embed(x: Tensor) -> Tensor:
        noise = torch.randn(*x.shape[:-1], 6, generator=generator, dtype=torch.float64)
        return x.detach().double() @ weight + 0.3 * noise

    return tuple(embed(x) for x in (query, key, *(() if negatives is None else (negatives,))))


@pytest.mark.parametrize("guided", [True, False], ids=["guide", "self-guided"])
@pytest.mark.parametrize("directions", [("query_to_key",), GTE], ids=["query-to-key", "gte"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("margin", "strategy"), MARGINS)
@pytest.mark.parametrize("path", ["dense", "engine"])
def test_filter_matches_reference(
    path: str, margin: float, strategy: str, mode: str, directions: tuple[str, ...], guided: bool
) -> None:
    query, key, negatives, _ = make_inputs(mode)
    guide = guide_of(query, key, negatives) if guided else None
    options: dict[str, Any] = {
        "directions": directions,
        "false_negative_margin": margin,
        "margin_strategy": strategy,
        "guide": guide,
        "reduction": "none",
        "mask": mode in ("paired", "shared"),
    }
    if mode == "paired":
        options["in_batch_negatives"] = True
    assert_matches_reference(torch.float64, path, mode, options)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("in-batch", {"symmetric": True}),
        ("shared", {"symmetric": True, "hardness_mode": "all_negatives", "hardness_strength": 3.0}),
        ("shared", {"in_batch_negatives": False, "directions": GTE}),
        ("paired", {}),
        ("unpaired", {"in_batch_negatives": True, "directions": GTE}),
    ],
)
def test_filter_options_match_reference(path: str, mode: str, options: dict[str, Any]) -> None:
    query, key, negatives, _ = make_inputs(mode, seed=12)
    guide = guide_of(query, key, negatives)
    filtered = {"false_negative_margin": 0.05, "guide": guide, "reduction": "sum"}
    mask = mode in ("paired", "shared")
    assert_matches_reference(torch.float64, path, mode, {**options, **filtered, "mask": mask})


def test_the_filter_removes_candidates() -> None:
    # The grid above is not vacuous: at these margins the guide removes candidates.
    query, key, negatives, mask = make_inputs("shared")
    guide = guide_of(query, key, negatives)
    options: dict[str, Any] = dict(negative_mode="shared", negative_mask=mask, reduction="none")
    plain = info_nce(query, key, negatives, directions=GTE, **options)
    for margin, strategy in MARGINS:
        filtered = info_nce(
            query,
            key,
            negatives,
            directions=GTE,
            false_negative_margin=margin,
            margin_strategy=strategy,
            guide=guide,
            **options,
        )
        assert bool((filtered < plain - 1e-9).any()), (margin, strategy)
        assert bool((filtered <= plain + 1e-12).all())  # fewer candidates, smaller loss


def test_module_takes_the_filter() -> None:
    query, key, negatives, mask = make_inputs("shared")
    guide = guide_of(query, key, negatives)
    module = InfoNCE(
        0.05, negative_mode="shared", false_negative_margin=0.1, margin_strategy="relative"
    )
    expected = info_nce(
        query,
        key,
        negatives,
        0.05,
        negative_mode="shared",
        negative_mask=mask,
        false_negative_margin=0.1,
        margin_strategy="relative",
        guide=guide,
    )
    assert torch.equal(module(query, key, negatives, negative_mask=mask, guide=guide), expected)
    assert "false_negative_margin=0.1" in repr(module)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"guide": "given"}, ValueError, "give a margin"),
        ({"false_negative_margin": float("nan")}, ValueError, "must be a finite number"),
        ({"false_negative_margin": "0.1"}, TypeError, "false_negative_margin must be a real"),
        ({"false_negative_margin": 0.1, "margin_strategy": "both"}, ValueError, "margin_strategy"),
        ({"false_negative_margin": 0.1, "guide": "pair"}, ValueError, "exactly when negative_keys"),
        ({"false_negative_margin": 0.1, "guide": "short"}, ValueError, r"shape \(37, 'G'\)"),
        ({"false_negative_margin": 0.1, "guide": "width"}, ValueError, "one guide width"),
        ({"false_negative_margin": 0.1, "guide": "list"}, TypeError, "guide must be None or a"),
        (
            {"false_negative_margin": 0.1, "labels": True},
            ValueError,
            "does not combine with labels",
        ),
        ({"false_negative_margin": 0.1, "decoupled": True}, ValueError, "InfoNCE objective only"),
    ],
)
def test_bad_filter_options_are_refused(options: dict[str, Any], error: type, match: str) -> None:
    query, key, negatives, _ = make_inputs("shared")
    assert negatives is not None
    gq, gk, gn = guide_of(query, key, negatives)
    options = dict(options)
    guides = {
        "given": (gq, gk, gn),
        "pair": (gq, gk),
        "short": (gq[:-1], gk, gn),
        "width": (gq, gk, gn[..., :3]),
        "list": [gq],
    }
    if "guide" in options:
        options["guide"] = guides[options["guide"]]
    if options.pop("labels", False):
        options["labels"] = torch.arange(len(query)) % 3
    mode = "paired" if options.get("decoupled") else "shared"
    with pytest.raises(error, match=match):
        info_nce(query, key, negatives, negative_mode=mode, **options)


@pytest.mark.parametrize(("margin", "strategy"), MARGINS)
@pytest.mark.parametrize("path", ["dense", "engine"])
@pytest.mark.parametrize(
    ("contrast_anchors", "contrast_positives", "triplets"),
    [
        (False, False, False),
        (True, False, False),
        (False, True, False),
        (True, True, False),
        (False, False, True),
        (True, False, True),
    ],
)
def test_matches_gist_embed(
    path: str,
    margin: float,
    strategy: str,
    contrast_anchors: bool,
    contrast_positives: bool,
    triplets: bool,
) -> None:
    # GISTEmbedLoss's own code, on given embeddings: its model and guide are
    # stand-ins that return the embeddings of their column.
    from sentence_transformers.base.losses.merged_forward import column_merging_disabled

    query, key, negatives, _ = make_inputs("shared", negatives=1, seed=14)
    assert negatives is not None
    guide = guide_of(query, key, negatives)
    columns = [x.requires_grad_() for x in (query, key, negatives[:, 0])][: 3 if triplets else 2]
    guides = [guide[0], guide[1], guide[2][:, 0]][: len(columns)]
    gist = _gist(0.01, margin, strategy, contrast_anchors, contrast_positives)
    with column_merging_disabled():
        theirs = gist(
            [{"model": c, "guide": g} for c, g in zip(columns, guides, strict=True)], None
        )
    directions = ("query_to_key",)
    directions += ("query_to_query",) * contrast_anchors + ("key_to_key",) * contrast_positives
    extra: dict[str, Any] = {}
    if triplets:
        extra = dict(negative_keys=columns[2].unsqueeze(1), negative_mode="shared")
    ours = info_nce(
        columns[0],
        columns[1],
        temperature=0.01,
        directions=directions,
        false_negative_margin=margin,
        margin_strategy=strategy,
        guide=(guide[0], guide[1], guide[2]) if triplets else (guide[0], guide[1]),
        chunk_size=chunk_size(path),
        **extra,
    )
    assert_close(ours, theirs, rtol=1e-10, atol=1e-10, name="loss")
    for got, want in zip(
        torch.autograd.grad(ours, columns), torch.autograd.grad(theirs, columns), strict=True
    ):
        assert_close(got, want, rtol=1e-10, atol=1e-10, name="gradient")


def _gist(
    temperature: float, margin: float, strategy: str, anchors: bool, positives: bool
) -> torch.nn.Module:
    """sentence-transformers' GISTEmbedLoss without models: its __init__ checks tokenizers."""

    class Column(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
            return {"sentence_embedding": features[self.name]}

    gist = st_losses.GISTEmbedLoss.__new__(st_losses.GISTEmbedLoss)
    torch.nn.Module.__init__(gist)
    gist.model, gist.guide = Column("model"), Column("guide")
    gist.temperature = temperature
    gist.similarity_fct = torch.nn.CosineSimilarity(dim=-1)
    gist.must_retokenize = False
    gist.margin_strategy, gist.margin = strategy, margin
    gist.contrast_anchors, gist.contrast_positives = anchors, positives
    gist.gather_across_devices = False
    gist.cross_entropy_loss = torch.nn.CrossEntropyLoss()
    return gist


def test_grad_cache_takes_every_recipe() -> None:
    # The encoders run in chunks through grad_cache; the loss (shared
    # negatives, four directions, hardness, a guide) is unchanged, and so are
    # the parameter gradients.
    from info_nce import grad_cache

    generator = torch.Generator().manual_seed(15)
    inputs = torch.randn(3, 12, 7, generator=generator, dtype=torch.float64)
    negatives_in = torch.randn(12 * 2, 7, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))
    encoder = encoder.double()
    guide_net = torch.nn.Linear(7, 4).double().requires_grad_(False)
    guide = (guide_net(inputs[0]), guide_net(inputs[1]), guide_net(negatives_in).view(12, 2, 4))
    options: dict[str, Any] = dict(
        temperature=0.1,
        negative_mode="shared",
        directions=GTE,
        hardness_mode="all_negatives",
        hardness_strength=3.0,
        false_negative_margin=0.05,
        guide=guide,
    )

    def step(embed: Any) -> list[Tensor]:
        encoder.zero_grad()
        query, key = embed(inputs[0]), embed(inputs[1])
        negatives = embed(negatives_in).view(12, 2, 5)
        info_nce(query, key, negatives, **options).backward()
        return [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    plain = step(encoder)
    cached = step(lambda x: grad_cache(encoder, x, chunk_size=5))
    assert len(plain) == len(cached) == 4
    for got, want in zip(cached, plain, strict=True):
        assert_close(got, want, rtol=1e-10, atol=1e-12, name="parameter gradient")
