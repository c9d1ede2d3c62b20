"""The download-free text corpus (standard-library docstrings), its splits, paraphrases and the retrieval score."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.demo_text import (
    HashTokenizer,
    paraphrase_pairs,
    retrieval_top1,
    stdlib_sentences,
    text_splits,
)


def test_corpus_is_prose_deterministic_and_split_disjointly() -> None:
    sentences = stdlib_sentences()
    assert len(sentences) > 1000
    assert len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s.endswith(".") and 6 <= len(s.split()) <= 40 for s in sentences)
    assert not any(">>>" in s or "()" in s or "=" in s for s in sentences)
    assert stdlib_sentences() == sentences
    a, b = text_splits(held_out=50, seed=3), text_splits(held_out=50, seed=3)
    assert a == b and len(a.held_out) == 50 and not set(a.train) & set(a.held_out)
    assert sorted(a.train + a.held_out) == sorted(sentences)
    assert text_splits(held_out=50, seed=4).held_out != a.held_out


def test_paraphrases_are_perturbed_copies() -> None:
    sentences = text_splits(held_out=40).held_out
    pairs = paraphrase_pairs(sentences, seed=0, strength=2)
    assert [s for s, _ in pairs] == sentences
    assert sum(p != s for s, p in pairs) >= 38
    for s, p in pairs:  # at most two words lost
        assert len(s.split()) - 2 <= len(p.split()) <= len(s.split())


def test_retrieval_top1_counts_own_nearest() -> None:
    originals = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.9], [1.0, 1.1]])  # the second is nearest to the third original
    assert retrieval_top1(originals, queries) == pytest.approx(2 / 3)


def test_hash_tokenizer_pads_and_cuts() -> None:
    ids = HashTokenizer(50)(["One two three four.", "One."], max_length=4)
    assert ids.shape == (2, 4) and ids[0, 0] == 1 and ids[1, 2:].eq(0).all()
    assert ids[0, 1] == ids[1, 1]  # the same word, the same id
    assert ((ids >= 0) & (ids < 50)).all()
