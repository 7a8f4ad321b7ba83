"""A sentence-transformers loss over `info_nce`: every embedding recipe in one loss.

``InfoNCELoss`` drops into ``SentenceTransformerTrainer`` (or a ``model.fit``
loop) as sentence-transformers' own losses do: column 0 of a batch is the
query, column 1 its positive, columns 2… its hard negatives, shared by the
batch (``negative_mode="shared"``), as ``MultipleNegativesRankingLoss``
treats them. Its options are `info_nce`'s; ``mini_batch_size`` runs the model
through `grad_cache` (the cached losses' memory, exact gradients) and
``guide`` a second model whose embeddings filter false negatives
(GISTEmbed).

Needs the ``sentence-transformers`` extra: ``pip install
'info-nce[sentence-transformers]'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer.losses.matryoshka import (
        ForwardDecorator,
        shrink,
    )
except ImportError as error:  # pragma: no cover - exercised in a process without the package
    raise ImportError(
        "info_nce.integrations.sentence_transformers needs sentence-transformers: "
        "pip install 'info-nce[sentence-transformers]'"
    ) from error

from info_nce.cache import cached_embeddings
from info_nce.functional import info_nce

__all__ = ["InfoNCELoss"]

# The `info_nce` options the loss passes on; the others it sets itself (the
# inputs, the shared negative mode, the temperature, the guide, gathering).
OPTIONS = (
    "symmetric",
    "in_batch_negatives",
    "normalize",
    "chunk_size",
    "decoupled",
    "false_negative_rate",
    "hard_negative_beta",
    "hardness_mode",
    "hardness_strength",
    "directions",
    "partition",
    "false_negative_margin",
    "margin_strategy",
)

_INFO_NCE = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""
_GTE = """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long
              and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""
_GIST = """
@misc{solatorio2024gistembedguidedinsampleselection,
      title={GISTEmbed: Guided In-sample Selection of Training Negatives
             for Text Embedding Fine-tuning},
      author={Aivin V. Solatorio},
      year={2024},
      eprint={2402.16829},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/2402.16829},
}
"""


class _SentenceEmbedding(nn.Module):
    """A sentence-transformers model as `grad_cache` takes an encoder: features in, (b, D) out.

    Under DDP (the trainer puts its wrapped model into the loss) it forwards
    the wrapper's ``no_sync``, so that the replays of all columns
    all-reduce once, with the last mini-batch, whatever the number of
    mini-batches on each rank.
    """

    def __init__(self, model: nn.Module, forward: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.model = model
        # The model's own forward where MatryoshkaLoss has decorated it.
        self._forward = forward

    def forward(self, **features: Any) -> Tensor:
        features = _without_trailing_padding(features)
        output = self.model(features) if self._forward is None else self._forward(features)
        embedding: Tensor = output["sentence_embedding"]
        return embedding

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """The wrapped model's ``no_sync`` where it has one (DDP), else nothing."""
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if callable(no_sync) else contextlib.nullcontext()


class InfoNCELoss(nn.Module):
    """`info_nce` as a sentence-transformers loss: shared hard negatives and every recipe.

    Column 0 of a batch is the query, column 1 its positive, columns 2… its
    hard negatives, every query scored against all of them
    (``negative_mode="shared"``). Without options it is
    ``MultipleNegativesRankingLoss(model, scale=1 / temperature)``; the
    options compose the recipes of `info_nce` (directions and partition,
    hardness weighting, guided false-negative filtering, the decoupled and
    debiased objectives) with exact gradients in the blockwise engine.

    Args:
        model: the ``SentenceTransformer`` being trained.
        temperature: logits are cosine similarities divided by it (0.05:
            sentence-transformers' ``scale=20``).
        guide: an optional second ``SentenceTransformer``, run without
            gradients, whose embeddings are `info_nce`'s ``guide`` (with
            ``false_negative_margin``: GISTEmbed). It takes the texts again,
            through its own tokenizer, where its tokenizer differs from the
            model's, as ``GISTEmbedLoss`` does.
        mini_batch_size: embed each column in mini-batches through
            `grad_cache` (the guide too, without gradients): the model's
            memory is a mini-batch's, as in the cached losses, with the
            gradients of the whole batch (dropout included: each
            mini-batch's replay draws its first run's masks). The columns'
            replays share one backward, so under DDP the gradients are
            all-reduced once per step, whatever the number of mini-batches
            on each rank. Under ``MatryoshkaLoss`` the columns are
            embedded once, at full width, for all its widths.
        gather_distributed: score each rank's queries against all ranks'
            candidates (see `info_nce`): under DDP, the gradients of one
            process on the whole batch.
        **options: `info_nce`'s keyword options: ``directions``,
            ``partition``, ``symmetric``, ``hardness_mode``,
            ``hardness_strength``, ``false_negative_margin``,
            ``margin_strategy``, ``decoupled``, ``false_negative_rate``,
            ``hard_negative_beta``, ``in_batch_negatives``, ``normalize``,
            ``chunk_size``.

    Shape:
        - sentence_features: C >= 2 columns of B texts each (tokenized).
        - labels: None, or (B,) integer labels (`info_nce`'s).
        - output: scalar.

    Raises:
        TypeError: an unknown option, or a setting of the wrong type.
        ValueError: an option out of its range, or options that do not fit
            together (at construction, naming them); fewer than two columns
            (forward).

    Examples:
        >>> from sentence_transformers import SentenceTransformer
        >>> from sentence_transformers.sentence_transformer import modules
        >>> from sentence_transformers.sentence_transformer.modules.tokenizer import (
        ...     WhitespaceTokenizer,
        ... )
        >>> words = "a cat dog sat ran on the mat".split()
        >>> embedding = modules.WordEmbeddings(WhitespaceTokenizer(words), torch.randn(8, 16))
        >>> model = SentenceTransformer(modules=[embedding, modules.Pooling(16)], device="cpu")
        >>> loss_fn = InfoNCELoss(model, temperature=0.05, hardness_mode="hard_negatives",
        ...                       hardness_strength=5.0)
        >>> columns = [["a cat sat", "the dog ran"], ["a cat", "a dog"], ["the mat", "on a mat"]]
        >>> features = [model.preprocess(texts) for texts in columns]
        >>> loss_fn(features).shape
        torch.Size([])
    """

    def __init__(
        self,
        model: SentenceTransformer,
        *,
        temperature: float = 0.05,
        guide: SentenceTransformer | None = None,
        mini_batch_size: int | None = None,
        gather_distributed: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"InfoNCELoss got unknown option(s) {unknown}; the options of info_nce it "
                f"takes are {list(OPTIONS)}"
            )
        if mini_batch_size is not None and (
            isinstance(mini_batch_size, bool)
            or not isinstance(mini_batch_size, int)
            or mini_batch_size <= 0
        ):
            raise ValueError(
                f"mini_batch_size must be None or a positive int, got {mini_batch_size!r}"
            )
        if guide is not None and options.get("false_negative_margin") is None:
            raise ValueError(
                "guide= filters false negatives by a margin: give false_negative_margin= too "
                "(GISTEmbedLoss's is 0.0), got guide and no margin"
            )
        self.model = model
        self.guide = guide
        self.temperature = temperature
        self.mini_batch_size = mini_batch_size
        self.gather_distributed = gather_distributed
        self.options = dict(options)
        self._check_options()
        self._retokenize = guide is not None and _tokenizers_differ(model, guide)
        # Kept: the trainer may replace the model by its DDP wrapper, which has none.
        self._tokenizer = model.tokenizer
        if self._retokenize and not hasattr(model.tokenizer, "batch_decode"):
            raise ValueError(
                "guide= has another tokenizer than the model: the texts are decoded from the "
                "model's input ids and tokenized again, which needs a transformers tokenizer "
                f"(batch_decode); the model's is a {type(model.tokenizer).__name__}"
            )

    def _check_options(self) -> None:
        """Every setting through `info_nce`'s own checks, on two tiny rows with a negative.

        The rows are fixed values: the check draws nothing from the global
        random generator.
        """
        values = torch.linspace(-1.0, 1.0, 12)
        query, key, negatives = (
            values[:6].view(2, 3),
            values[6:].view(2, 3),
            values[:6].view(2, 1, 3),
        )
        guide = None
        if self.guide is not None:
            guide = (values[:4].view(2, 2), values[4:8].view(2, 2), values[8:].view(2, 1, 2))
        info_nce(
            query,
            key,
            negatives,
            temperature=self.temperature,
            negative_mode="shared",
            gather_distributed=False,
            guide=guide,
            **self.options,
        )
        if not isinstance(self.gather_distributed, bool):
            raise TypeError(
                f"gather_distributed must be a bool, got {type(self.gather_distributed).__name__}"
            )

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(
                "InfoNCELoss needs at least two columns (query, positive[, negatives...]), "
                f"got {len(features)}"
            )
        query, key, *negatives = self._embed(self.model, features)
        guide = None
        if self.guide is not None:
            with torch.no_grad():
                found = self._embed(self.guide, self._guide_features(features))
            guide = (found[0], found[1], *((torch.stack(found[2:], dim=1),) if negatives else ()))
        loss: Tensor = info_nce(
            query,
            key,
            torch.stack(negatives, dim=1) if negatives else None,  # (B, C - 2, D)
            temperature=self.temperature,
            negative_mode="shared" if negatives else "unpaired",
            labels=labels,
            gather_distributed=self.gather_distributed,
            guide=guide,
            **self.options,
        )
        return loss

    def _embed(self, model: nn.Module, features: list[dict[str, Tensor]]) -> list[Tensor]:
        """Each column's (B, D) embeddings: merged forwards as MNRL's, or mini-batches."""
        if self.mini_batch_size is None:
            return embed_columns(model, features)
        matryoshka = getattr(model, "forward", None)
        # One backward replays every column: under DDP, one all-reduce per
        # step. Without gradients (a frozen guide, evaluation) nothing is kept.
        chunk_size = self.mini_batch_size
        if not isinstance(matryoshka, ForwardDecorator):
            return cached_embeddings(_SentenceEmbedding(model), features, chunk_size=chunk_size)
        # MatryoshkaLoss calls the loss once per width. The columns are
        # embedded once, at full width, by the model's own forward (so that
        # the replays in backward see full-width outputs too), and shrunk
        # for each width as its decorator shrinks them.
        if matryoshka.cache_dim is None or matryoshka.cache_dim == matryoshka.dim:
            encoder = _SentenceEmbedding(model, forward=matryoshka.fn)
            matryoshka.cache.append(cached_embeddings(encoder, features, chunk_size=chunk_size))
            matryoshka.cache_dim = matryoshka.dim
        full: list[Tensor] = matryoshka.cache[matryoshka.idx]
        matryoshka.idx += 1
        width: int = matryoshka.dim  # type: ignore[assignment]  # set before each call
        return [shrink(embeddings, width) for embeddings in full]

    def _guide_features(self, features: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The columns as the guide takes them: the texts again, through its own tokenizer."""
        if not self._retokenize:
            return features
        assert self.guide is not None
        texts = [
            self._tokenizer.batch_decode(f["input_ids"], skip_special_tokens=True) for f in features
        ]
        device = next(self.guide.parameters()).device
        return [
            {
                k: v.to(device) if isinstance(v, Tensor) else v
                for k, v in self.guide.preprocess(t).items()
            }
            for t in texts
        ]

    def get_config_dict(self) -> dict[str, Any]:
        """The settings, for the model card."""
        return {
            "temperature": self.temperature,
            "mini_batch_size": self.mini_batch_size,
            "gather_distributed": self.gather_distributed,
            "guide": None if self.guide is None else type(self.guide).__name__,
            **self.options,
        }

    @property
    def citation(self) -> str:
        """The paper of the configured recipe: GISTEmbed, GTE, or InfoNCE."""
        if self.options.get("false_negative_margin") is not None:
            return _GIST
        directions = self.options.get("directions")
        joint = self.options.get("partition", "joint") == "joint"
        if directions is not None and len(directions) > 1 and joint:
            return _GTE
        return _INFO_NCE


def _tokenizers_differ(model: SentenceTransformer, guide: SentenceTransformer) -> bool:
    """Whether the guide needs the texts tokenized again (as GISTEmbedLoss decides it)."""
    model_vocab = getattr(model.tokenizer, "vocab", None)
    guide_vocab = getattr(guide.tokenizer, "vocab", None)
    shorter = (guide.max_seq_length or 0) < (model.max_seq_length or 0)
    return bool(model_vocab != guide_vocab or shorter)


def _without_trailing_padding(features: dict[str, Any]) -> dict[str, Any]:
    """A mini-batch's features cut to its longest sequence, as the cached losses cut them.

    A tokenizer pads the whole column to its longest text; a mini-batch of
    shorter texts is embedded at its own width. Padding at the start (left
    padding) is kept, as it sets positions.
    """
    mask = features.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return features
    active = mask.bool()
    expansion = features.get("query_expansion_positions")  # scored though masked (ColBERT)
    if isinstance(expansion, Tensor) and expansion.shape == mask.shape:
        active = active | expansion.bool()
    columns = active.any(dim=0).nonzero()
    width = mask.shape[1]
    end = int(columns.max()) + 1 if len(columns) else width
    if end == width:
        return features
    return {
        k: v[:, :end] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == width else v
        for k, v in features.items()
    }
