"""Hugging Face import/export: logit parity with transformers both ways, and bad input errors."""

import json
import os

# These tests need the `hf` extra (README's test command installs it). A missing package is a
# collection error, not a silent skip.
import jax.numpy as jnp  # noqa: E402
import numpy as np
import pytest
import safetensors  # noqa: E402, F401
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import assert_one_line_error, run_jaxlm

from jaxlm import hf  # noqa: E402
from jaxlm import model as model_lib  # noqa: E402
from jaxlm.errors import JaxlmError  # noqa: E402

V, T = 96, 32


def gpt2():
  cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=4,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                bos_token_id=0, eos_token_id=0)
  return transformers.GPT2LMHeadModel(cfg)


def llama(tie=False):
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=80,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=T,
                                 rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                 bos_token_id=0, eos_token_id=0)
  return transformers.LlamaForCausalLM(cfg)


def save(model, path, **kwargs):
  torch.manual_seed(0)
  with torch.no_grad():
    # Random weights well away from init (norm scales around 1), so every tensor matters.
    for name, p in model.named_parameters():
      scale = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0
      p.copy_(torch.randn_like(p) * 0.2 + scale)
  model.eval()
  model.save_pretrained(str(path), **kwargs)
  return model


TOKENS_BxL = np.random.default_rng(0).integers(0, V, size=(2, T)).astype(np.int64)


def hf_logits(model):
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS_BxL)).logits.float().numpy()


def jaxlm_logits(workdir):
  mcfg, params = hf.load_workdir(str(workdir))
  return np.asarray(model_lib.make_model(mcfg).apply({"params": params},
                                                     jnp.asarray(TOKENS_BxL, jnp.int32)))


@pytest.mark.parametrize("make, kwargs", [
    (gpt2, {}),
    (llama, {}),
    (lambda: llama(tie=True), {}),
    (llama, {"max_shard_size": "20KB"}),  # Sharded: model.safetensors.index.json.
])
def test_import_and_export_keep_the_logits(tmp_path, make, kwargs):
  src = save(make(), tmp_path / "hf", **kwargs)
  assert os.path.exists(tmp_path / "hf" / hf.INDEX) == bool(kwargs)
  want = hf_logits(src)
  hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "w"))
  got = jaxlm_logits(tmp_path / "w")
  print(f"max abs logit diff, transformers vs jaxlm: {np.abs(got - want).max():.3g}")
  assert np.abs(got - want).max() <= 1e-4
  hf.export_hf(str(tmp_path / "w"), str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  back.eval()
  np.testing.assert_array_equal(hf_logits(back), want)


def test_bfloat16_checkpoint_imports(tmp_path):
  src = save(llama(), tmp_path / "f32")
  src.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
  # The same bf16-rounded weights in a float32 model (src.float() would keep the RoPE
  # frequencies that .to(bfloat16) rounded).
  ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
  want = hf_logits(ref.eval())
  hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "w"))
  assert np.abs(jaxlm_logits(tmp_path / "w") - want).max() <= 1e-4


def test_gqa_import_uses_the_kv_heads(tmp_path):
  save(llama(), tmp_path / "hf")
  family, mcfg, params = hf.read_hf(str(tmp_path / "hf"))
  assert family == "llama" and mcfg.kv_heads == 2 and not mcfg.bias
  assert params["h_0"]["attn"]["key_value"]["kernel"].shape == (32, 2, 2, 8)


def test_tokenizer_json_is_imported(tmp_path):
  import tokenizers
  save(gpt2(), tmp_path / "hf")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(["hello world"] * 10, tokenizers.trainers.BpeTrainer(
      vocab_size=260, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / "hf" / "tokenizer.json"))
  hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "w"))
  with open(tmp_path / "w" / "tokenizer.json") as f:
    assert json.load(f)["kind"] == "bpe"
  with open(tmp_path / "w" / "config.json") as f:
    assert json.load(f)["data"]["tokenizer"].endswith("tokenizer.json")


def test_unsupported_architecture_is_named(tmp_path):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps(
      {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
  with pytest.raises(JaxlmError, match="unsupported Hugging Face architecture.*MistralForCausalLM"):
    hf.read_hf(str(tmp_path / "hf"))


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  save(llama(), tmp_path / "hf")
  path = str(tmp_path / "hf" / "model.safetensors")
  tensors = load_file(path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(JaxlmError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.read_hf(str(tmp_path / "hf"))


def test_mismatched_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  save(llama(), tmp_path / "hf")
  path = str(tmp_path / "hf" / "model.safetensors")
  tensors = load_file(path)
  tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((32, 81), np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(JaxlmError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape "
                     r"\[32, 81\]"):
    hf.read_hf(str(tmp_path / "hf"))


def test_cli_convert_round_trip_and_one_line_errors(tmp_path):
  save(gpt2(), tmp_path / "hf")
  proc = run_jaxlm("convert", "--from_hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "w"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "imported a gpt2" in proc.stdout
  proc = run_jaxlm("convert", "--to_hf", "--workdir", str(tmp_path / "w"), "--out",
                   str(tmp_path / "out"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.exists(tmp_path / "out" / "config.json")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
  assert_one_line_error(run_jaxlm("convert", "--from_hf", str(tmp_path / "bad"), "--workdir",
                                  str(tmp_path / "w2")), "BertModel")


def test_imported_workdir_refuses_resume_and_changes_nothing(tmp_path):
  save(gpt2(), tmp_path / "hf")
  hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "w"))
  before = (tmp_path / "w" / "config.json").read_bytes()
  from jaxlm import train
  cfg = train.ml_collections.ConfigDict(json.loads(before))
  with pytest.raises(JaxlmError, match="imported params without optimizer state.*init_from"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert (tmp_path / "w" / "config.json").read_bytes() == before
