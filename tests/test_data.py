import json

import numpy as np
import pytest

from gpt_jax import data
from gpt_jax.errors import DataError
from gpt_jax.tokenizer import CharTokenizer

from conftest import CORPUS


def test_shipped_corpus():
    raw = CORPUS.read_bytes()
    assert len(raw) == 1_115_394
    import hashlib
    assert hashlib.sha256(raw).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_prepare_full_corpus_splits_like_nanogpt(tmp_path):
    ds = data.prepare(CORPUS, tmp_path / "prepared")
    assert ds.tokenizer.vocab_size == 65
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)
    assert ds.train.dtype == np.uint16 and isinstance(ds.train, np.memmap)
    text = CORPUS.read_text()
    assert ds.tokenizer.decode(ds.val[:50]) == text[1_003_854:1_003_904]


def test_prepare_is_reused_and_refreshed(corpus, tmp_path):
    out = tmp_path / "prep"
    data.prepare(corpus, out)
    stamp = (out / "train.bin").stat().st_mtime_ns
    data.prepare(corpus, out)
    assert (out / "train.bin").stat().st_mtime_ns == stamp  # reused
    corpus.write_text(corpus.read_text() + "more text!")
    ds = data.prepare(corpus, out)
    assert json.loads((out / "meta.json").read_text())["train_tokens"] == len(ds.train)
    assert ds.tokenizer.decode(ds.val[-10:]) == "more text!"
    assert not list(out.glob("*.tmp"))


def test_tokenizer_round_trip_and_unknown_characters(tmp_path):
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.decode(tok.encode("hello")) == "hello"
    with pytest.raises(DataError, match=r"2 character\(s\) not in the model's vocabulary: '!', 'Z'"):
        tok.encode("Zhello!")
    tok.save(tmp_path / "tok.json")
    assert CharTokenizer.load(tmp_path / "tok.json") == tok
    assert "pickle" not in (tmp_path / "tok.json").read_text()


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        data.prepare(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        data.prepare(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match="not valid UTF-8: byte 0xff at offset 6"):
        data.prepare(binary)


def test_get_batch_is_pure_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(tokens, seed=1, step=5, batch_size=4, block_size=8)
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int32
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(y[:, -1], x[:, -1] + 1)
    data.get_batch(tokens, seed=1, step=6, batch_size=4, block_size=8)  # whatever came before...
    x2, _ = data.get_batch(tokens, seed=1, step=5, batch_size=4, block_size=8)
    np.testing.assert_array_equal(x, x2)  # ...the same batch
    x3, _ = data.get_batch(tokens, seed=1, step=6, batch_size=4, block_size=8)
    assert not np.array_equal(x, x3)
    x_eval, _ = data.get_batch(tokens, seed=1, step=5, batch_size=4, block_size=8, stream=data.EVAL_STREAM)
    assert not np.array_equal(x, x_eval)
    rows, _ = data.get_batch(tokens, seed=1, step=5, batch_size=4, block_size=8, rows=slice(2, 4))
    np.testing.assert_array_equal(rows, x[2:4])


def test_get_batch_too_short():
    with pytest.raises(DataError, match="too few for block_size 10"):
        data.get_batch(np.arange(10, dtype=np.uint16), 0, 0, 2, 10)


def test_prefetch_order_and_errors():
    assert list(data.prefetch(lambda s: s * s, range(3, 8), depth=2)) == [9, 16, 25, 36, 49]

    def boom(s):
        if s == 2:
            raise DataError("bad step")
        return s

    with pytest.raises(DataError, match="bad step"):
        list(data.prefetch(boom, range(5), depth=2))


def test_no_code_executing_loaders_in_the_package():
    import re

    from conftest import REPO

    for path in list((REPO / "gpt_jax").glob("*.py")) + [REPO / "train.py", REPO / "sample.py"]:
        source = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.|\beval\(|\bexec\(", source), path
