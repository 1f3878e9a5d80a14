"""Data: corpus reading, tokenizers, the token cache, and batches as pure functions of the step."""

import json
import os

import numpy as np
import pytest

from jaxlm import data as data_lib
from jaxlm import tokenizers
from jaxlm.errors import JaxlmError


def test_shipped_corpus_is_tiny_shakespeare():
  raw, name = data_lib.read_corpus("")
  assert len(raw) == 1_115_394 and raw.startswith(b"First Citizen:")
  assert "tinyshakespeare" in name


def test_char_tokenizer_round_trip_and_vocab():
  text = "Hello, wörld! ✓ 😀\nnew line"
  tok = tokenizers.make_tokenizer("char", text.encode())
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.vocab_size == len(set(text))
  assert list(tok.chars) == sorted(set(text))
  again = tokenizers.from_json(json.loads(json.dumps(tok.to_json())))
  np.testing.assert_array_equal(again.encode(text), ids)


def test_char_tokenizer_names_unknown_characters():
  tok = tokenizers.make_tokenizer("char", b"abc")
  with pytest.raises(JaxlmError, match=r"'xz'"):
    tok.encode("abxcz")


def test_byte_tokenizer_round_trips_any_text():
  tok = tokenizers.ByteTokenizer()
  text = "naïve ☃ 😀"
  ids = tok.encode(text)
  assert ids.max() < 256 and len(ids) == len(text.encode())
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(b"\xff\xfeab")) == "\ufffd\ufffdab"  # Invalid bytes survive.


def test_shakespeare_vocab_is_65_chars():
  ds = data_lib.load_dataset("", "char", val_fraction=0.1, block_size=64)
  assert ds.tokenizer.vocab_size == 65
  assert len(ds.train) + len(ds.val) == 1_115_394
  assert len(ds.val) == 111_539  # int(0.1 * n): the last 10% is validation.
  text = ds.tokenizer.decode(ds.train[:14])
  assert text == "First Citizen:"


def test_token_cache_is_written_once_and_reused(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text("to be or not to be " * 50)
  cache = tmp_path / "cache"
  a = data_lib.load_dataset(str(corpus), "char", val_fraction=0.1, block_size=8,
                            cache_dir=str(cache))
  files = sorted(os.listdir(cache))
  assert [f.rsplit(".", 1)[1] for f in files] == ["bin", "json"]
  meta = json.loads((cache / files[1]).read_text())
  assert meta["n_tokens"] == 950 and meta["dtype"] == "uint16"
  mtime = os.path.getmtime(cache / files[0])
  b = data_lib.load_dataset(str(corpus), "char", val_fraction=0.1, block_size=8,
                            cache_dir=str(cache))
  assert os.path.getmtime(cache / files[0]) == mtime
  assert isinstance(b.train, np.memmap)
  np.testing.assert_array_equal(a.train, b.train)


def test_glob_concatenates_files_in_sorted_order(tmp_path):
  (tmp_path / "b.txt").write_text("bbbb" * 20)
  (tmp_path / "a.txt").write_text("aaaa" * 20)
  raw, _ = data_lib.read_corpus(str(tmp_path / "*.txt"))
  assert raw == b"a" * 80 + b"b" * 80


def test_batch_is_a_pure_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.uint16)
  kw = dict(seed=3, batch_size=8, block_size=16)
  a = data_lib.get_batch(tokens, step=5, **kw)
  b = data_lib.get_batch(tokens, step=5, **kw)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert a["inputs"].shape == (8, 16) and a["inputs"].dtype == np.int32
  np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])  # Shifted by one.
  c = data_lib.get_batch(tokens, step=6, **kw)
  assert not np.array_equal(a["inputs"], c["inputs"])
  d = data_lib.get_batch(tokens, step=5, stream=data_lib.EVAL_VAL_STREAM, **kw)
  assert not np.array_equal(a["inputs"], d["inputs"])


def test_processes_get_disjoint_rows_of_the_same_global_batch():
  tokens = np.arange(10_000, dtype=np.uint16)
  kw = dict(seed=0, step=7, batch_size=8, block_size=16)
  whole = data_lib.get_batch(tokens, **kw)["inputs"]
  parts = [data_lib.get_batch(tokens, process_index=i, process_count=4, **kw)["inputs"]
           for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(JaxlmError, match="not divisible"):
    data_lib.get_batch(tokens, process_count=3, **kw)


def test_missing_corpus(tmp_path):
  with pytest.raises(JaxlmError, match="corpus not found"):
    data_lib.load_dataset(str(tmp_path / "nope.txt"), "char", val_fraction=0.1, block_size=8)


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(JaxlmError, match="corpus is empty"):
    data_lib.load_dataset(str(tmp_path / "empty.txt"), "char", val_fraction=0.1, block_size=8)


def test_corpus_shorter_than_context(tmp_path):
  (tmp_path / "short.txt").write_text("x" * 100)
  with pytest.raises(JaxlmError, match="corpus too short.*block_size=64"):
    data_lib.load_dataset(str(tmp_path / "short.txt"), "char", val_fraction=0.1, block_size=64)


def test_non_utf8_with_char_tokenizer_says_use_byte(tmp_path):
  (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfedef" * 100)
  with pytest.raises(JaxlmError, match="not valid UTF-8.*data.tokenizer=byte"):
    data_lib.load_dataset(str(tmp_path / "bin.txt"), "char", val_fraction=0.1, block_size=8)
  ds = data_lib.load_dataset(str(tmp_path / "bin.txt"), "byte", val_fraction=0.1, block_size=8)
  assert ds.tokenizer.vocab_size == 256 and int(ds.train[3]) == 0xFF
