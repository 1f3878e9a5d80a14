"""Hugging Face checkpoints (GPT-2, LLaMA; safetensors) <-> jaxlm workdirs, one tensor at a time.

Import reads config.json and the safetensors file(s) (one file, or shards listed in
model.safetensors.index.json) with `safe_open`, converting each tensor to jaxlm's layout as it
is read, so memory holds one copy of the model plus one tensor. Export restores the jaxlm
params and writes one safetensors shard per block, so at most one block is held twice.

Layouts: torch Linear weights are [out, in] (LLaMA) and GPT-2's Conv1D weights are [in, out];
jaxlm kernels are [in, out] with heads split out (query [D, H, K], key_value [D, 2, G, K],
out [H, K, D]). jaxlm's RoPE uses the same "rotate half" pairing as Hugging Face's LLaMA, so
query and key weights need no permutation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jaxlm import defaults, tokenizers
from jaxlm import model as model_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

PyTree = Any
INSTALL_HINT = "Hugging Face import/export needs safetensors: pip install 'jaxlm[hf]'"
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safetensors():
  try:
    import safetensors
    import safetensors.numpy
  except ImportError:
    raise JaxlmError(INSTALL_HINT) from None
  return safetensors


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


def family_of(mcfg: model_lib.ModelConfig) -> str:
  """The Hugging Face family whose architecture is exactly `mcfg`'s, or a JaxlmError."""
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

def _attn(i: int, proj: str, leaf: str) -> str:
  """The jaxlm path of a leaf of block i's attention projection, e.g. h_0/attn/query/kernel."""
  return f"{model_lib.block_name(i)}/{model_lib.ATTN}/{proj}/{leaf}"


def _mlp(i: int, proj: str, leaf: str) -> str:
  """The jaxlm path of a leaf of block i's MLP projection, e.g. h_0/mlp/fc/kernel."""
  return f"{model_lib.block_name(i)}/{model_lib.MLP_SUBLAYER}/{proj}/{leaf}"


def _tensor_map(mcfg: model_lib.ModelConfig, family: str) -> list[tuple[str, str, Callable,
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
      add(f"{p}.attn.c_proj.weight", _attn(i, M.ATTN_OUT, "kernel"),
          (lambda x: x.reshape(H, K, D), lambda x: x.reshape(H * K, D)))
      add(f"{p}.attn.c_proj.bias", _attn(i, M.ATTN_OUT, "bias"), same)
      add(f"{p}.mlp.c_fc.weight", _mlp(i, M.MLP_IN, "kernel"), same)
      add(f"{p}.mlp.c_fc.bias", _mlp(i, M.MLP_IN, "bias"), same)
      add(f"{p}.mlp.c_proj.weight", _mlp(i, M.MLP_OUT, "kernel"), same)
      add(f"{p}.mlp.c_proj.bias", _mlp(i, M.MLP_OUT, "bias"), same)
    add("transformer.ln_f.weight", f"{M.FINAL_NORM}/scale", same)
    add("transformer.ln_f.bias", f"{M.FINAL_NORM}/bias", same)
  else:
    add("model.embed_tokens.weight", f"{M.TOKEN_EMBED}/embedding", same)
    mlp_projs = (("gate_proj", M.MLP_GATE), ("up_proj", M.MLP_IN), ("down_proj", M.MLP_OUT))
    for i in range(mcfg.n_layer):
      p, j = f"model.layers.{i}", M.block_name(i)
      add(f"{p}.input_layernorm.weight", f"{j}/{M.ATTN_NORM}/scale", same)
      add(f"{p}.post_attention_layernorm.weight", f"{j}/{M.MLP_NORM}/scale", same)
      add(f"{p}.self_attn.o_proj.weight", _attn(i, M.ATTN_OUT, "kernel"),
          (lambda x: x.T.reshape(H, K, D), lambda x: x.reshape(H * K, D).T))
      for hf_name, name in mlp_projs:
        add(f"{p}.mlp.{hf_name}.weight", _mlp(i, name, "kernel"), t)
      if mcfg.bias:
        add(f"{p}.self_attn.o_proj.bias", _attn(i, M.ATTN_OUT, "bias"), same)
        for hf_name, name in mlp_projs:
          add(f"{p}.mlp.{hf_name}.bias", _mlp(i, name, "bias"), same)
    add("model.norm.weight", f"{M.FINAL_NORM}/scale", same)
  if not mcfg.tie_embeddings:
    add("lm_head.weight", f"{M.HEAD}/kernel", t)
  return rows


def _qkv_names(mcfg: model_lib.ModelConfig, family: str, i: int) -> list[str]:
  if family == "gpt2":
    return [f"transformer.h.{i}.attn.c_attn.weight", f"transformer.h.{i}.attn.c_attn.bias"]
  p = f"model.layers.{i}.self_attn"
  names = [f"{p}.{x}_proj.weight" for x in "qkv"]
  return names + ([f"{p}.{x}_proj.bias" for x in "qkv"] if mcfg.bias else [])


def expected_names(mcfg: model_lib.ModelConfig, family: str) -> list[str]:
  names = [row[0] for row in _tensor_map(mcfg, family)]
  for i in range(mcfg.n_layer):
    names += _qkv_names(mcfg, family, i)
  return names


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------

class _Reader:
  """Tensor names -> files of a (possibly sharded) safetensors checkpoint; reads one at a time."""

  def __init__(self, hf_dir: str):
    st = _safetensors()
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    elif os.path.exists(os.path.join(hf_dir, SINGLE)):
      path = os.path.join(hf_dir, SINGLE)
      with st.safe_open(path, framework="numpy") as f:
        self.files = {name: path for name in f.keys()}
    else:
      raise JaxlmError(f"no {SINGLE} or {INDEX} in {hf_dir} (only safetensors checkpoints "
                       "import)")
    self._st = st
    # GPT-2 checkpoints saved from GPT2Model have no "transformer." prefix.
    self.aliases = {}
    for name in list(self.files):
      if not name.startswith(("transformer.", "model.", "lm_head.")):
        self.aliases["transformer." + name] = name

  def names(self) -> set[str]:
    return set(self.files) | set(self.aliases)

  def read(self, name: str) -> np.ndarray:
    stored = self.aliases.get(name, name)
    path = self.files[stored]
    if not os.path.isfile(path):
      raise JaxlmError(f"safetensors shard {path} (holding {stored}) is missing")
    try:
      with self._st.safe_open(path, framework="numpy") as f:
        return f.get_tensor(stored)
    except TypeError:
      # numpy has no bfloat16 (the dtype of most LLaMA checkpoints): read it through JAX,
      # whose arrays convert to numpy via ml_dtypes.
      with self._st.safe_open(path, framework="flax") as f:
        return np.asarray(f.get_tensor(stored))


def _set(tree: dict[str, Any], path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def read_hf(hf_dir: str, param_dtype: str = "float32"
            ) -> tuple[str, model_lib.ModelConfig, PyTree]:
  """(family, ModelConfig, params as numpy, jaxlm layout) of a Hugging Face model directory."""
  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise JaxlmError(f"not a Hugging Face model directory: {hf_dir} has no config.json")
  with open(cfg_path, encoding="utf-8") as f:
    hf_cfg = json.load(f)
  family, mcfg = model_config_from_hf(hf_cfg, cfg_path)
  reader = _Reader(hf_dir)
  expected = expected_names(mcfg, family)
  stored = reader.names()
  missing = [n for n in expected if n not in stored]
  if missing:
    raise JaxlmError(f"{hf_dir} lacks {len(missing)} tensor(s) a {family} of this config "
                     f"needs: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
  dtype = np.dtype(model_lib.DTYPES[param_dtype])
  abstract = _abstract_shapes(mcfg)
  params: dict[str, Any] = {}

  def put(path: str, value: np.ndarray, hf_name: str, hf_shape: tuple[int, ...]):
    want = abstract[path]
    if value.shape != want:
      raise JaxlmError(f"tensor {hf_name} has shape {list(hf_shape)}, which does not fit "
                       f"{path} {list(want)} of the config in {cfg_path}")
    _set(params, path, value.astype(dtype, copy=False))

  for hf_name, path, to_jaxlm, _ in _tensor_map(mcfg, family):
    x = reader.read(hf_name)
    try:
      y = to_jaxlm(x)
    except ValueError:
      y = x  # A reshape that cannot happen: `put` names the tensor and both shapes.
    put(path, y, hf_name, x.shape)
  D, H, G, K = mcfg.d_model, mcfg.n_head, mcfg.kv_heads, mcfg.head_dim
  for i in range(mcfg.n_layer):
    names = _qkv_names(mcfg, family, i)
    try:
      if family == "gpt2":
        w, b = reader.read(names[0]), reader.read(names[1])  # [D, 3D], [3D]: q | k | v.
        q, k, v = np.split(w, 3, axis=1)
        qkv_kernel = (q.reshape(D, H, K), np.stack([k.reshape(D, H, K), v.reshape(D, H, K)], 1))
        qb, kb, vb = np.split(b, 3)
        qkv_bias = (qb.reshape(H, K), np.stack([kb.reshape(H, K), vb.reshape(H, K)]))
      else:
        q, k, v = (reader.read(n) for n in names[:3])
        qkv_kernel = (q.T.reshape(D, H, K),
                      np.stack([k.T.reshape(D, G, K), v.T.reshape(D, G, K)], 1))
        qkv_bias = None
        if mcfg.bias:
          qb, kb, vb = (reader.read(n) for n in names[3:])
          qkv_bias = (qb.reshape(H, K), np.stack([kb.reshape(G, K), vb.reshape(G, K)]))
    except ValueError:
      raise JaxlmError(f"the query/key/value tensors of layer {i} ({', '.join(names)}) do not "
                       f"fit the config in {cfg_path}") from None
    put(_attn(i, model_lib.QUERY, "kernel"), qkv_kernel[0], names[0], qkv_kernel[0].shape)
    put(_attn(i, model_lib.KEY_VALUE, "kernel"), qkv_kernel[1], names[0], qkv_kernel[1].shape)
    if qkv_bias is not None:
      put(_attn(i, model_lib.QUERY, "bias"), qkv_bias[0], names[-1], qkv_bias[0].shape)
      put(_attn(i, model_lib.KEY_VALUE, "bias"), qkv_bias[1], names[-1], qkv_bias[1].shape)
  return family, mcfg, params


def _abstract_shapes(mcfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """{jaxlm path: shape} of the model's params, from eval_shape (nothing allocated)."""
  import flax.linen as nn
  import jax
  model = model_lib.make_model(mcfg)
  boxed = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]:
    out[model_lib.path_name(path)] = tuple(leaf.shape)
  return out


def import_hf(hf_dir: str, workdir: str) -> dict[str, Any]:
  """Writes a jaxlm workdir (config.json, tokenizer.json if any, checkpoint at step 0)."""
  from jaxlm import checkpoint as checkpoint_lib
  family, mcfg, params = read_hf(hf_dir)
  root = workdir_lib.prepare(workdir)  # A local path or gs:// URL.
  ckpt_dir = root / "checkpoints"
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise JaxlmError(f"workdir {workdir} already holds checkpoints; convert into a new one")
  tok_json = None
  tokenizer_path = ""
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
    tok = tokenizers.load(os.path.join(hf_dir, "tokenizer.json"))
    tokenizer_path = workdir_lib.absolute(root / "tokenizer.json")
    tokenizers.save(tok, tokenizer_path)
    tok_json = tok.to_json()
  cfg = jaxlm_config(mcfg, family, tokenizer_path)
  resolved = cfg.to_dict()
  workdir_lib.write_text(root / "config.json", json.dumps(resolved, indent=2, sort_keys=True))
  # Params only: there is no optimizer state to import. Fine-tune from here with
  # --config.train.init_from=<workdir>.
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, items=("params",))
  try:
    ckpt.save(0, {"params": params}, {"config": resolved, "tokenizer": tok_json,
                                      "source": os.path.abspath(hf_dir), "params_only": True})
    ckpt.wait()
  finally:
    ckpt.close()
  n = sum(int(np.prod(x.shape)) for x in _leaves(params))
  return {"family": family, "params": n, "workdir": workdir}


def _leaves(tree: Any) -> Iterator[np.ndarray]:
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------

def load_workdir(workdir: str) -> tuple[model_lib.ModelConfig, PyTree]:
  """ModelConfig and latest params of a jaxlm workdir (trained or imported)."""
  from jaxlm import runs
  run = runs.load_run(workdir, need_tokenizer=False)
  return run.mcfg, run.params


def _get(tree: PyTree, path: str) -> np.ndarray:
  for p in path.split("/"):
    tree = tree[p]
  return np.asarray(tree, dtype=np.float32)


def export_hf(workdir: str, out_dir: str) -> dict[str, Any]:
  """Writes config.json, safetensors shards (one per block) + index, and tokenizer.json."""
  st = _safetensors()
  mcfg, params = load_workdir(workdir)
  family = family_of(mcfg)
  os.makedirs(out_dir, exist_ok=True)
  D, H, G, K = mcfg.d_model, mcfg.n_head, mcfg.kv_heads, mcfg.head_dim
  rows = _tensor_map(mcfg, family)

  def block_of(hf_name: str) -> int:
    parts = hf_name.split(".")
    return int(parts[2]) if parts[1] in ("h", "layers") else -1

  shard_ids = [-1] + list(range(mcfg.n_layer))
  weight_map, total_bytes = {}, 0
  for n, block in enumerate(shard_ids):
    tensors = {}
    for hf_name, path, _, to_hf in rows:
      if block_of(hf_name) == block:
        tensors[hf_name] = np.ascontiguousarray(to_hf(_get(params, path)))
    if block >= 0:
      names = _qkv_names(mcfg, family, block)
      q = _get(params, _attn(block, model_lib.QUERY, "kernel"))
      kv = _get(params, _attn(block, model_lib.KEY_VALUE, "kernel"))
      if family == "gpt2":
        tensors[names[0]] = np.concatenate(
            [q.reshape(D, H * K), kv[:, 0].reshape(D, G * K), kv[:, 1].reshape(D, G * K)], 1)
        qb = _get(params, _attn(block, model_lib.QUERY, "bias"))
        kvb = _get(params, _attn(block, model_lib.KEY_VALUE, "bias"))
        tensors[names[1]] = np.concatenate([qb.reshape(-1), kvb[0].reshape(-1),
                                            kvb[1].reshape(-1)])
      else:
        tensors[names[0]] = np.ascontiguousarray(q.reshape(D, H * K).T)
        tensors[names[1]] = np.ascontiguousarray(kv[:, 0].reshape(D, G * K).T)
        tensors[names[2]] = np.ascontiguousarray(kv[:, 1].reshape(D, G * K).T)
        if mcfg.bias:
          qb = _get(params, _attn(block, model_lib.QUERY, "bias"))
          kvb = _get(params, _attn(block, model_lib.KEY_VALUE, "bias"))
          tensors[names[3]] = qb.reshape(-1)
          tensors[names[4]] = kvb[0].reshape(-1)
          tensors[names[5]] = kvb[1].reshape(-1)
    file = f"model-{n + 1:05d}-of-{len(shard_ids):05d}.safetensors"
    st.numpy.save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    for name, x in tensors.items():
      weight_map[name] = file
      total_bytes += x.nbytes
    del tensors  # One block at a time.
  with open(os.path.join(out_dir, INDEX), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config(mcfg), f, indent=2)
  tok_path = workdir_lib.path(workdir) / "tokenizer.json"
  if tok_path.is_file():
    tok = tokenizers.load(tok_path)
    if tok.kind == "bpe":  # Hugging Face can read only its own tokenizer format.
      tok.hf.save(os.path.join(out_dir, "tokenizer.json"))
  return {"family": family, "files": len(shard_ids), "bytes": total_bytes, "out": out_dir}
