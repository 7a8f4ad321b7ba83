"""`info_nce.integrations.sentence_transformers.InfoNCELoss` against sentence-transformers' losses.

Tiny models built here, offline: word embeddings over a small vocabulary,
mean pooling, optional dropout and a dense layer. The loss and every
parameter gradient equal sentence-transformers' own MNRL (each direction,
partition and hardness), CachedMNRL (``mini_batch_size``) and GISTEmbedLoss
(a guide model).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import sentence_transformers.sentence_transformer.losses as losses
import sentence_transformers.sentence_transformer.modules as models
import torch
from reference import assert_close
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules.tokenizer import WhitespaceTokenizer
from torch import Tensor

from info_nce.integrations.sentence_transformers import InfoNCELoss

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [
    "a",
    "the",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "under",
    "mat",
    "tree",
    "sky",
    "big",
    "small",
    "red",
    "blue",
]
COLUMNS = [
    ["a cat sat", "the dog ran", "a bird flew", "the big cat", "a small dog", "red bird"],
    [
        "a cat on a mat",
        "a dog ran",
        "the bird in the sky",
        "big cat",
        "small dog ran",
        "a red bird",
    ],
    ["the sky", "a tree", "under the mat", "blue sky", "the red mat", "a big tree"],
    ["the mat", "blue tree", "a sky", "on the tree", "a cat", "small mat"],
]
GTE = ("query_to_key", "key_to_query", "query_to_query", "key_to_key")
ST_DIRECTIONS = {
    "query_to_key": "query_to_doc",
    "key_to_query": "doc_to_query",
    "query_to_query": "query_to_query",
    "key_to_key": "doc_to_doc",
}


def tiny_model(
    seed: int = 0, dropout: float = 0.0, dim: int = 12, words: list[str] = WORDS
) -> SentenceTransformer:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(words), dim, generator=generator, dtype=torch.float64)
    embedding = models.WordEmbeddings(WhitespaceTokenizer(words), weights, update_embeddings=True)
    modules: list[torch.nn.Module] = [embedding, models.Pooling(dim, "mean")]
    if dropout:
        modules.append(models.Dropout(dropout))
    dense = models.Dense(dim, 8)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    modules.append(dense)
    return SentenceTransformer(modules=modules, device="cpu").double()


def features(model: SentenceTransformer, columns: int) -> list[dict[str, Tensor]]:
    return [model.preprocess(texts) for texts in COLUMNS[:columns]]


def loss_and_grads(
    loss_fn: torch.nn.Module, model: SentenceTransformer, columns: int, seed: int = 0
) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)
    loss = loss_fn(features(model, columns), None)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(ours: tuple[Tensor, list[Tensor]], theirs: tuple[Tensor, list[Tensor]]) -> None:
    assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10, name="loss")
    assert len(ours[1]) == len(theirs[1]) > 0
    for got, want in zip(ours[1], theirs[1], strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-10, name="parameter gradient")


MNRL_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("plain", {}, {}),
    (
        "symmetric",
        {"directions": ("query_to_key", "key_to_query"), "partition": "per_direction"},
        {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    ),
    (
        "gte",
        {"directions": GTE, "partition": "joint"},
        {"directions": tuple(ST_DIRECTIONS[d] for d in GTE), "partition_mode": "joint"},
    ),
    *(
        (
            f"hardness-{mode}",
            {"hardness_mode": mode, "hardness_strength": 5.0},
            {"hardness_mode": mode, "hardness_strength": 5.0},
        )
        for mode in ("in_batch_negatives", "hard_negatives", "all_negatives")
    ),
]


@pytest.mark.parametrize("columns", [2, 3, 4])
@pytest.mark.parametrize(("name", "ours", "theirs"), MNRL_CASES, ids=[c[0] for c in MNRL_CASES])
def test_equals_multiple_negatives_ranking_loss(
    name: str, ours: dict[str, Any], theirs: dict[str, Any], columns: int
) -> None:
    model = tiny_model()
    mnrl = losses.MultipleNegativesRankingLoss(model, scale=20.0, **theirs)
    expected = loss_and_grads(mnrl, model, columns)
    assert_same(
        loss_and_grads(InfoNCELoss(model, temperature=0.05, **ours), model, columns), expected
    )


def test_dropout_draws_the_same_masks_as_mnrl() -> None:
    model = tiny_model(dropout=0.3)
    mnrl = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    for seed in (0, 1):
        expected = loss_and_grads(mnrl, model, 3, seed)
        assert_same(loss_and_grads(InfoNCELoss(model), model, 3, seed), expected)
    other = loss_and_grads(InfoNCELoss(model), model, 3, 5)
    assert not torch.equal(other[0], expected[0])  # the masks matter


@pytest.mark.parametrize("mini_batch_size", [1, 2, 4])
def test_mini_batch_size_equals_cached_mnrl(mini_batch_size: int) -> None:
    model = tiny_model()
    cached = losses.CachedMultipleNegativesRankingLoss(
        model, scale=20.0, mini_batch_size=mini_batch_size
    )
    expected = loss_and_grads(cached, model, 3)
    ours = InfoNCELoss(model, mini_batch_size=mini_batch_size)
    assert_same(loss_and_grads(ours, model, 3), expected)
    assert_same(loss_and_grads(InfoNCELoss(model), model, 3), expected)


def test_mini_batch_size_with_dropout_equals_a_plain_backward_over_the_same_mini_batches() -> None:
    # grad_cache replays each mini-batch with its first run's random state:
    # the loss of embeddings drawn mini-batch by mini-batch, back-propagated.
    model = tiny_model(dropout=0.3)
    loss_fn = InfoNCELoss(model, mini_batch_size=2)
    got = loss_and_grads(loss_fn, model, 3, seed=4)

    def plain(columns: Any, labels: Any) -> Tensor:
        embeddings = [
            torch.cat([model(_slice(column, s))["sentence_embedding"] for s in range(0, 6, 2)])
            for column in columns
        ]
        query, key, *rest = embeddings
        from info_nce import info_nce

        return info_nce(query, key, torch.stack(rest, 1), temperature=0.05, negative_mode="shared")

    assert_same(got, loss_and_grads(plain, model, 3, seed=4))


def _slice(column: dict[str, Tensor], start: int) -> dict[str, Tensor]:
    return {k: v[start : start + 2] for k, v in column.items()}


@pytest.mark.parametrize("columns", [2, 3])
def test_a_guide_model_equals_gist_embed_loss(columns: int) -> None:
    # On triplets GISTEmbed's positive-positive block leaves the negatives
    # out, where our key-to-key rows take them (docs/guides/embeddings.md):
    # compared there without that block.
    triplets = columns == 3
    model, guide = tiny_model(seed=0), tiny_model(seed=1).requires_grad_(False)
    expected = loss_and_grads(
        _gist_embed_loss(model, guide, positives=not triplets), model, columns
    )
    for mini_batch_size in (None, 4):
        ours = _as_gist_embed_loss(model, guide, triplets, mini_batch_size)
        assert_same(loss_and_grads(ours, model, columns), expected)


def _as_gist_embed_loss(
    model: SentenceTransformer,
    guide: SentenceTransformer,
    triplets: bool,
    mini_batch_size: int | None,
) -> InfoNCELoss:
    """GISTEmbedLoss(model, guide, temperature=0.01, margin=0.0) as an InfoNCELoss."""
    # On triplets GISTEmbed's positive-positive block is left out (see above).
    directions = ("query_to_key", "query_to_query") + (() if triplets else ("key_to_key",))
    return InfoNCELoss(
        model,
        guide=guide,
        mini_batch_size=mini_batch_size,
        temperature=0.01,
        directions=directions,
        false_negative_margin=0.0,
    )


def _gist_embed_loss(
    model: SentenceTransformer, guide: SentenceTransformer, *, positives: bool = True
) -> torch.nn.Module:
    """GISTEmbedLoss(model, guide, temperature=0.01, margin=0.0, contrast_positives=positives).

    Its __init__ accepts transformers tokenizers only; the tiny models here
    share one word tokenizer, so nothing is tokenized again (its
    ``must_retokenize`` is False), and its forward is its own code.
    """
    gist = losses.GISTEmbedLoss.__new__(losses.GISTEmbedLoss)
    torch.nn.Module.__init__(gist)
    gist.model, gist.guide = model, guide
    gist.temperature = 0.01
    gist.similarity_fct = torch.nn.CosineSimilarity(dim=-1)
    gist.must_retokenize = False
    gist.margin_strategy, gist.margin = "absolute", 0.0
    gist.contrast_anchors, gist.contrast_positives = True, positives
    gist.gather_across_devices = False
    gist.cross_entropy_loss = torch.nn.CrossEntropyLoss()
    return gist


def test_config_citation_and_temperature() -> None:
    model = tiny_model()
    plain = InfoNCELoss(model)
    assert plain.temperature == 0.05
    assert plain.get_config_dict()["temperature"] == 0.05
    assert "1807.03748" in plain.citation
    gte = InfoNCELoss(model, directions=GTE, hardness_mode="all_negatives", hardness_strength=2.0)
    assert gte.get_config_dict()["directions"] == GTE
    assert gte.get_config_dict()["hardness_strength"] == 2.0
    assert "2308.03281" in gte.citation
    assert "2402.16829" in InfoNCELoss(model, false_negative_margin=0.1).citation


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"scale": 20}, TypeError, "unknown option"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"hardness_mode": "hardest"}, ValueError, "hardness_mode"),
        ({"hardness_strength": 2.0}, ValueError, "hardness_strength"),
        ({"mini_batch_size": 0}, ValueError, "mini_batch_size"),
        ({"directions": ("key_to_query",)}, ValueError, "query_to_key"),
        ({"partition": "both"}, ValueError, "partition"),
        (
            {"decoupled": True, "hardness_mode": "all_negatives", "hardness_strength": 1.0},
            ValueError,
            "decoupled",
        ),
        ({"gather_distributed": 1}, TypeError, "gather_distributed"),
    ],
)
def test_bad_options_raise_at_construction(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        InfoNCELoss(tiny_model(), **options)


def test_a_guide_needs_a_margin() -> None:
    with pytest.raises(ValueError, match="false_negative_margin"):
        InfoNCELoss(tiny_model(), guide=tiny_model(seed=1))


def test_one_column_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="at least two columns"):
        InfoNCELoss(model)(features(model, 1), None)


def test_without_sentence_transformers_the_import_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['sentence_transformers'] = None\n"
        "import info_nce\n"
        "try:\n"
        "    import info_nce.integrations.sentence_transformers\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "info-nce[sentence-transformers]" in result.stdout


def test_import_info_nce_does_not_import_sentence_transformers() -> None:
    code = "import sys, info_nce; print('sentence_transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_docstring_example_runs() -> None:
    import doctest

    from info_nce.integrations import sentence_transformers as integration

    found = doctest.DocTestFinder().find(integration)
    tests = [test for test in found if test.name.endswith(".InfoNCELoss") and test.examples]
    assert len(tests) == 1
    report: list[str] = []
    result = doctest.DocTestRunner().run(tests[0], out=report.append)
    assert result.failed == 0, "".join(report)


def test_construction_draws_nothing_from_the_global_generator() -> None:
    model, guide = tiny_model(), tiny_model(seed=1)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    InfoNCELoss(model, guide=guide, false_negative_margin=0.1)
    assert torch.equal(torch.rand(4), expected)


def test_a_guide_that_must_retokenize_needs_a_decoding_tokenizer() -> None:
    # Another vocabulary: the texts must be tokenized again, from the model's
    # input ids, which a word tokenizer cannot decode.
    guide = tiny_model(seed=1, words=WORDS[::-1])
    with pytest.raises(ValueError, match="another tokenizer than the model"):
        InfoNCELoss(tiny_model(), guide=guide, false_negative_margin=0.0)


def test_matryoshka_loss_wraps_it_as_it_wraps_mnrl() -> None:
    model = tiny_model()
    dims = [8, 4, 2]
    expected = loss_and_grads(
        losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model, scale=20.0), dims),
        model,
        3,
    )
    got = loss_and_grads(losses.MatryoshkaLoss(model, InfoNCELoss(model), dims), model, 3)
    assert_same(got, expected)


@pytest.mark.parametrize("mini_batch_size", [1, 4])
def test_matryoshka_with_mini_batches_equals_it_around_cached_mnrl(mini_batch_size: int) -> None:
    # The columns are embedded once, at full width, and shrunk for each width.
    model = tiny_model()
    dims, weights = [8, 4, 2], [1.0, 0.5, 2.0]
    cached = losses.CachedMultipleNegativesRankingLoss(
        model, scale=20.0, mini_batch_size=mini_batch_size
    )
    expected = loss_and_grads(losses.MatryoshkaLoss(model, cached, dims, weights), model, 3)
    ours = InfoNCELoss(model, mini_batch_size=mini_batch_size)
    calls = [0]
    model[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    got = loss_and_grads(losses.MatryoshkaLoss(model, ours, dims, weights), model, 3)
    assert_same(got, expected)
    matryoshka_calls, calls[0] = calls[0], 0
    loss_and_grads(ours, model, 3)
    assert matryoshka_calls == calls[0]  # one run and one replay per mini-batch, for all widths
    with torch.no_grad():  # evaluation: mini-batches without grad_cache
        evaluated = losses.MatryoshkaLoss(model, ours, dims, weights)(features(model, 3), None)
    assert_close(evaluated, expected[0], rtol=1e-10, atol=1e-10, name="loss without gradient")


# Two ranks, as the trainer runs them: the loss holds the DDP-wrapped model.
# Rank 1's share is short (the tail of an epoch), so the ranks replay
# different numbers of mini-batches.
DDP_SPLITS = {"equal": (3, 3), "short": (5, 1)}
DDP_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "gte-hardness": {"directions": GTE, "hardness_mode": "all_negatives", "hardness_strength": 2.0},
}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import gc
    import os

    import torch.distributed as dist
    from ranks import count_all_reduces, init_gloo
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        results = {}
        for split, sizes in DDP_SPLITS.items():
            start = sum(sizes[:rank])
            for name, options in DDP_OPTIONS.items():
                for mini_batch_size in (None, 2):
                    model = tiny_model()
                    loss_fn = InfoNCELoss(
                        model, mini_batch_size=mini_batch_size, gather_distributed=True, **options
                    )
                    ddp = DistributedDataParallel(model)
                    calls = count_all_reduces(ddp)
                    loss_fn.model = ddp  # what SentenceTransformerTrainer does
                    columns = [
                        model.preprocess(texts[start : start + sizes[rank]]) for texts in COLUMNS
                    ]
                    loss = loss_fn(columns, None)
                    loss.backward()
                    grads = [p.grad.clone() for p in model.parameters()]
                    results[split, name, mini_batch_size] = (loss.detach(), grads, calls[0])
                    del loss_fn, ddp, loss
                    gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _one_process_reference(
    sizes: tuple[int, ...], options: dict[str, Any]
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Each rank's loss and the averaged gradients, from the concatenated batch in one process.

    Rank r's loss is the mean of its rows' losses; DDP averages the ranks'
    gradients: the gradient of sum_r mean_r / W.
    """
    from info_nce import info_nce

    model = tiny_model()
    query, key, *negatives = [
        model(model.preprocess(texts))["sentence_embedding"] for texts in COLUMNS
    ]
    rows = info_nce(
        query,
        key,
        torch.stack(negatives, 1),
        temperature=0.05,
        negative_mode="shared",
        reduction="none",
        **options,
    )
    parts = rows.split(list(sizes))
    sum(part.mean() for part in parts).div(len(sizes)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return [part.detach().mean() for part in parts], grads


def test_ddp_with_gather_and_mini_batches_equals_one_process(tmp_path: Any) -> None:
    from ranks import run_ranks

    run_ranks(_ddp_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for split, sizes in DDP_SPLITS.items():
        for name, options in DDP_OPTIONS.items():
            losses_, grads = _one_process_reference(sizes, options)
            plain_calls = results[0][split, name, None][2]
            for rank in range(2):
                for mini_batch_size in (None, 2):
                    loss, got, calls = results[rank][split, name, mini_batch_size]
                    assert_same((loss, got), (losses_[rank], grads))
                    # One all-reduce per step, whatever the mini-batches.
                    assert calls == plain_calls >= 1


def test_the_trainer_trains_saves_and_reloads(tmp_path: Any) -> None:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    model = tiny_model().float()
    loss_fn = InfoNCELoss(
        model, mini_batch_size=2, hardness_mode="hard_negatives", hardness_strength=2.0
    )
    columns = {"anchor": COLUMNS[0], "positive": COLUMNS[1], "negative": COLUMNS[2]}
    data = Dataset.from_dict({name: texts * 4 for name, texts in columns.items()})

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(features(model, 3), None))

    before = held_out_loss()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=6,
        num_train_epochs=3,
        learning_rate=0.05,
        seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss_fn).train()
    assert held_out_loss() < 0.5 * before

    model.save(str(tmp_path / "model"))
    again = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    texts = COLUMNS[0]
    assert torch.equal(
        again.encode(texts, convert_to_tensor=True), model.encode(texts, convert_to_tensor=True)
    )
    card = (tmp_path / "model" / "README.md").read_text()
    assert "InfoNCELoss" in card
    assert '"hardness_mode": "hard_negatives"' in card


def _trainer_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One SGD step of lr 1 through the trainer's own DDP: the step is minus the gradient."""
    import os

    import torch.distributed as dist
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = InfoNCELoss(model, mini_batch_size=2, gather_distributed=True)
    data = Dataset.from_dict({"anchor": COLUMNS[0], "positive": COLUMNS[1], "negative": COLUMNS[2]})
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=3,  # the 6 rows in one step on 2 ranks
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping
        seed=0,
        use_cpu=True,
        ddp_backend="gloo",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss_fn)
    trainer.train()
    wrapped = type(loss_fn.model).__name__
    steps = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    torch.save((wrapped, steps), os.path.join(out_dir, f"rank{rank}.pt"))
    del trainer, loss_fn
    dist.barrier()
    dist.destroy_process_group()


def test_the_trainer_under_ddp_steps_as_one_process_on_the_whole_batch(tmp_path: Any) -> None:
    from ranks import run_ranks

    from info_nce import info_nce

    run_ranks(_trainer_worker, 2, str(tmp_path))
    model = tiny_model()
    query, key, negative = [
        model(model.preprocess(texts))["sentence_embedding"] for texts in COLUMNS[:3]
    ]
    # Each row's loss is over the same candidates however the ranks split the batch.
    info_nce(query, key, negative[:, None], temperature=0.05, negative_mode="shared").backward()
    for rank in range(2):
        wrapped, steps = torch.load(tmp_path / f"rank{rank}.pt")
        assert wrapped == "DistributedDataParallel"
        for step, p in zip(steps, model.parameters(), strict=True):
            assert_close(step, p.grad, rtol=1e-9, atol=1e-12, name="SGD step")


def test_the_example_fine_tunes_offline_and_reports_both_peaks(tmp_path: Any) -> None:
    import re

    command = [
        sys.executable,
        "examples/sentence_transformers_example.py",
        "--tiny",
        *("--batch-size", "64", "--mini-batch-size", "16", "--steps", "4"),
        *("--learning-rate", "1e-3", "--output-dir", str(tmp_path)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("InfoNCELoss (guide, mini-batches)", "MNRL"):
        assert re.search(rf"{re.escape(label)}: one step [\d.]+ s, peak \d+ MiB", result.stdout)
    before, after = map(
        float, re.findall(r"held-out loss: ([\d.]+) before, ([\d.]+)", result.stdout)[0]
    )
    assert after < before


def _example() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sentence_transformers_example", "examples/sentence_transformers_example.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mini_batch_size", [None, 2])
@pytest.mark.parametrize("columns", [2, 3])
def test_a_guide_with_another_tokenizer_retokenizes_as_gist_embed_loss(
    columns: int, mini_batch_size: int | None
) -> None:
    # Two tiny BERTs whose word-level tokenizers number the words differently:
    # the guide takes the texts decoded from the model's ids, tokenized again.
    example = _example()
    model = example.tiny_bert(seed=0, hidden=16).double().eval()
    guide = example.tiny_bert(seed=1, hidden=16, words=example.VOCABULARY[::-1])
    guide.double().eval().requires_grad_(False)
    texts = list(example.triplets(5, seed=0).values())[:columns]
    triplets = columns == 3
    options = {"temperature": 0.01, "margin": 0.0, "contrast_positives": not triplets}
    if mini_batch_size is None:
        gist = losses.GISTEmbedLoss(model, guide, **options)
    else:
        gist = losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=mini_batch_size, **options)
    assert gist.must_retokenize
    ours = _as_gist_embed_loss(model, guide, triplets, mini_batch_size)
    assert ours._retokenize

    def run(loss_fn: torch.nn.Module) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad()
        loss = loss_fn([model.preprocess(t) for t in texts], None)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert_same(run(ours), run(gist))


def test_symmetric_ranking_loss_on_pairs_is_the_per_direction_loss() -> None:
    model = tiny_model()
    expected = loss_and_grads(
        losses.MultipleNegativesSymmetricRankingLoss(model, scale=20.0), model, 2
    )
    ours = InfoNCELoss(
        model, directions=("query_to_key", "key_to_query"), partition="per_direction"
    )
    assert_same(loss_and_grads(ours, model, 2), expected)


def test_labels_reach_info_nce() -> None:
    # A dataset's label column: rows of one label are each other's positives.
    from info_nce import info_nce

    model = tiny_model()
    labels = torch.tensor([0, 1, 0, 2, 1, 3])

    def reference(columns: Any, labels: Any) -> Tensor:
        query, key, negative = [model(column)["sentence_embedding"] for column in columns]
        return info_nce(
            query, key, negative[:, None], temperature=0.05, negative_mode="shared", labels=labels
        )

    model.zero_grad()
    expected = reference(features(model, 3), labels)
    got = InfoNCELoss(model)(features(model, 3), labels)
    assert_close(got, expected, rtol=1e-12, atol=1e-12, name="loss")
    assert not torch.allclose(got, InfoNCELoss(model)(features(model, 3), None))


def test_labels_with_options_that_refuse_them_raise_naming_them() -> None:
    model = tiny_model()
    loss_fn = InfoNCELoss(model, hardness_mode="hard_negatives", hardness_strength=2.0)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(features(model, 3), torch.arange(6))


def test_mini_batches_are_cut_to_their_longest_text_as_cached_mnrl_cuts_them() -> None:
    example = _example()
    model = example.tiny_bert(seed=0, hidden=16).double().eval()
    short, long = "a cat", "a red cat sleeps in the garden near the river by the house"
    columns = [[short, short, long, short], [short, long, short, short]]
    widths: list[int] = []
    model[0].register_forward_pre_hook(
        lambda module, args: widths.append(args[0]["input_ids"].shape[1])
    )

    def run(loss_fn: torch.nn.Module) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad()
        loss = loss_fn([model.preprocess(texts) for texts in columns], None)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    expected = run(losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=1))
    widths.clear()
    assert_same(run(InfoNCELoss(model, mini_batch_size=1)), expected)
    full = len(long.split()) + 2  # [CLS] … [SEP]
    # Each text alone, first run and replay: 3 + 3 short ones and 1 + 1 long.
    assert sorted(widths) == [4] * 12 + [full] * 4


def test_model_fit_trains_with_it(tmp_path: Any) -> None:
    # The older training loop: InputExamples, a DataLoader and model.fit.
    from sentence_transformers.sentence_transformer.readers import InputExample
    from torch.utils.data import DataLoader

    model = tiny_model().float()
    loss_fn = InfoNCELoss(model, mini_batch_size=2)
    examples = [InputExample(texts=list(row)) for row in zip(*COLUMNS[:3], strict=True)]
    loader = DataLoader(examples * 4, batch_size=6, shuffle=False)  # type: ignore[arg-type]
    before = float(loss_fn(features(model, 3), None).detach())
    model.fit(
        train_objectives=[(loader, loss_fn)],
        epochs=3,
        optimizer_params={"lr": 0.05},
        warmup_steps=0,
        show_progress_bar=False,
        checkpoint_path=None,
    )
    assert float(loss_fn(features(model, 3), None).detach()) < 0.5 * before
