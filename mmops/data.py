"""Corpora (one word per line) and the makemore datasets built from them; running text as a character stream
and its minibatches (the d2l RNN chapter's random sampling and sequential partitioning).

The embedded default corpus is the US census first-name lists (1990) shipped by the `names` package on PyPI
(`pip install names`): 5,163 distinct first names, plain ASCII, a fixed file inside a package that installs
from the registry, so nothing is downloaded at run time and every install trains on the same words.
`--data FILE` takes any one-word-per-line file instead, e.g. makemore's names.txt.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CorpusError", "default_words", "load_words", "Vocab", "build_dataset", "Splits", "make_splits",
           "build_sequences", "default_text", "load_text", "preprocess_text", "text_vocab", "encode_text",
           "epoch_minibatches", "batches_per_epoch", "min_stream_length", "TextCorpus", "make_text_corpus"]


class CorpusError(ValueError):
    """A corpus that cannot be used: missing, empty, not text, or a word outside the vocabulary."""


def default_words() -> list[str]:
    """The embedded corpus: female then male first names of the 1990 US census (package `names`), lower-case,
    each name once, in the lists' order (most frequent first)."""
    try:
        import names
    except ImportError as e:  # a dependency of mmops: only a broken install gets here
        raise CorpusError("the default corpus needs the `names` package (pip install names), or pass --data FILE") from e
    words: dict[str, None] = {}
    for key in ("first:female", "first:male"):
        with open(names.FILES[key], encoding="ascii") as f:
            for line in f:
                if line.strip():
                    words.setdefault(line.split()[0].lower(), None)
    return list(words)


def load_words(path: str | None = None) -> list[str]:
    """Words of a corpus file (one per line, blank lines skipped, surrounding whitespace stripped), or the
    embedded default when path is None."""
    if path is None:
        return default_words()
    if not os.path.isfile(path):
        raise CorpusError(f"corpus file {path!r} does not exist (or is not a file)")
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        raise CorpusError(f"corpus file {path!r} is not text (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    words = [w.strip() for w in text.splitlines() if w.strip()]
    if not words:
        raise CorpusError(f"corpus file {path!r} has no words (it is empty or only blank lines)")
    bad = next((w for w in words if "." in w), None)
    if bad is not None:
        raise CorpusError(f"corpus file {path!r}: the word {bad!r} contains '.', which marks a word's end")
    return words


@dataclass
class Vocab:
    """Sorted characters of the corpus with '.' = 0 (start and end of a word), as in the notebooks."""

    itos: list[str]

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocab":
        return cls(["."] + sorted(set("".join(words))))

    @property
    def stoi(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, word: str) -> list[int]:
        stoi = self.stoi
        missing = sorted({ch for ch in word if ch not in stoi})
        if missing:
            raise CorpusError(f"characters {missing} of {word!r} are not in the vocabulary {''.join(self.itos)!r}")
        return [stoi[ch] for ch in word]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


def build_dataset(words: list[str], block_size: int, vocab: Vocab) -> tuple[Tensor, Tensor]:
    """The notebook's context windows: for every character of word + '.', the block_size previous ids."""
    X, Y = [], []
    stoi = vocab.stoi
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X, dtype=torch.long).view(-1, block_size), torch.tensor(Y, dtype=torch.long)


def build_sequences(words: list[str], vocab: Vocab, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The RNN's data: per word, input '.' + word and target word + '.', right-padded to the longest word
    (inputs with '.', targets with ignore_index so that padding adds nothing to the loss). (N, L) each."""
    L = max(len(w) for w in words) + 1
    X = torch.zeros(len(words), L, dtype=torch.long)
    Y = torch.full((len(words), L), ignore_index, dtype=torch.long)
    for i, w in enumerate(words):
        ids = vocab.encode(w)
        X[i, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
        Y[i, : len(ids) + 1] = torch.tensor(ids + [0], dtype=torch.long)
    return X, Y


# The fewest words for which the 80/10/10 split leaves every part non-empty: 0 < int(0.8n) < int(0.9n) < n
# holds for n = 6..9 and, since 0.1n >= 1, for every n >= 10; at n = 5 the validation split is empty.
MIN_WORDS = 6


@dataclass
class Splits:
    vocab: Vocab
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    words: tuple[list[str], list[str], list[str]]


def make_splits(words: list[str], block_size: int = 3, seed: int = 42, sequences: bool = False) -> Splits:
    """The notebooks' split: random.seed(seed); random.shuffle(words); 80% / 10% / 10%. The shuffle uses a
    private random.Random(seed), which draws exactly what random.seed(seed) + random.shuffle draws."""
    if len(words) < MIN_WORDS:
        raise CorpusError(f"a corpus of {len(words)} words leaves an empty train, validation or test split "
                          f"(80/10/10%); it needs at least {MIN_WORDS} words")
    vocab = Vocab.from_words(words)
    words = list(words)
    random.Random(seed).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    parts = (words[:n1], words[n1:n2], words[n2:])
    if sequences:
        data = [build_sequences(p, vocab) for p in parts]
    else:
        data = [build_dataset(p, block_size, vocab) for p in parts]
    return Splits(vocab, data[0], data[1], data[2], parts)


# ---------------------------------------------------------------------------------------------------------
# Running text: the character stream of the Dive into Deep Learning RNN chapter, and its two minibatch schemes
# ---------------------------------------------------------------------------------------------------------
PREPROCESS = ("none", "d2l")
SAMPLING = ("sequential", "random")
UNK = "<unk>"


def default_text() -> str:
    """The embedded running text: the Python documentation's topic pages (`help('assert')`, ...) that the
    standard library ships in pydoc_data.topics, in sorted topic order, separated by blank lines: real English
    prose (with some code), present wherever Python is, never downloaded. About 465,000 characters; the
    exact text follows the Python version."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise CorpusError("the default text needs the standard library's pydoc_data package; pass a FILE to "
                          "--text") from e
    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics))


def load_text(path: str | None = None) -> str:
    """The characters of a UTF-8 text file (the embedded default when path is None)."""
    if path is None:
        return default_text()
    if not os.path.isfile(path):
        raise CorpusError(f"text file {path!r} does not exist (or is not a file)")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise CorpusError(f"text file {path!r} is empty")
    if b"\x00" in raw:
        raise CorpusError(f"text file {path!r} is not text (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"text file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def preprocess_text(text: str, how: str = "none") -> str:
    """'none': the characters as they are. 'd2l': the book's preprocessing: every run of characters other than
    ASCII letters becomes one space, then lower case (a vocabulary of 26 letters and the space)."""
    if how == "none":
        return text
    if how == "d2l":
        return re.sub("[^A-Za-z]+", " ", text).lower()
    raise ValueError(f"preprocess must be one of {PREPROCESS}, got {how!r}")


def text_vocab(text: str, how: str = "none") -> Vocab:
    """'none': the sorted characters of the text. 'd2l': the book's '<unk>', space and a-z (28 tokens,
    whatever the text holds)."""
    if how == "d2l":
        return Vocab([UNK, " ", *"abcdefghijklmnopqrstuvwxyz"])
    return Vocab(sorted(set(text)))


def encode_text(text: str, vocab: Vocab) -> Tensor:
    """The stream of token ids (int64) of a text whose characters are all in vocab."""
    stoi = vocab.stoi
    try:
        return torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    except KeyError:
        vocab.encode(text)  # raises the CorpusError naming the characters
        raise


def min_stream_length(batch_size: int, num_steps: int) -> int:
    """The fewest tokens that give one minibatch in both schemes whatever the random start offset
    (sequential: up to num_steps skipped, then batch_size rows of num_steps inputs and their next tokens)."""
    return batch_size * num_steps + num_steps + 1


def batches_per_epoch(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Minibatches of one epoch, the same in both schemes and every epoch: the count for the largest start
    offset (the book's count varies by one with the offset drawn; a fixed count makes --steps and resuming
    mid-epoch exact)."""
    per_row = (n_tokens - num_steps - 1) // batch_size
    return per_row // num_steps


def epoch_minibatches(stream: Tensor, batch_size: int, num_steps: int, sampling: str,
                      g: torch.Generator) -> tuple[Tensor, Tensor]:
    """One epoch of (input, target) minibatches of token ids, time-major: X, Y of shape (K, num_steps,
    batch_size); Y is X shifted by one token in the stream. K = batches_per_epoch(...).

    sequential (the book's seq_data_iter_sequential): a random offset in [0, num_steps], the stream cut into
    batch_size rows, minibatch k is columns [k T, (k+1) T) of every row, so row b of minibatch k+1 continues
    row b of minibatch k (a carried hidden state stays meaningful).
    random (seq_data_iter_random): a random offset in [0, num_steps), the stream cut into subsequences of
    num_steps, shuffled; each minibatch is batch_size of them, independent of the previous one.
    Both tensors are built with one gather per epoch; minibatch k is X[k], a contiguous (T, B) view."""
    n, B, T = stream.numel(), batch_size, num_steps
    K = batches_per_epoch(n, B, T)
    if K < 1:
        raise CorpusError(f"a stream of {n} tokens gives no minibatch of {B} x {T}; it needs at least "
                          f"{min_stream_length(B, T)}")
    if sampling == "sequential":
        offset = int(torch.randint(0, T + 1, (), generator=g))
        starts = offset + torch.arange(B) * (K * T)  # row b: [start_b, start_b + K T)
        idx = starts.view(1, 1, B) + (torch.arange(K).view(K, 1, 1) * T + torch.arange(T).view(1, T, 1))
    elif sampling == "random":
        offset = int(torch.randint(0, T, (), generator=g))
        n_sub = (n - offset - 1) // T
        order = torch.randperm(n_sub, generator=g)[: K * B].view(K, 1, B)
        idx = offset + order * T + torch.arange(T).view(1, T, 1)
    else:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    return stream[idx], stream[idx + 1]


@dataclass
class TextCorpus:
    vocab: Vocab
    stream: Tensor  # token ids, int64
    preprocess: str


def make_text_corpus(text: str, preprocess: str = "none") -> TextCorpus:
    text = preprocess_text(text, preprocess)
    vocab = text_vocab(text, preprocess)
    return TextCorpus(vocab, encode_text(text, vocab), preprocess)
