"""Trained byte-level BPE: round trips, determinism, caching, HF tokenizer.json files, errors."""

import json
import os

import pytest
import tokenizers as hf_tokenizers  # noqa: E402, F401  (the dev extra installs it; no silent skip)
from conftest import assert_one_line_error, run_jaxlm

from jaxlm import data as data_lib  # noqa: E402
from jaxlm import tokenizers  # noqa: E402
from jaxlm.errors import JaxlmError  # noqa: E402

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
          * 40).encode()


@pytest.fixture(scope="module")
def tok():
  return tokenizers.make_tokenizer("bpe", CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", [
    "Speak, speak.", "", "héllo wörld", "emoji 🤖🚀 and 中文 and\ttabs\n\n  spaces ",
    "\x00 control \x7f", "a" * 1000,
])
def test_encode_decode_round_trips_any_utf8(tok, text):
  ids = tok.encode(text)
  assert ids.dtype.name == "int32" and (ids < tok.vocab_size).all()
  assert tok.decode(ids) == text


def test_merges_make_the_corpus_shorter_than_bytes(tok):
  assert tok.vocab_size == 300
  text = CORPUS.decode()
  assert len(tok.encode(text)) < len(CORPUS) / 2


def test_ids_ending_inside_a_character_decode_to_a_replacement_char(tok):
  ids = tok.encode("🤖")  # Four UTF-8 bytes; the corpus never saw it, so byte tokens.
  assert len(ids) == 4
  assert tok.decode(ids[:2]) == "\ufffd"  # A truncated character: one replacement, no error.
  assert tok.decode(list(ids[:2]) + list(tok.encode("ok"))) == "\ufffdok"
  assert set(tok.decode(ids[1:])) == {"\ufffd"}  # Continuation bytes without a lead byte.


def test_training_twice_gives_the_same_tokenizer(tok):
  again = tokenizers.make_tokenizer("bpe", CORPUS, vocab_size=300)
  assert json.dumps(again.to_json()) == json.dumps(tok.to_json())


def test_json_round_trip_and_hf_tokenizer_json_file(tok, tmp_path):
  path = str(tmp_path / "tokenizer.json")
  tokenizers.save(tok, path)
  loaded = tokenizers.load(path)
  assert loaded.kind == "bpe" and loaded.vocab_size == tok.vocab_size
  assert list(loaded.encode("hear me 🤖")) == list(tok.encode("hear me 🤖"))
  hf_path = str(tmp_path / "hf_tokenizer.json")
  tok.hf.save(hf_path)  # Hugging Face's own format, as in a model repository.
  hf = tokenizers.make_tokenizer(hf_path, b"")
  assert list(hf.encode("hear me 🤖")) == list(tok.encode("hear me 🤖"))


def test_dataset_trains_once_and_the_cache_key_has_the_vocab_size(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_bytes(CORPUS)
  cache = str(tmp_path / "cache")
  a = data_lib.load_dataset(str(corpus), "bpe", val_fraction=0.1, block_size=8, cache_dir=cache,
                            vocab_size=280)
  b = data_lib.load_dataset(str(corpus), "bpe", val_fraction=0.1, block_size=8, cache_dir=cache,
                            vocab_size=300)
  assert (a.tokenizer.vocab_size, b.tokenizer.vocab_size) == (280, 300)
  assert len(a.train) > len(b.train)
  assert sorted(f for f in os.listdir(cache) if f.endswith(".json"))[0].endswith(".bpe280.json")
  again = data_lib.load_dataset(str(corpus), "bpe", val_fraction=0.1, block_size=8,
                                cache_dir=cache, vocab_size=280)
  assert (again.train == a.train).all()
  assert json.dumps(again.tokenizer.to_json()) == json.dumps(a.tokenizer.to_json())


def test_too_small_vocab_is_a_clear_error():
  with pytest.raises(JaxlmError, match="too small for byte-level BPE"):
    tokenizers.make_tokenizer("bpe", CORPUS, vocab_size=100)


def test_vocab_mismatch_with_the_model_is_a_one_line_error(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_bytes(CORPUS)
  proc = run_jaxlm("train", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "run"),
                   f"--config.data.path={corpus}", "--config.data.tokenizer=bpe",
                   "--config.data.vocab_size=300", "--config.model.vocab_size=280",
                   f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert_one_line_error(proc, "model.vocab_size=280", "(300)")
