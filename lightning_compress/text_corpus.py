"""The download-free corpus of :mod:`lightning_compress.demo_text`: standard-library docstrings as sentences.

The docstrings of the public functions, classes and methods of :data:`STDLIB_MODULES`, split into
sentences and filtered (6 to 40 words, letters mostly, no code, no duplicates); a deterministic split
into training and held-out sentences; paraphrases of them and a retrieval score. Plain Python and
torch (no Lightning, no transformers); :mod:`lightning_compress.demo_text` re-exports every name.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_compress.errors import check_number

__all__ = [
    "STDLIB_MODULES",
    "WORD",
    "TextSplits",
    "paraphrase_pairs",
    "retrieval_top1",
    "stdlib_sentences",
    "text_splits",
]

STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "ftplib", "functools", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox",
    "multiprocessing", "numbers", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "sched", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "ssl", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
)  # fmt: skip
"""Standard-library modules whose docstrings make the corpus (those missing on a platform are skipped)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
"""A word: a letter, then letters, apostrophes and hyphens (the corpus filter; ``demo_text.HashTokenizer``)."""
_CODEISH = re.compile(r"[=<>{}\[\]|\\`@#$%^*~]|\.\w+\(|\w_\w|\(\)|::|>>>|\bself\b|\bdef\b|\breturn\b")


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # pragma: no cover - a module missing on this platform
        return []
    with warnings.catch_warnings():  # reading deprecated aliases (typing.io) warns
        warnings.simplefilter("ignore")
        return _module_docstrings(module)


def _module_docstrings(module: Any) -> list[str]:
    texts = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        texts.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if not attr.startswith("_"):
                    texts.append(inspect.getdoc(getattr(obj, attr, None)) or "")
    return texts


def _clean_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.startswith((" ", "\t")) or ">>>" in paragraph:
            continue
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if not (min_words <= len(words) <= max_words) or not sentence[0].isupper() or sentence[-1] != ".":
                continue
            if _CODEISH.search(sentence) or len(WORD.findall(sentence)) < 0.8 * len(words):
                continue
            out.append(sentence)
    return out


def stdlib_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Every sentence of the corpus (see the module docstring), deduplicated, in module order.

    Example:
        >>> sentences = stdlib_sentences()
        >>> len(sentences) > 1000, all(s.endswith(".") for s in sentences)
        (True, True)
    """
    seen: set[str] = set()
    out = []
    for module_name in STDLIB_MODULES:
        for text in _docstrings(module_name):
            for sentence in _clean_sentences(text, min_words, max_words):
                if sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


@dataclass(frozen=True)
class TextSplits:
    """Training and held-out sentences (disjoint)."""

    train: list[str]
    held_out: list[str]


def text_splits(held_out: int = 256, seed: int = 0, sentences: Sequence[str] | None = None) -> TextSplits:
    """A deterministic split: ``held_out`` sentences (a fixed random sample) and the rest for training.

    Example:
        >>> splits = text_splits(held_out=100)
        >>> len(splits.held_out), set(splits.train) & set(splits.held_out)
        (100, set())
    """
    pool = list(stdlib_sentences() if sentences is None else sentences)
    check_number("held_out", held_out, low=1, high=max(1, len(pool) - 1), integer=True)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:held_out])
    rest = sorted(order[held_out:])
    return TextSplits([pool[i] for i in rest], [pool[i] for i in held])


def _perturb(sentence: str, rng: random.Random) -> str:
    words = sentence.rstrip(".").split()
    kind = rng.randrange(3)
    if kind == 0 and len(words) > 4:  # drop one word (not the first)
        del words[rng.randrange(1, len(words))]
    elif kind == 1 and len(words) > 3:  # swap two neighbours
        i = rng.randrange(1, len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    else:  # no punctuation, lower case
        words = [re.sub(r"[^\w'-]", "", w).lower() for w in words]
    return " ".join(w for w in words if w) + ("." if kind != 2 else "")


def paraphrase_pairs(sentences: Sequence[str], seed: int = 0, strength: int = 1) -> list[tuple[str, str]]:
    """``(sentence, paraphrase)`` for each sentence, by ``strength`` perturbations in a row.

    Each perturbation drops a word, swaps two neighbours, or removes punctuation and case.

    Example:
        >>> paraphrase_pairs(["The quick brown fox jumps over the lazy dog."], seed=1)[0][1]
        'The quick fox jumps over the lazy dog.'
    """
    check_number("strength", strength, low=1, integer=True)
    rng = random.Random(seed)
    out = []
    for s in sentences:
        p = s
        for _ in range(strength):
            p = _perturb(p, rng)
        out.append((s, p))
    return out


def retrieval_top1(originals: Tensor, paraphrases: Tensor) -> float:
    """Fraction of paraphrase embeddings whose nearest original (cosine) is their own (row ``i`` to row ``i``).

    Example:
        >>> retrieval_top1(torch.eye(3), torch.eye(3) + 0.1)
        1.0
    """
    a = F.normalize(originals.float(), dim=-1)
    b = F.normalize(paraphrases.float(), dim=-1)
    best = (b @ a.T).argmax(dim=1)
    return float((best == torch.arange(len(best))).float().mean())
