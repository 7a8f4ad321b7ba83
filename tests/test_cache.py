"""grad_cache: parameter gradients equal the plain backward over the same chunks, in float64.

The plain step embeds the same chunks one after the other with gradient
(the same random draws, in the same order) and back-propagates the loss;
the cached step embeds them without gradient and replays each in backward.
With dropout, equal gradients mean the replay drew the same masks.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import count_all_reduces, init_gloo, run_ranks
from reference import assert_close
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from info_nce import InfoNCE, MemoryQueue, grad_cache, info_nce, nt_xent
from info_nce.cache import cached_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")

B, D_IN, D_OUT = 13, 6, 4


def mlp(seed: int = 0, dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(D_IN, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, D_OUT)
    ).double()


def batch(seed: int) -> Tensor:
    """(B, D_IN) encoder inputs."""
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def keys(seed: int) -> Tensor:
    """(B, D_OUT) fixed embeddings to contrast with."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, D_OUT, generator=generator, dtype=torch.float64)


def plain(encoder: Callable[..., Tensor], x: Any, chunk_size: int) -> Tensor:
    """The plain embeddings of the same chunks, with gradient."""
    if isinstance(x, dict):
        rows = len(next(v for v in x.values() if isinstance(v, Tensor)))
        parts = [
            encoder(
                **{k: v[a : a + chunk_size] if isinstance(v, Tensor) else v for k, v in x.items()}
            )
            for a in range(0, rows, chunk_size)
        ]
    else:
        parts = [encoder(x[a : a + chunk_size]) for a in range(0, len(x), chunk_size)]
    return torch.cat(parts)


def grads_of(step: Callable[[], Tensor], modules: list[nn.Module]) -> list[Tensor]:
    """The parameters' gradients after ``step().backward()``, from zero, at a fixed seed."""
    for module in modules:
        module.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    step().backward()
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def assert_same(got: list[Tensor], want: list[Tensor]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=1e-12, atol=1e-12, name="parameter gradient")


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 20], ids=lambda c: f"chunk{c}")
def test_one_tower_with_dropout_equals_the_plain_backward(chunk_size: int) -> None:
    encoder = mlp()
    x, y = batch(1), keys(2)

    def cached() -> Tensor:
        return info_nce(grad_cache(encoder, x, chunk_size=chunk_size), y)

    def reference() -> Tensor:
        return info_nce(plain(encoder, x, chunk_size), y)

    assert_same(grads_of(cached, [encoder]), grads_of(reference, [encoder]))


def test_batch_norm_sees_each_chunk_and_updates_its_running_statistics_once() -> None:
    def encoder_with_batch_norm() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.Linear(16, D_OUT))

    cached_encoder, plain_encoder = encoder_with_batch_norm().double(), encoder_with_batch_norm()
    plain_encoder = plain_encoder.double()
    x, y = batch(1), keys(2)
    cached = grads_of(
        lambda: info_nce(grad_cache(cached_encoder, x, chunk_size=5), y), [cached_encoder]
    )
    reference = grads_of(lambda: info_nce(plain(plain_encoder, x, 5), y), [plain_encoder])
    assert_same(cached, reference)
    norm, plain_norm = cached_encoder[1], plain_encoder[1]
    assert int(norm.num_batches_tracked) == 3  # 13 rows in chunks of 5: one update per chunk
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(norm, name), getattr(plain_norm, name)), name


def test_the_replay_draws_the_same_dropout_masks() -> None:
    # Not a tautology: with fresh masks the gradients differ.
    encoder = mlp(dropout=0.5)
    x, y = batch(1), keys(2)
    want = grads_of(lambda: info_nce(plain(encoder, x, 4), y), [encoder])
    got = grads_of(lambda: info_nce(grad_cache(encoder, x, chunk_size=4), y), [encoder])
    assert_same(got, want)
    other = grads_of(
        lambda: info_nce(plain(encoder, x, 4) * 1.0, y) if torch.rand(1) else y.sum(), [encoder]
    )
    assert not torch.equal(other[0], want[0])  # another seed's masks


@pytest.mark.parametrize("shared", [False, True], ids=["two-towers", "shared-tower"])
def test_two_towers_and_a_shared_tower(shared: bool) -> None:
    query_tower = mlp(0)
    key_tower = query_tower if shared else mlp(1)
    modules = [query_tower] if shared else [query_tower, key_tower]
    x, y = batch(1), batch(2)

    def cached() -> Tensor:
        q = grad_cache(query_tower, x, chunk_size=4)
        return info_nce(q, grad_cache(key_tower, y, chunk_size=5), symmetric=True)

    def reference() -> Tensor:
        return info_nce(plain(query_tower, x, 4), plain(key_tower, y, 5), symmetric=True)

    assert_same(grads_of(cached, modules), grads_of(reference, modules))


class DictEncoder(nn.Module):
    """A tokenizer-style encoder: ids, a mask, and a non-tensor flag."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8).double()
        self.out = nn.Linear(8, D_OUT).double()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pool: str) -> Tensor:
        assert pool == "mean"
        tokens = self.embed(input_ids) * attention_mask.unsqueeze(-1)  # (b, L, 8)
        return self.out(tokens.sum(1) / attention_mask.sum(1, keepdim=True))


def test_dict_inputs_pass_tensors_in_chunks_and_other_values_unchanged() -> None:
    encoder = DictEncoder()
    generator = torch.Generator().manual_seed(3)
    inputs = {
        "input_ids": torch.randint(0, 20, (B, 7), generator=generator),
        "attention_mask": (torch.rand(B, 7, generator=generator) > 0.2).double(),
        "pool": "mean",
    }
    inputs["attention_mask"][:, 0] = 1.0
    y = keys(2)
    got = grads_of(lambda: info_nce(grad_cache(encoder, inputs, chunk_size=5), y), [encoder])
    want = grads_of(lambda: info_nce(plain(encoder, inputs, 5), y), [encoder])
    assert_same(got, want)


@pytest.mark.parametrize("loss_name", ["nt_xent", "queue"])
def test_with_nt_xent_and_a_queue(loss_name: str) -> None:
    encoder = mlp()
    x, y = batch(1), batch(2)
    queue_keys = torch.nn.functional.normalize(keys(3), dim=1)

    def loss(z1: Tensor, z2: Tensor) -> Tensor:
        if loss_name == "nt_xent":
            return nt_xent([z1, z2], chunk_size=4)
        return info_nce(z1, z2.detach(), queue_keys, chunk_size=4)

    got = grads_of(
        lambda: loss(grad_cache(encoder, x, chunk_size=4), grad_cache(encoder, y, chunk_size=4)),
        [encoder],
    )
    want = grads_of(lambda: loss(plain(encoder, x, 4), plain(encoder, y, 4)), [encoder])
    assert_same(got, want)


def test_a_queue_module_takes_cached_keys() -> None:
    encoder = mlp(dropout=0.0)
    queue = MemoryQueue(8, D_OUT, dtype=torch.float64)
    queue.push(keys(4)[:8])
    module = InfoNCE(queue=queue)
    x, y = batch(1), keys(2)
    stored = queue.keys.clone()
    got = grads_of(lambda: module(grad_cache(encoder, x, chunk_size=4), y), [encoder])
    want = grads_of(lambda: info_nce(encoder(x), y, stored), [encoder])
    assert_same(got, want)


def test_without_random_layers_it_equals_the_full_batch_backward() -> None:
    encoder = mlp(dropout=0.0)
    x, y = batch(1), keys(2)
    got = grads_of(lambda: info_nce(grad_cache(encoder, x, chunk_size=3), y), [encoder])
    want = grads_of(lambda: info_nce(encoder(x), y), [encoder])
    assert_same(got, want)


def test_gradient_accumulation_over_two_steps() -> None:
    encoder = mlp()
    batches = [(batch(1), keys(2)), (batch(3), keys(4))]

    def accumulate(embed: Callable[[Tensor], Tensor]) -> list[Tensor]:
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        for x, y in batches:
            info_nce(embed(x), y).backward()  # no zero_grad in between
        return [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    got = accumulate(lambda x: grad_cache(encoder, x, chunk_size=5))
    want = accumulate(lambda x: plain(encoder, x, 5))
    assert_same(got, want)


def test_inputs_that_need_a_gradient_get_it() -> None:
    encoder = mlp(dropout=0.0)
    x = batch(1).requires_grad_()
    y = keys(2)
    (got,) = torch.autograd.grad(info_nce(grad_cache(encoder, x, chunk_size=4), y), x)
    (want,) = torch.autograd.grad(info_nce(encoder(x), y), x)
    assert_close(got, want, rtol=1e-12, atol=1e-12, name="input gradient")


def test_the_embeddings_keep_no_activations() -> None:
    # The graph holds the replay, not the encoder's intermediate tensors: no
    # tensor of the hidden width (16) is saved anywhere for backward.
    encoder = mlp(dropout=0.0)
    saved: list[tuple[int, ...]] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embeddings = grad_cache(encoder, batch(1), chunk_size=4)
    assert embeddings.requires_grad
    assert not any(16 in shape for shape in saved), saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(batch(1))
    assert any(16 in shape for shape in saved)  # the plain forward does save them


def test_cpu_bfloat16_autocast_matches_the_plain_step() -> None:
    encoder = mlp(dropout=0.0).float()
    x, y = batch(1).float(), keys(2).float()

    def step(embed: Callable[[Tensor], Tensor]) -> list[Tensor]:
        encoder.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = embed(x)  # bfloat16, as an autocast encoder returns them
            assert embeddings.dtype == torch.bfloat16
            loss = info_nce(embeddings, y.to(embeddings.dtype))
        loss.backward()
        return [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    replayed: list[torch.dtype] = []  # outputs of the calls with gradient: the replay's

    def record(module: nn.Module, args: Any, output: Tensor) -> None:
        if torch.is_grad_enabled():
            replayed.append(output.dtype)

    encoder[-1].register_forward_hook(record)
    got = step(lambda x: grad_cache(encoder, x, chunk_size=4))
    assert replayed == [torch.bfloat16] * 4  # the replay ran under the first pass's autocast
    want = step(lambda x: plain(encoder, x, 4))
    for g, w in zip(got, want, strict=True):
        # The same bfloat16 products. The plain step sums its chunks'
        # gradients of the (cached) bfloat16 weight copy in bfloat16, the
        # replay each chunk's in float32: bfloat16 rounding (eps 3.9e-3, of
        # gradients up to 1.4) apart.
        assert_close(g, w, rtol=0, atol=5e-3, name="parameter gradient")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda e: grad_cache(e, batch(1), chunk_size=0), ValueError, "chunk_size"),
        (lambda e: grad_cache(e, batch(1), chunk_size=2.0), ValueError, "chunk_size"),
        (lambda e: grad_cache(e, [batch(1), batch(1)[:5]], chunk_size=2), ValueError, "first"),
        (lambda e: grad_cache(e, {"a": 1}, chunk_size=2), TypeError, "at least one tensor"),
        (
            lambda e: grad_cache(lambda x: (x,), batch(1), chunk_size=2),
            TypeError,
            "return a tensor",
        ),
        (lambda e: grad_cache(lambda x: x[:1], batch(1), chunk_size=2), ValueError, r"\(2, D\)"),
    ],
    ids=["zero", "float", "first-dims", "no-tensor", "non-tensor-output", "wrong-rows"],
)
def test_errors_name_the_argument(
    call: Callable[[nn.Module], Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        call(mlp())


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        results = {}
        x, y = batch(10 + rank), keys(20 + rank)
        for name in ("plain", "cached"):
            model = DDP(mlp(0, dropout=0.0))
            calls = count_all_reduces(model)
            embeddings = model(x) if name == "plain" else grad_cache(model, x, chunk_size=4)
            info_nce(embeddings, y).backward()
            results[name] = ([p.grad.clone() for p in model.parameters()], calls[0])
            # Tear down in order (as examples/torchrun_example.py): no DDP
            # object may outlive the group.
            del model, embeddings
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_gradients_equal_plain_ddp_with_one_all_reduce_per_backward(tmp_path: Path) -> None:
    run_ranks(_ddp_worker, 2, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        (plain_grads, plain_calls), (cached_grads, cached_calls) = (
            results["plain"],
            results["cached"],
        )
        assert_same(cached_grads, plain_grads)
        # Four chunks, yet the buckets are all-reduced once, as for the plain step.
        assert cached_calls == plain_calls >= 1


def test_grad_scaler_on_the_cpu_scales_and_unscales_the_cached_gradients() -> None:
    encoder = mlp(dropout=0.0).float()
    x, y = batch(1).float(), keys(2).float()

    def step(embed: Callable[[Tensor], Tensor]) -> list[Tensor]:
        encoder.zero_grad(set_to_none=True)
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(info_nce(embed(x), y)).backward()
        scaler.unscale_(optimizer)
        return [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    got = step(lambda x: grad_cache(encoder, x, chunk_size=4))
    want = step(lambda x: plain(encoder, x, 4))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=1e-5, atol=1e-7, name="unscaled parameter gradient")


def test_cached_embeddings_of_several_columns_equal_grad_cache_of_each() -> None:
    encoder = mlp(dropout=0.3)
    x, y = batch(1), batch(2)[:5]
    x.requires_grad_()

    def step(embed: Callable[[], list[Tensor]]) -> list[Tensor]:
        encoder.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(7)
        first, second = embed()
        info_nce(first[:5], second).backward()
        return [x.grad.clone(), *(p.grad.clone() for p in encoder.parameters())]

    expected = step(lambda: [grad_cache(encoder, c, chunk_size=3) for c in (x, y)])
    assert_same(step(lambda: cached_embeddings(encoder, [x, y], chunk_size=3)), expected)


def test_cached_embeddings_refuse_a_tensor_in_two_columns() -> None:
    x = batch(1).requires_grad_()
    with pytest.raises(ValueError, match="must not share a tensor"):
        cached_embeddings(mlp(), [x, x], chunk_size=2)


def test_a_frozen_encoder_leaves_no_graph_and_no_gradient_mode_keeps_nothing() -> None:
    encoder = mlp(dropout=0.0).requires_grad_(False)
    x = batch(1)
    embeddings = grad_cache(encoder, x, chunk_size=4)
    assert not embeddings.requires_grad  # nothing to replay
    assert_same([embeddings], [encoder(x)])
    assert grad_cache(encoder, x.clone().requires_grad_(), chunk_size=4).requires_grad
    trainable = mlp(dropout=0.0)
    with torch.no_grad():
        assert not grad_cache(trainable, x, chunk_size=4).requires_grad
    assert grad_cache(trainable, x, chunk_size=4).requires_grad
