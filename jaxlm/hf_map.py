"""Hugging Face <-> jaxlm names: config.json keys <-> ModelConfig, and the tensor map.

The tensor map lists, for each Hugging Face tensor name, the jaxlm parameter path it becomes
and the two layout changes (to jaxlm, from jaxlm); hf.py streams tensors through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from jaxlm import defaults
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig.
# ---------------------------------------------------------------------------------------------

def _architecture(hf_cfg: dict[str, Any], where: str) -> str:
  names = hf_cfg.get("architectures") or []
  family = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
  if family is None:
    family = {"gpt2": "gpt2", "llama": "llama"}.get(hf_cfg.get("model_type", ""))
  if family is None:
    got = ", ".join(names) or hf_cfg.get("model_type") or "none given"
    raise JaxlmError(f"unsupported Hugging Face architecture in {where}: {got} (jaxlm imports "
                     f"{', '.join(ARCHITECTURES)})")
  return family


def model_config_from_hf(hf_cfg: dict[str, Any], where: str = "config.json"
                         ) -> tuple[str, model_lib.ModelConfig]:
  """(family, ModelConfig) of a Hugging Face config dict; unsupported options are errors."""
  family = _architecture(hf_cfg, where)

  def unsupported(what: str):
    raise JaxlmError(f"unsupported {family} option in {where}: {what}")

  if family == "gpt2":
    act = hf_cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      unsupported(f"activation_function={act!r} (jaxlm's GELU is the tanh approximation)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if hf_cfg.get(flag):
        unsupported(f"{flag}=true")
    if hf_cfg.get("scale_attn_weights", True) is False:
      unsupported("scale_attn_weights=false")
    d = hf_cfg["n_embd"]
    return family, model_lib.ModelConfig(
        vocab_size=hf_cfg["vocab_size"], block_size=hf_cfg["n_positions"],
        n_layer=hf_cfg["n_layer"], n_head=hf_cfg["n_head"], d_model=d,
        d_ff=hf_cfg.get("n_inner") or 4 * d, bias=True,
        tie_embeddings=hf_cfg.get("tie_word_embeddings", True), norm="layernorm",
        norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5), position="learned", mlp="gelu")

  act = hf_cfg.get("hidden_act", "silu")
  if act != "silu":
    unsupported(f"hidden_act={act!r} (jaxlm's SwiGLU uses silu)")
  rope = hf_cfg.get("rope_parameters") or {}
  scaling = hf_cfg.get("rope_scaling") or {}
  rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
  if rope_type not in (None, "default"):
    unsupported(f"rope_type={rope_type!r} (only the default RoPE)")
  d, h = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
  if hf_cfg.get("head_dim") not in (None, d // h):
    unsupported(f"head_dim={hf_cfg['head_dim']} differs from hidden_size / num_attention_heads")
  bias = bool(hf_cfg.get("attention_bias", False))
  if bool(hf_cfg.get("mlp_bias", False)) != bias:
    unsupported("attention_bias != mlp_bias (jaxlm has one model.bias)")
  return family, model_lib.ModelConfig(
      vocab_size=hf_cfg["vocab_size"], block_size=hf_cfg["max_position_embeddings"],
      n_layer=hf_cfg["num_hidden_layers"], n_head=h,
      n_kv_head=hf_cfg.get("num_key_value_heads") or h, d_model=d,
      d_ff=hf_cfg["intermediate_size"], bias=bias,
      tie_embeddings=hf_cfg.get("tie_word_embeddings", False), norm="rmsnorm",
      norm_eps=hf_cfg.get("rms_norm_eps", 1e-6), position="rope",
      rope_theta=rope.get("rope_theta") or hf_cfg.get("rope_theta") or 10000.0, mlp="swiglu")


def inexpressible(mcfg: model_lib.ModelConfig) -> list[str]:
  """The model options of `mcfg` that transformers' GPT-2 and LLaMA cannot compute, each with
  why. model.zero_init_proj is not one: it only changes the init, and the trained weights are
  a plain GPT-2 or LLaMA. A window of at least block_size is full attention, so not one either.
  """
  out = []
  if mcfg.qk_norm:
    out.append("model.qk_norm=True (their attention has no query/key norm)")
  if mcfg.logit_softcap:
    out.append(f"model.logit_softcap={mcfg.logit_softcap:g} (they do not soft-cap logits)")
  if mcfg.logit_mult != 1.0 or mcfg.attention_divisor != math.sqrt(mcfg.head_dim):
    out.append(f"model.parametrization=mup away from its base width (logits x "
               f"{mcfg.logit_mult:g}, attention scores x sqrt(base head dim) / head dim)")
  if mcfg.mlp == "relu2":
    out.append("model.mlp=relu2 (their MLPs are GELU and SwiGLU)")
  if any(0 < w < mcfg.block_size for w in mcfg.layer_windows):
    out.append(f"model.attention_window={mcfg.attention_window!r} (they attend over the whole "
               "context, no sliding window)")
  return out


def family_of(mcfg: model_lib.ModelConfig) -> str:
  """The Hugging Face family whose architecture is exactly `mcfg`'s, or a JaxlmError."""
  if options := inexpressible(mcfg):
    raise JaxlmError("cannot export to Hugging Face: transformers' GPT-2 and LLaMA cannot "
                     f"express {'; '.join(options)}")
  if (mcfg.norm, mcfg.position, mcfg.mlp) == ("layernorm", "learned", "gelu"):
    if not mcfg.bias or mcfg.kv_heads != mcfg.n_head:
      raise JaxlmError("GPT-2 in Hugging Face format needs model.bias=True and no "
                       "grouped-query attention (n_kv_head = 0)")
    return "gpt2"
  if (mcfg.norm, mcfg.position, mcfg.mlp) == ("rmsnorm", "rope", "swiglu"):
    return "llama"
  raise JaxlmError(f"no Hugging Face architecture matches model.norm={mcfg.norm}, "
                   f"model.position={mcfg.position}, model.mlp={mcfg.mlp}: export needs the "
                   "gpt2 or llama combination")


def hf_config(mcfg: model_lib.ModelConfig) -> dict[str, Any]:
  """A Hugging Face config.json dict for `mcfg` (dropout off: these are inference weights)."""
  if family_of(mcfg) == "gpt2":
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": mcfg.vocab_size, "n_positions": mcfg.block_size,
            "n_embd": mcfg.d_model, "n_layer": mcfg.n_layer, "n_head": mcfg.n_head,
            "n_inner": mcfg.ff_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": mcfg.norm_eps, "tie_word_embeddings": mcfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dtype": "float32"}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": mcfg.vocab_size, "hidden_size": mcfg.d_model,
          "intermediate_size": mcfg.ff_dim, "num_hidden_layers": mcfg.n_layer,
          "num_attention_heads": mcfg.n_head, "num_key_value_heads": mcfg.kv_heads,
          "head_dim": mcfg.head_dim, "max_position_embeddings": mcfg.block_size,
          "rms_norm_eps": mcfg.norm_eps, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_theta},
          "rope_theta": mcfg.rope_theta, "attention_bias": mcfg.bias, "mlp_bias": mcfg.bias,
          "tie_word_embeddings": mcfg.tie_embeddings, "dtype": "float32"}


def jaxlm_config(mcfg: model_lib.ModelConfig, family: str, tokenizer_path: str = ""):
  """The base config with the model section set to `mcfg` (written as the workdir's config)."""
  c = defaults.base_config()
  if tokenizer_path:
    c.data.tokenizer = tokenizer_path
  m = c.model
  m.family = family
  for key in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "block_size", "vocab_size",
              "bias", "tie_embeddings", "norm", "norm_eps", "position", "rope_theta", "mlp"):
    m[key] = getattr(mcfg, key)
  return c


# ---------------------------------------------------------------------------------------------
# The tensor map: Hugging Face name -> (jaxlm path, to jaxlm layout, from jaxlm layout).
# ---------------------------------------------------------------------------------------------

def attn_path(i: int, proj: str, leaf: str) -> str:
  """The jaxlm path of a leaf of block i's attention projection, e.g. h_0/attn/query/kernel."""
  return f"{model_lib.block_name(i)}/{model_lib.ATTN}/{proj}/{leaf}"


def mlp_path(i: int, proj: str, leaf: str) -> str:
  """The jaxlm path of a leaf of block i's MLP projection, e.g. h_0/mlp/fc/kernel."""
  return f"{model_lib.block_name(i)}/{model_lib.MLP_SUBLAYER}/{proj}/{leaf}"


def tensor_map(mcfg: model_lib.ModelConfig, family: str) -> list[tuple[str, str, Callable,
                                                                         Callable]]:
  """[(hf name, jaxlm path, hf -> jaxlm, jaxlm -> hf)] for every tensor but fused q/k/v."""
  D, H, K = mcfg.d_model, mcfg.n_head, mcfg.head_dim
  M = model_lib
  same = (lambda x: x, lambda x: x)
  t = (lambda x: x.T, lambda x: x.T)  # torch Linear [out, in] <-> kernel [in, out].
  rows: list[tuple[str, str, Callable, Callable]] = []

  def add(hf: str, path: str, fns: tuple[Callable, Callable]):
    rows.append((hf, path, *fns))

  if family == "gpt2":
    add("transformer.wte.weight", f"{M.TOKEN_EMBED}/embedding", same)
    add("transformer.wpe.weight", f"{M.POSITION_EMBED}/embedding", same)
    for i in range(mcfg.n_layer):
      p, j = f"transformer.h.{i}", M.block_name(i)
      for hf_ln, ln in (("ln_1", M.ATTN_NORM), ("ln_2", M.MLP_NORM)):
        add(f"{p}.{hf_ln}.weight", f"{j}/{ln}/scale", same)
        add(f"{p}.{hf_ln}.bias", f"{j}/{ln}/bias", same)
      # Conv1D weights are already [in, out].
      add(f"{p}.attn.c_proj.weight", attn_path(i, M.ATTN_OUT, "kernel"),
          (lambda x: x.reshape(H, K, D), lambda x: x.reshape(H * K, D)))
      add(f"{p}.attn.c_proj.bias", attn_path(i, M.ATTN_OUT, "bias"), same)
      add(f"{p}.mlp.c_fc.weight", mlp_path(i, M.MLP_IN, "kernel"), same)
      add(f"{p}.mlp.c_fc.bias", mlp_path(i, M.MLP_IN, "bias"), same)
      add(f"{p}.mlp.c_proj.weight", mlp_path(i, M.MLP_OUT, "kernel"), same)
      add(f"{p}.mlp.c_proj.bias", mlp_path(i, M.MLP_OUT, "bias"), same)
    add("transformer.ln_f.weight", f"{M.FINAL_NORM}/scale", same)
    add("transformer.ln_f.bias", f"{M.FINAL_NORM}/bias", same)
  else:
    add("model.embed_tokens.weight", f"{M.TOKEN_EMBED}/embedding", same)
    mlp_projs = (("gate_proj", M.MLP_GATE), ("up_proj", M.MLP_IN), ("down_proj", M.MLP_OUT))
    for i in range(mcfg.n_layer):
      p, j = f"model.layers.{i}", M.block_name(i)
      add(f"{p}.input_layernorm.weight", f"{j}/{M.ATTN_NORM}/scale", same)
      add(f"{p}.post_attention_layernorm.weight", f"{j}/{M.MLP_NORM}/scale", same)
      add(f"{p}.self_attn.o_proj.weight", attn_path(i, M.ATTN_OUT, "kernel"),
          (lambda x: x.T.reshape(H, K, D), lambda x: x.reshape(H * K, D).T))
      for hf_name, name in mlp_projs:
        add(f"{p}.mlp.{hf_name}.weight", mlp_path(i, name, "kernel"), t)
      if mcfg.bias:
        add(f"{p}.self_attn.o_proj.bias", attn_path(i, M.ATTN_OUT, "bias"), same)
        for hf_name, name in mlp_projs:
          add(f"{p}.mlp.{hf_name}.bias", mlp_path(i, name, "bias"), same)
    add("model.norm.weight", f"{M.FINAL_NORM}/scale", same)
  if not mcfg.tie_embeddings:
    add("lm_head.weight", f"{M.HEAD}/kernel", t)
  return rows


def qkv_names(mcfg: model_lib.ModelConfig, family: str, i: int) -> list[str]:
  if family == "gpt2":
    return [f"transformer.h.{i}.attn.c_attn.weight", f"transformer.h.{i}.attn.c_attn.bias"]
  p = f"model.layers.{i}.self_attn"
  names = [f"{p}.{x}_proj.weight" for x in "qkv"]
  return names + ([f"{p}.{x}_proj.bias" for x in "qkv"] if mcfg.bias else [])


def expected_names(mcfg: model_lib.ModelConfig, family: str) -> list[str]:
  names = [row[0] for row in tensor_map(mcfg, family)]
  for i in range(mcfg.n_layer):
    names += qkv_names(mcfg, family, i)
  return names
