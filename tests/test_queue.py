"""`MemoryQueue`: ring semantics, state, dtypes, errors, identical queues across ranks."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import init_gloo, run_ranks
from tiling import TILES_PATH, tiles_on_path  # noqa: F401  (an autouse fixture)
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import info_nce.module as module_file
from info_nce import InfoNCE, MemoryQueue, NTXent, info_nce, nt_xent


def batches(sizes: list[int], dim: int = 3, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(b, dim, generator=generator) for b in sizes]


def expected_keys(pushed: list[Tensor], size: int) -> Tensor:
    """The newest ``size`` pushed rows, oldest first: the queue's contract, written plainly."""
    everything = torch.cat(pushed) if pushed else torch.zeros(0, 3)
    return everything[max(0, len(everything) - size) :]


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (7, [3, 3, 3, 3, 3]),  # wraps at 7, b does not divide size
        (6, [3, 3, 3, 3]),  # b divides size: the oldest returns to slot 0
        (4, [10]),  # b > size: only the newest 4
        (5, [2, 9, 1, 0, 4]),  # b > size mid-run, and an empty push
        (1, [1, 2, 1]),
        (8, [3]),  # never full
    ],
)
def test_keys_are_the_newest_entries_oldest_first(size: int, sizes: list[int]) -> None:
    queue = MemoryQueue(size, 3, normalize=False)
    pushed: list[Tensor] = []
    for batch in batches(sizes):
        queue.push(batch)
        pushed.append(batch)
        want = expected_keys(pushed, size)
        assert torch.equal(queue.keys, want)
        assert len(queue) == len(want)
        assert queue.is_full == (len(want) == size)


def test_keys_are_normalised_and_detached() -> None:
    queue = MemoryQueue(10, 3)
    batch = (torch.randn(4, 3) * 5).requires_grad_()
    queue.push(batch)
    assert not queue.keys.requires_grad
    torch.testing.assert_close(queue.keys, F.normalize(batch.detach(), dim=1))
    queue.push(torch.zeros(1, 3))  # a zero vector stays zero, no NaN
    assert torch.equal(queue.keys[-1], torch.zeros(3))


def test_keys_are_a_view_until_the_ring_wraps() -> None:
    queue = MemoryQueue(5, 3, normalize=False)
    queue.push(torch.randn(3, 3))
    assert queue.keys.data_ptr() == queue.entries.data_ptr()  # no copy
    queue.push(torch.randn(2, 3))  # exactly full: oldest at slot 0, still a view
    assert queue.keys.data_ptr() == queue.entries.data_ptr()
    queue.push(torch.randn(1, 3))  # oldest at slot 1: the entries in order are a copy
    assert queue.keys.data_ptr() != queue.entries.data_ptr()


def test_labels_follow_their_keys() -> None:
    queue = MemoryQueue(5, 3, labels=True, normalize=False)
    pushed, pushed_labels = [], []
    for k, batch in enumerate(batches([2, 3, 4])):
        labels = torch.arange(len(batch)) + 10 * k
        queue.push(batch, labels.to(torch.int32))  # any integer dtype; stored as int64
        pushed.append(batch)
        pushed_labels.append(labels)
    assert queue.labels is not None
    assert torch.equal(queue.labels, torch.cat(pushed_labels)[-5:])
    assert queue.labels.dtype == torch.long
    assert torch.equal(queue.keys, torch.cat(pushed)[-5:])
    assert MemoryQueue(5, 3).labels is None


def test_reset_empties_the_queue() -> None:
    queue = MemoryQueue(4, 3, labels=True)
    queue.push(torch.randn(6, 3), torch.arange(6))
    queue.reset()
    assert len(queue) == 0
    assert not queue.is_full
    assert queue.keys.shape == (0, 3)
    assert queue.labels is not None
    assert queue.labels.shape == (0,)
    queue.push(torch.ones(1, 3), torch.tensor([7]))
    assert len(queue) == 1
    assert int(queue.labels[0]) == 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_storage_dtype(dtype: torch.dtype) -> None:
    queue = MemoryQueue(8, 3, dtype=dtype)
    batch = torch.randn(5, 3)
    queue.push(batch)
    assert queue.keys.dtype == dtype
    assert torch.equal(queue.keys, F.normalize(batch, dim=1).to(dtype))
    assert queue.entries.element_size() == torch.empty(0, dtype=dtype).element_size()


def test_to_moves_the_buffers_and_keeps_the_state() -> None:
    queue = MemoryQueue(4, 3, labels=True)
    queue.push(torch.randn(6, 3), torch.arange(6))
    before = queue.keys.clone()
    queue = queue.to(torch.float64)  # a dtype move keeps positions and labels
    assert queue.keys.dtype == torch.float64
    assert torch.equal(queue.keys, before.double())
    assert queue.labels is not None
    assert torch.equal(queue.labels, torch.arange(2, 6))


class Holder(nn.Module):
    """A model that holds a queue, as a training module would."""

    def __init__(self, queue: MemoryQueue) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.queue = queue


@pytest.mark.parametrize("labels", [False, True])
def test_state_dict_round_trip_continues_bit_identically(labels: bool) -> None:
    steps = batches([3, 4, 2, 5, 3, 3, 1], seed=1)

    def push(queue: MemoryQueue, k: int) -> None:
        queue.push(steps[k], torch.arange(len(steps[k])) + 100 * k if labels else None)

    original = Holder(MemoryQueue(7, 3, labels=labels))
    for k in range(3):
        push(original.queue, k)
    state = {name: value.clone() for name, value in original.state_dict().items()}
    assert {"queue.entries", "queue.position", "queue.count"} <= set(state)
    assert ("queue.entry_labels" in state) == labels

    resumed = Holder(MemoryQueue(7, 3, labels=labels))
    resumed.load_state_dict(state)
    assert len(resumed.queue) == len(original.queue)
    for k in range(3, len(steps)):
        push(original.queue, k)
        push(resumed.queue, k)
        assert torch.equal(resumed.queue.keys, original.queue.keys)
        if labels:
            assert resumed.queue.labels is not None
            assert original.queue.labels is not None
            assert torch.equal(resumed.queue.labels, original.queue.labels)
    for name, value in original.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_corrupt_state_is_refused() -> None:
    queue = MemoryQueue(4, 3)
    state = queue.state_dict()
    state["count"] = torch.tensor(9)
    with pytest.raises(ValueError, match="count must be in"):
        MemoryQueue(4, 3).load_state_dict(state)


def test_moco_warm_up_uses_only_valid_entries() -> None:
    # The first step, against an empty queue, is the loss with no negatives at
    # all: 0 for MoCo's defaults (the positive is the only candidate), and
    # the in-batch loss with in-batch negatives.
    queue = MemoryQueue(16, 8)
    query, key = torch.randn(4, 8), torch.randn(4, 8)
    assert float(info_nce(query, key, queue.keys)) == 0.0
    torch.testing.assert_close(
        info_nce(query, key, queue.keys, in_batch_negatives=True), info_nce(query, key)
    )
    queue.push(key)
    torch.testing.assert_close(info_nce(query, key, queue.keys), info_nce(query, key, key))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0, "dim": 3}, ValueError, "size must be a positive int, got 0"),
        ({"size": -2, "dim": 3}, ValueError, "size must be a positive int, got -2"),
        ({"size": 2.0, "dim": 3}, ValueError, "size must be a positive int, got 2.0"),
        ({"size": True, "dim": 3}, ValueError, "size must be a positive int, got True"),
        ({"size": 4, "dim": 0}, ValueError, "dim must be a positive int, got 0"),
        ({"size": 4, "dim": 3, "dtype": torch.long}, TypeError, "dtype must be a floating"),
        ({"size": 4, "dim": 3, "labels": 1}, TypeError, "labels must be a bool"),
        ({"size": 4, "dim": 3, "normalize": None}, TypeError, "normalize must be a bool"),
    ],
)
def test_bad_construction_is_refused(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        MemoryQueue(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("labels", "keys", "pushed_labels", "error", "match"),
    [
        (False, torch.randn(2, 4), None, ValueError, r"shape \(b, dim\) = \(b, 3\), got shape"),
        (False, torch.randn(3), None, ValueError, r"shape \(b, dim\) = \(b, 3\), got shape \(3,\)"),
        (False, [[1.0, 2.0, 3.0]], None, TypeError, "<keys> must be a torch.Tensor, got list"),
        (False, torch.ones(2, 3, dtype=torch.long), None, TypeError, "floating-point"),
        (False, torch.randn(2, 3), torch.arange(2), ValueError, "built without labels"),
        (True, torch.randn(2, 3), None, ValueError, "labels=True: push.*needs labels, got None"),
        (True, torch.randn(2, 3), torch.ones(2), TypeError, "labels must be an integer tensor"),
        (True, torch.randn(2, 3), torch.arange(3), ValueError, r"labels must have shape \(b,\)"),
        (True, torch.randn(2, 3), [0, 1], TypeError, "labels must be a torch.Tensor, got list"),
    ],
)
def test_bad_pushes_are_refused(
    labels: bool, keys: object, pushed_labels: object, error: type[Exception], match: str
) -> None:
    queue = MemoryQueue(4, 3, labels=labels)
    with pytest.raises(error, match=match):
        queue.push(keys, pushed_labels)  # type: ignore[arg-type]
    assert len(queue) == 0  # nothing half-written


def test_repr_shows_the_settings() -> None:
    text = repr(MemoryQueue(4, 3, dtype=torch.bfloat16, labels=True, gather_distributed=True))
    assert text == (
        "MemoryQueue(size=4, dim=3, dtype=torch.bfloat16, labels=True, normalize=True, "
        "gather_distributed=True)"
    )


# --- identical queues on every rank (gloo, real processes) -------------------------------

WORLD_SIZES = (2, 3)
STEPS = 4


def rank_batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    """Rank r's push at a step: b = r + step + 1 rows (the ranks differ), labelled by origin."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    size = rank + step + 1
    keys = torch.randn(size, 3, generator=generator)
    return keys, torch.full((size,), 10 * rank + step)


def _queue_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        queue = MemoryQueue(9, 3, labels=True, normalize=False, gather_distributed=True)
        states = []
        for step in range(STEPS):
            queue.push(*rank_batch(rank, step))
            assert queue.labels is not None
            states.append((queue.keys.clone(), queue.labels.clone()))
        # MoCo on W ranks: each rank's batch against the one global queue.
        moco = InfoNCE(queue=MemoryQueue(9, 3, gather_distributed=True))
        losses: list[Tensor] = []
        for step in range(STEPS):
            query, key = module_batch(rank, step)
            losses.append(moco(query, key).detach())
    finally:
        dist.destroy_process_group()
    torch.save((states, losses), os.path.join(out_dir, f"rank{rank}.pt"))


def module_batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    """Rank r's (query, key) at a step for the MoCo module: r + 2 rows."""
    generator = torch.Generator().manual_seed(7000 + 100 * rank + step)
    query = torch.randn(rank + 2, 3, generator=generator)
    return query, torch.randn(rank + 2, 3, generator=generator)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ranks_hold_one_queue_in_rank_order_and_score_against_it(
    world: int, tmp_path: os.PathLike[str]
) -> None:
    out_dir = str(tmp_path)
    run_ranks(_queue_worker, world, out_dir)
    loaded = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    per_rank = [states for states, _ in loaded]
    # The module on each rank: its own batch against every rank's earlier keys.
    earlier: list[Tensor] = []
    for step in range(STEPS):
        batches_now = [module_batch(rank, step) for rank in range(world)]
        queue_keys = F.normalize(torch.cat(earlier), dim=1)[-9:] if earlier else torch.zeros(0, 3)
        for rank, (query, key) in enumerate(batches_now):
            expected = info_nce(query, key, queue_keys)
            torch.testing.assert_close(loaded[rank][1][step], expected, msg=f"{rank} {step}")
        earlier.extend(key for _, key in batches_now)
    pushed_keys: list[Tensor] = []
    pushed_labels: list[Tensor] = []
    for step in range(STEPS):
        for rank in range(world):  # what one process would push: the ranks' batches in order
            keys, labels = rank_batch(rank, step)
            pushed_keys.append(keys)
            pushed_labels.append(labels)
        want_keys = torch.cat(pushed_keys)[-9:]
        want_labels = torch.cat(pushed_labels)[-9:]
        for rank in range(world):
            keys, labels = per_rank[rank][step]
            assert torch.equal(keys, want_keys), (rank, step)
            assert torch.equal(labels, want_labels), (rank, step)


# --- InfoNCE(queue=...) -------------------------------------------------------------------


@pytest.mark.parametrize("in_batch", [None, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_module_scores_against_the_queue_before_pushing(
    in_batch: bool | None, symmetric: bool
) -> None:
    # Each step equals the functional loss against the keys pushed in the
    # earlier steps (the newest `size` of them), written out by hand.
    size, dim = 10, 6
    generator = torch.Generator().manual_seed(5)
    module = InfoNCE(
        temperature=0.2,
        queue=MemoryQueue(size, dim),
        in_batch_negatives=in_batch,
        symmetric=symmetric,
    )
    earlier: list[Tensor] = []
    for step in range(4):
        query = torch.randn(4, dim, generator=generator, dtype=torch.float64)
        key = torch.randn(4, dim, generator=generator, dtype=torch.float64)
        negatives = (
            F.normalize(torch.cat(earlier), dim=1)[-size:] if earlier else torch.zeros(0, dim)
        )
        expected = info_nce(
            query,
            key,
            negatives.to(torch.float64),
            temperature=0.2,
            in_batch_negatives=in_batch,
            symmetric=symmetric,
        )
        torch.testing.assert_close(module(query, key), expected, rtol=1e-6, atol=1e-6)
        earlier.append(key)
        assert len(module.queue) == min(size, 4 * (step + 1))
    if in_batch is None and not symmetric:  # the first step's MoCo loss had no candidate but p
        fresh = InfoNCE(queue=MemoryQueue(size, dim))
        assert float(fresh(torch.randn(3, dim), torch.randn(3, dim))) == 0.0


def test_module_scores_against_the_storage_without_a_copy() -> None:
    # Once the ring has wrapped, `keys` is a copy in insertion order; the
    # module hands the loss the storage itself (the negatives' order does not
    # matter to the loss), labels included.
    module = InfoNCE(queue=MemoryQueue(6, 3, labels=True))
    for _ in range(2):  # 8 pushed into 6 slots: the oldest entry is at position 2
        module(torch.randn(4, 3), torch.randn(4, 3), labels=torch.randint(0, 2, (4,)))
    queue = module.queue
    assert queue.keys.data_ptr() != queue.entries.data_ptr()  # a copy: oldest first
    seen: dict[str, Tensor] = {}

    def spy(*args: object, **kwargs: object) -> Tensor:
        seen["negatives"] = args[2]  # type: ignore[assignment]
        seen["labels"] = kwargs["negative_labels"]  # type: ignore[assignment]
        return info_nce(*args, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(module_file, "info_nce", spy):
        module(torch.randn(4, 3), torch.randn(4, 3), labels=torch.randint(0, 2, (4,)))
    assert seen["negatives"].data_ptr() == queue.entries.data_ptr()
    assert seen["labels"].data_ptr() == queue.entry_labels.data_ptr()


@pytest.mark.parametrize("path", ["dense", "engine", TILES_PATH])
@pytest.mark.parametrize(
    ("module_name", "settings"),
    [
        pytest.param(name, settings, id=f"{name}-{id_}")
        for name in ["InfoNCE", "NTXent"]
        for settings, id_ in [
            ({"reduction": "mean"}, "mean"),  # gradients built in forward: no key kept
            ({"reduction": "none"}, "none"),  # backward recomputes the logits from the keys
            ({"decoupled": True, "labelled": True}, "decoupled-labels"),  # and reads labels
        ]
    ]
    + [pytest.param("InfoNCE", {"symmetric": True, "in_batch_negatives": True}, id="symmetric")],
)
def test_module_gradients_after_the_push_are_those_of_the_scored_queue(
    path: str, settings: dict[str, object], module_name: str
) -> None:
    # The module pushes into the ring it scored against before backward runs:
    # what backward reads must be the entries as scored (a copy where the
    # loss keeps them), not the pushed ones, and no in-place error.
    options = dict(settings)
    labelled = bool(options.pop("labelled", False))
    chunk = 3 if path == "engine" else None
    size, dim, batch = 8, 5, 6
    generator = torch.Generator().manual_seed(3)
    queue = MemoryQueue(size, dim, dtype=torch.float64, labels=labelled)
    queue.push(
        torch.randn(size, dim, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (size,), generator=generator) if labelled else None,
    )
    scored, scored_labels = (
        queue.keys.clone(),
        None if queue.labels is None else queue.labels.clone(),
    )
    query = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,), generator=generator) if labelled else None
    module: torch.nn.Module
    if module_name == "InfoNCE":
        module = InfoNCE(temperature=0.3, queue=queue, chunk_size=chunk, **options)  # type: ignore[arg-type]

        def expected(q: Tensor, k: Tensor) -> Tensor:
            return info_nce(
                q,
                k,
                scored,
                temperature=0.3,
                chunk_size=chunk,
                labels=labels,
                negative_labels=scored_labels,
                **options,  # type: ignore[arg-type]
            )
    else:
        module = NTXent(temperature=0.3, queue=queue, chunk_size=chunk, **options)  # type: ignore[arg-type]

        def expected(q: Tensor, k: Tensor) -> Tensor:
            return nt_xent(
                [q, k],
                temperature=0.3,
                chunk_size=chunk,
                labels=labels,
                negative_keys=scored,
                negative_labels=scored_labels,
                **options,  # type: ignore[arg-type]
            )

    def weighted(loss: Tensor) -> Tensor:  # a random upstream gradient for 'none'
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4))
        return (loss * upstream).sum()

    leaves = [query.clone().requires_grad_(), key.clone().requires_grad_()]
    got = torch.autograd.grad(weighted(module(*leaves, labels=labels)), leaves)
    assert not torch.equal(queue.unordered()[0], scored)  # the step pushed before backward
    leaves = [query.clone().requires_grad_(), key.clone().requires_grad_()]
    want = torch.autograd.grad(weighted(expected(*leaves)), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_module_pushes_only_in_training_with_gradients() -> None:
    module = InfoNCE(queue=MemoryQueue(16, 4))
    query, key = torch.randn(3, 4), torch.randn(3, 4)
    module.eval()
    module(query, key)
    assert len(module.queue) == 0
    module.train()
    with torch.no_grad():
        module(query, key)
    assert len(module.queue) == 0
    module(query, key)
    assert len(module.queue) == 3
    torch.testing.assert_close(module.queue.keys, F.normalize(key, dim=1))


def test_module_queue_is_in_its_state_dict() -> None:
    module = InfoNCE(queue=MemoryQueue(8, 4))
    module(torch.randn(5, 4), torch.randn(5, 4))
    state = module.state_dict()
    assert {"queue.entries", "queue.position", "queue.count"} <= set(state)
    resumed = InfoNCE(queue=MemoryQueue(8, 4))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.queue.keys, module.queue.keys)


def test_module_queue_in_half_storage_with_float32_inputs() -> None:
    module = InfoNCE(queue=MemoryQueue(8, 4, dtype=torch.bfloat16))
    first = torch.randn(5, 4)
    module(torch.randn(5, 4), first)
    query, key = torch.randn(5, 4), torch.randn(5, 4)
    expected = info_nce(query, key, F.normalize(first, dim=1).to(torch.bfloat16).float())
    torch.testing.assert_close(module(query, key), expected)


def test_module_queue_errors() -> None:
    with pytest.raises(TypeError, match="queue must be a MemoryQueue or None, got Tensor"):
        InfoNCE(queue=torch.zeros(4, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not combine with the loss's gather_distributed"):
        InfoNCE(queue=MemoryQueue(4, 3), gather_distributed=True)
    module = InfoNCE(queue=MemoryQueue(4, 3))
    with pytest.raises(ValueError, match="pass no negative_keys, got a tensor of shape"):
        module(torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"queue holds keys of dim 3, but <query> has shape"):
        module(torch.randn(2, 5), torch.randn(2, 5))
    assert len(module.queue) == 0
    labelled = InfoNCE(queue=MemoryQueue(4, 3, labels=True))
    with pytest.raises(ValueError, match=r"queue holds labels .* forward needs labels=, got None"):
        labelled(torch.randn(2, 3), torch.randn(2, 3))
    assert len(labelled.queue) == 0


# --- negative_labels: cross-batch memory for SupCon ---------------------------------------


def reference_negative_labels(
    inputs: dict[str, Tensor],
    temperature: float,
    *,
    decoupled: bool,
    symmetric: bool,
) -> Tensor:
    """Per-query loss in float64, anchor by anchor, from the definition.

    Query i's candidates are all B keys and all M negatives; its positives are
    those whose label equals its own (keys' labels are the queries', the
    negatives' are ``negative_labels``). Loss: ``logsumexp(candidates) -
    mean(positives)``; decoupled: the log-sum-exp over the candidates that
    are not positives (0 if there are none). Symmetric: the mean with key j's
    loss against all B queries, whose positives share its label.
    """
    q, p, n = (F.normalize(inputs[name], dim=1) for name in ("query", "key", "negatives"))
    labels, negative_labels = inputs["labels"], inputs["negative_labels"]

    def row(logits: Tensor, positive: Tensor) -> Tensor:
        candidates = logits[~positive] if decoupled else logits
        if len(candidates) == 0:
            return logits.sum() * 0.0
        return torch.logsumexp(candidates, 0) - logits[positive].mean()

    rows = []
    for i in range(len(q)):
        logits = torch.cat([p @ q[i], n @ q[i]]) / temperature  # (B + M,)
        positive = torch.cat([labels == labels[i], negative_labels == labels[i]])
        rows.append(row(logits, positive))
    loss = torch.stack(rows)
    if symmetric:
        key_rows = [row(q @ p[j] / temperature, labels == labels[j]) for j in range(len(p))]
        loss = (loss + torch.stack(key_rows)) / 2
    return loss


def negative_label_inputs(matches: str, batch: int = 9, size: int = 13) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(len(matches) + batch)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    labels = torch.arange(batch) % 3  # repeats
    negative_labels = torch.randint(0, 5, (size,), generator=generator)  # some match, some not
    if matches == "none":
        negative_labels = negative_labels + 100
    elif matches == "all":  # one class: every key and every negative is a positive
        labels, negative_labels = labels * 0, negative_labels * 0
    return {
        "query": randn(batch, 5),
        "key": randn(batch, 5),
        "negatives": randn(size, 5),
        "labels": labels,
        "negative_labels": negative_labels,
    }


@pytest.mark.parametrize("path", ["dense", "engine", TILES_PATH])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("matches", ["some", "none", "all"])
def test_negative_labels_match_the_formula(
    matches: str, decoupled: bool, symmetric: bool, reduction: str, path: str
) -> None:
    inputs = negative_label_inputs(matches)
    loss = info_nce(
        inputs["query"],
        inputs["key"],
        inputs["negatives"],
        temperature=0.3,
        reduction=reduction,  # type: ignore[arg-type]
        labels=inputs["labels"],
        negative_labels=inputs["negative_labels"],
        symmetric=symmetric,
        decoupled=decoupled,
        chunk_size=4 if path == "engine" else None,
    )
    rows = reference_negative_labels(inputs, 0.3, decoupled=decoupled, symmetric=symmetric)
    expected = {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    leaves = [inputs[name] for name in ("query", "key", "negatives")]
    upstream = torch.rand(expected.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    grads = torch.autograd.grad(loss, leaves, upstream.double())
    wanted = torch.autograd.grad(expected, leaves, upstream.double())
    for got, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_negative_labels_without_matches_are_plain_negatives() -> None:
    # No entry shares a query's label: the same loss as without negative_labels.
    inputs = negative_label_inputs("none")
    args = (inputs["query"], inputs["key"], inputs["negatives"])
    with_labels = info_nce(
        *args, labels=inputs["labels"], negative_labels=inputs["negative_labels"]
    )
    torch.testing.assert_close(with_labels, info_nce(*args, labels=inputs["labels"]))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"negative_labels": torch.zeros(4, dtype=torch.long)}, ValueError, "need labels"),
        (
            {
                "labels": torch.zeros(3, dtype=torch.long),
                "negatives": None,
                "negative_labels": torch.zeros(4, dtype=torch.long),
            },
            ValueError,
            r"need unpaired <negative_keys> \(M, D\), got negative_keys=None",
        ),
        (
            {
                "labels": torch.zeros(3, dtype=torch.long),
                "negatives": torch.randn(3, 4, 2),
                "negative_mode": "paired",
                "negative_labels": torch.zeros(4, dtype=torch.long),
            },
            ValueError,
            "got negative_mode='paired'",
        ),
        (
            {"labels": torch.zeros(3, dtype=torch.long), "negative_labels": torch.zeros(5)},
            TypeError,
            "negative_labels must be an integer tensor, got dtype torch.float32",
        ),
        (
            {
                "labels": torch.zeros(3, dtype=torch.long),
                "negative_labels": torch.zeros(5, dtype=torch.long),
            },
            ValueError,
            r"negative_labels must have shape \(M,\) = \(4,\), got shape \(5,\)",
        ),
        (
            {"labels": torch.zeros(3, dtype=torch.long), "negative_labels": [0, 1, 2, 3]},
            TypeError,
            "negative_labels must be a torch.Tensor or None, got list",
        ),
    ],
)
def test_negative_labels_errors(options: dict[str, object], error: type, match: str) -> None:
    negatives = options.pop("negatives", torch.randn(4, 2))
    with pytest.raises(error, match=match):
        info_nce(torch.randn(3, 2), torch.randn(3, 2), negatives, **options)  # type: ignore[arg-type]


def test_module_with_a_labelled_queue_is_cross_batch_memory() -> None:
    # Each step equals info_nce against the entries pushed before it, with
    # their labels as negative_labels; the batch's labels are pushed with it.
    size, dim = 7, 4
    generator = torch.Generator().manual_seed(8)
    module = InfoNCE(temperature=0.2, queue=MemoryQueue(size, dim, labels=True))
    keys: list[Tensor] = []
    labels: list[Tensor] = []
    for _ in range(4):
        query = torch.randn(3, dim, generator=generator, dtype=torch.float64)
        key = torch.randn(3, dim, generator=generator, dtype=torch.float64)
        label = torch.randint(0, 3, (3,), generator=generator)
        stored = F.normalize(torch.cat(keys), dim=1)[-size:] if keys else torch.zeros(0, dim)
        stored_labels = torch.cat(labels)[-size:] if labels else torch.zeros(0, dtype=torch.long)
        expected = info_nce(
            query,
            key,
            stored.double(),
            temperature=0.2,
            labels=label,
            negative_labels=stored_labels,
        )
        torch.testing.assert_close(module(query, key, labels=label), expected)
        keys.append(key)
        labels.append(label)
        assert module.queue.labels is not None
        assert torch.equal(module.queue.labels, torch.cat(labels)[-size:])


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_nt_xent_module_scores_against_the_queue_then_pushes_the_last_view(
    labelled: bool, stacked: bool
) -> None:
    # SimCLR/SupCon with a memory bank: each step equals nt_xent with the
    # entries pushed before it as extra negatives (their labels as
    # negative_labels), then the last view joins the queue.
    size, dim = 8, 4
    generator = torch.Generator().manual_seed(9)
    module = NTXent(temperature=0.3, queue=MemoryQueue(size, dim, labels=labelled))
    pushed: list[Tensor] = []
    pushed_labels: list[Tensor] = []
    for _ in range(3):
        views = torch.randn(3, 5, dim, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 3, (5,), generator=generator) if labelled else None
        stored = F.normalize(torch.cat(pushed), dim=1)[-size:] if pushed else None
        expected = nt_xent(
            views,
            labels,
            0.3,
            negative_keys=None if stored is None else stored.double(),
            negative_labels=torch.cat(pushed_labels)[-size:] if labelled and pushed else None,
        )
        loss = module(views, labels=labels) if stacked else module(*views, labels=labels)
        torch.testing.assert_close(loss, expected)
        pushed.append(views[-1])
        if labels is not None:
            pushed_labels.append(labels)
        torch.testing.assert_close(
            module.queue.keys, F.normalize(torch.cat(pushed), dim=1)[-size:].float()
        )


class ProductFlops(TorchDispatchMode):
    """Counts the FLOPs of every 2-D matrix product (mm, addmm, in place or not) dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args[:2]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", [True, False])
def test_a_queue_costs_no_gradient_product(frozen: bool) -> None:
    # Matrix-product FLOPs of forward+backward through the engine: q @ K^T
    # and dS @ K for a queue (keys without gradient), plus dS^T @ q otherwise.
    batch, size, dim = 64, 1024, 16
    queue = MemoryQueue(size, dim)
    queue.push(torch.randn(size, dim))
    negatives = queue.keys.clone().requires_grad_(not frozen)
    query = torch.randn(batch, dim, requires_grad=True)
    key = torch.randn(batch, dim)
    with ProductFlops() as counter:
        info_nce(query, key, negatives, chunk_size=16).backward()
    products = counter.flops / (2 * batch * size * dim)  # one (B, K) x D product each
    assert products == pytest.approx(2 if frozen else 3, abs=0.05)


def test_loss_module_repr_shows_every_setting_and_its_queue() -> None:
    module = InfoNCE(0.07, queue=MemoryQueue(16, 4), in_batch_negatives=True, symmetric=True)
    assert repr(module) == (
        "InfoNCE(\n"
        "  temperature=0.07, reduction='mean', negative_mode='unpaired', symmetric=True, "
        "in_batch_negatives=True, normalize=True, learn_temperature=False, max_logit_scale=100, "
        "chunk_size=None, gather_distributed=False, decoupled=False, false_negative_rate=0, "
        "hard_negative_beta=0\n"
        "  (queue): MemoryQueue(size=16, dim=4, dtype=torch.float32, labels=False, "
        "normalize=True, gather_distributed=False)\n"
        ")"
    )
