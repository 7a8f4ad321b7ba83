"""Fine-tune a sentence-transformers model with InfoNCELoss: a batch MNRL cannot fit.

The loss takes (anchor, positive, negative) columns, scores every anchor
against every positive and every hard negative of the batch (shared hard
negatives, as MultipleNegativesRankingLoss does), drops the candidates that a
guide model finds closer than the positive (GISTEmbed), and embeds the batch
in mini-batches through grad_cache, so that the model's memory is one
mini-batch's whatever the batch size.

First it measures one training step's peak memory, each in a fresh process:
InfoNCELoss with ``--mini-batch-size`` and sentence-transformers' own
MultipleNegativesRankingLoss, at the same batch size. Then it fine-tunes
with SentenceTransformerTrainer and reports the held-out loss before and
after. The data are synthetic sentences (animals, colours, places), so that
nothing but the model is downloaded.

    # a real model, when it is in the Hugging Face cache (or can be downloaded)
    python examples/sentence_transformers_example.py \\
        --model sentence-transformers/all-MiniLM-L6-v2 --batch-size 1024 --mini-batch-size 64

    # offline: a two-layer BERT built here from a config, with a word-level tokenizer
    python examples/sentence_transformers_example.py --tiny

Peak memory is the CUDA allocator's peak on a GPU, the process's resident
set size (``ru_maxrss``) above what it held before the step on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer import losses, modules
from transformers.utils import logging as hf_logging

from info_nce.integrations.sentence_transformers import InfoNCELoss

COLOURS = ["red", "blue", "green", "black", "white", "brown", "grey", "yellow"]
ANIMALS = ["cat", "dog", "bird", "horse", "cow", "fox", "mouse", "rabbit"]
ACTIONS = ["sleeps", "runs", "sits", "waits", "plays", "eats"]
PLACES = ["garden", "kitchen", "field", "river", "road", "forest", "barn", "house"]
FILLER = ["a", "the", "in", "on", "near", "by"]
VOCABULARY = sorted({*COLOURS, *ANIMALS, *ACTIONS, *PLACES, *FILLER})


def triplets(rows: int, seed: int, negatives: int = 1) -> dict[str, list[str]]:
    """(anchor, positive, negative…) columns: a scene, the same scene reworded, other scenes.

    Each negative differs from the anchor in one attribute only: a hard
    negative, as mined negatives are. One negative makes a column
    ``negative``; several, ``negative_1``, ``negative_2``, ….
    """
    rng = random.Random(seed)
    names = ["negative"] if negatives == 1 else [f"negative_{m + 1}" for m in range(negatives)]
    columns: dict[str, list[str]] = {name: [] for name in ["anchor", "positive", *names]}
    pools = {"colour": COLOURS, "animal": ANIMALS, "place": PLACES}
    for _ in range(rows):
        colour, animal, action, place = (rng.choice(x) for x in (COLOURS, ANIMALS, ACTIONS, PLACES))
        columns["anchor"].append(f"a {colour} {animal} {action} in the {place}")
        columns["positive"].append(f"in the {place} the {animal} {action} a {colour} one")
        for name in names:
            other = {"colour": colour, "animal": animal, "place": place}
            changed = rng.choice(list(other))
            other[changed] = rng.choice([x for x in pools[changed] if x != other[changed]])
            columns[name].append(
                f"a {other['colour']} {other['animal']} {action} in the {other['place']}"
            )
    return columns


def tiny_bert(
    seed: int = 0, hidden: int = 64, layers: int = 2, words: list[str] = VOCABULARY
) -> SentenceTransformer:
    """A BERT of ``layers`` layers over ``words``, built offline, with mean pooling."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers import models as token_models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {word: i for i, word in enumerate([*specials, *words])}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    with tempfile.TemporaryDirectory() as directory:
        BertModel(config).save_pretrained(directory)
        fast.save_pretrained(directory)
        transformer = modules.Transformer(directory, max_seq_length=32)
    pooling = modules.Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def tokenized(model: SentenceTransformer, texts: list[str]) -> dict[str, Any]:
    """The model's input features for ``texts``, on its device."""
    features = model.preprocess(texts)
    return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in features.items()}


def load(args: argparse.Namespace) -> SentenceTransformer:
    if args.tiny:
        return tiny_bert()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(args.model, device=device)


def make_loss(name: str, model: SentenceTransformer, args: argparse.Namespace) -> torch.nn.Module:
    if name == "mnrl":
        return losses.MultipleNegativesRankingLoss(model, scale=20.0)
    # The model as it starts guides the filter: a candidate it finds more
    # similar to the anchor than the positive is a likely false negative.
    guide = copy.deepcopy(model).requires_grad_(False)
    return InfoNCELoss(
        model,
        temperature=0.05,
        guide=guide,
        false_negative_margin=0.0,
        mini_batch_size=args.mini_batch_size,
    )


def peak_of_one_step(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One step's (forward, backward, AdamW) time and peak memory above the start."""
    model = load(args)
    loss_fn = make_loss(name, model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    data = triplets(args.batch_size, seed=1)
    features = [tokenized(model, texts) for texts in data.values()]
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    else:
        start_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss_fn(features, None).backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start_bytes
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_bytes
    return {"seconds": time.perf_counter() - start, "peak_mib": peak / 2**20}


def fine_tune(args: argparse.Namespace) -> tuple[float, float]:
    """The held-out InfoNCELoss before and after training with it."""
    model = load(args)
    loss_fn = make_loss("info_nce", model, args)
    held_out = triplets(args.batch_size, seed=2)

    def evaluate() -> float:
        features = [tokenized(model, texts) for texts in held_out.values()]
        with torch.no_grad():
            return float(loss_fn(features, None))

    before = evaluate()
    arguments = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=args.learning_rate,
        warmup_steps=0,
        seed=0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=max(1, args.steps // 5),
    )
    train = Dataset.from_dict(triplets(args.batch_size * args.steps, seed=0))
    SentenceTransformerTrainer(
        model=model, args=arguments, train_dataset=train, loss=loss_fn
    ).train()
    return before, evaluate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--tiny", action="store_true", help="an offline two-layer BERT instead")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--mini-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--output-dir", default=tempfile.gettempdir() + "/info-nce-st-example")
    parser.add_argument("--step-of", choices=["info_nce", "mnrl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.step_of:  # a fresh process measuring one step
        print(json.dumps(peak_of_one_step(args.step_of, args)))
        return

    print(
        f"batch {args.batch_size} (anchor, positive, negative), mini-batch {args.mini_batch_size}"
    )
    for name, label in (("info_nce", "InfoNCELoss (guide, mini-batches)"), ("mnrl", "MNRL")):
        command = [sys.executable, __file__, *sys.argv[1:], "--step-of", name]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            print(f"  {label}: one step failed (out of memory?): {tail[0]}")
            continue
        step = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  {label}: one step {step['seconds']:.2f} s, peak {step['peak_mib']:.0f} MiB")
    before, after = fine_tune(args)
    print(f"held-out loss: {before:.3f} before, {after:.3f} after {args.steps} steps")


if __name__ == "__main__":
    main()
