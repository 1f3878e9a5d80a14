"""Config validation: each impossible value is one clear error, before anything is built."""

import pytest
from conftest import load_config

from jaxlm import config as config_lib
from jaxlm.errors import JaxlmError


@pytest.mark.parametrize("key, value, message", [
    ("train.batch_size", 0, "train.batch_size must be >= 1"),
    ("train.grad_accum", 5, "not divisible by train.grad_accum"),
    ("model.d_model", 30, "not divisible by model.n_head"),
    ("model.block_size", 0, "block_size must be >= 1"),
    ("data.tokenizer", "words", "unknown data.tokenizer"),
    ("optim.name", "adagrad", "unknown optim.name"),
    ("mesh.rules", "magic", "unknown mesh.rules"),
    ("model.family", "mamba", "unknown model.family"),
    ("train.dropout_rng", "mt19937", "unknown train.dropout_rng"),
])
def test_validate_config_rejects_impossible_values(key, value, message):
  cfg = load_config("smoke")
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(JaxlmError, match=message):
    config_lib.validate_config(cfg)
