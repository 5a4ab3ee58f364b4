"""mmops.data: the embedded corpus, the notebooks' dataset and split, and clear errors for bad corpora."""
import os

import pytest
import torch

from mmops import data as D

NAMES_TXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "names.txt")


def test_default_corpus_is_embedded_names():
    words = D.default_words()
    assert len(words) > 5000 and len(set(words)) == len(words)
    assert words[0] == "mary" and all(w.isalpha() and w.islower() for w in words)
    assert D.load_words(None) == words


@pytest.mark.skipif(not os.path.isfile(NAMES_TXT), reason="../shared/data/names.txt is not on this machine")
def test_names_txt_split_sizes_match_the_notebook():
    words = D.load_words(NAMES_TXT)
    assert len(words) == 32033
    s = D.make_splits(words, block_size=3)
    assert tuple(s.train[0].shape) == (182625, 3) and tuple(s.train[1].shape) == (182625,)
    assert tuple(s.val[0].shape) == (22655, 3)
    assert tuple(s.test[0].shape) == (22866, 3)
    assert s.vocab.itos[0] == "." and "".join(s.vocab.itos[1:]) == "abcdefghijklmnopqrstuvwxyz"


def test_build_dataset_windows():
    v = D.Vocab.from_words(["ab", "b"])
    X, Y = D.build_dataset(["ab"], 2, v)
    assert X.tolist() == [[0, 0], [0, 1], [1, 2]] and Y.tolist() == [1, 2, 0]


def test_build_sequences_pads_targets_with_ignore_index():
    v = D.Vocab.from_words(["ab", "b"])
    X, Y = D.build_sequences(["ab", "b"], v)
    assert X.tolist() == [[0, 1, 2], [0, 2, 0]]
    assert Y.tolist() == [[1, 2, 0], [2, 0, -100]]


def test_split_is_seeded_shuffle():
    import random

    words = [f"w{chr(97 + i % 26)}{'x' * (i % 5)}" for i in range(100)]
    ref = list(words)
    random.seed(42)
    random.shuffle(ref)
    s = D.make_splits(words, 3)
    assert s.words[0] == ref[:80] and s.words[1] == ref[80:90] and s.words[2] == ref[90:]


@pytest.mark.parametrize("content, match", [
    (b"", "has no words"),
    (b"\n  \n\n", "has no words"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR", "is not text"),
    (b"caf\xe9\n", "is not UTF-8 text"),
    (b"a.b\n", "contains '.'"),
])
def test_bad_corpus_files(tmp_path, content, match):
    p = tmp_path / "corpus.txt"
    p.write_bytes(content)
    with pytest.raises(D.CorpusError, match=match):
        D.load_words(str(p))


def test_missing_file_and_tiny_corpus(tmp_path):
    with pytest.raises(D.CorpusError, match="does not exist"):
        D.load_words(str(tmp_path / "nope.txt"))
    for n in range(1, D.MIN_WORDS):  # 4 words once gave an empty validation split and "val loss 0.0000"
        with pytest.raises(D.CorpusError, match=f"a corpus of {n} words .* at least 6 words"):
            D.make_splits(["ab", "cd", "ef", "gh", "ij"][:n])
    for n in range(D.MIN_WORDS, 40):
        s = D.make_splits([chr(97 + k % 26) * (1 + k // 26) for k in range(n)], block_size=2)
        assert all(len(part) > 0 for part in s.words), n


def test_encode_outside_vocabulary():
    v = D.Vocab.from_words(["abc"])
    assert v.encode("cab") == [3, 1, 2] and v.decode([3, 1, 2]) == "cab"
    with pytest.raises(D.CorpusError, match=r"\['z'\].*not in the vocabulary"):
        v.encode("az")
