"""Hugging Face checkpoints (GPT-2, LLaMA; safetensors) <-> jaxlm workdirs, one tensor at a time.

Import reads config.json and the safetensors file(s) (one file, or shards listed in
model.safetensors.index.json) with `safe_open`, converting each tensor to jaxlm's layout as it
is read, so memory holds one copy of the model plus one tensor. Export restores the jaxlm
params and writes one safetensors shard per block, so at most one block is held twice.

Layouts: torch Linear weights are [out, in] (LLaMA) and GPT-2's Conv1D weights are [in, out];
jaxlm kernels are [in, out] with heads split out (query [D, H, K], key_value [D, 2, G, K],
out [H, K, D]). jaxlm's RoPE uses the same "rotate half" pairing as Hugging Face's LLaMA, so
query and key weights need no permutation. The names and layouts are in hf_map.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxlm import hf_map, hf_tokenizer, tokenizers
from jaxlm import model as model_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

PyTree = Any
INSTALL_HINT = "Hugging Face import/export needs safetensors: pip install 'jaxlm[hf]'"
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
# Import.
# ---------------------------------------------------------------------------------------------

class _Reader:
  """Tensor names -> files of a (possibly sharded) safetensors checkpoint; reads one at a time."""

  def __init__(self, hf_dir: str):
    st = _safetensors()
    self._st = st
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise JaxlmError(f"{index} has no \"weight_map\" of tensor names to files; download "
                         "the model again")
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    elif os.path.exists(os.path.join(hf_dir, SINGLE)):
      path = os.path.join(hf_dir, SINGLE)
      with self._open(path) as f:
        self.files = {name: path for name in f.keys()}
    else:
      raise JaxlmError(f"no {SINGLE} or {INDEX} in {hf_dir} (only safetensors checkpoints "
                       "import)")
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
      with self._open(path) as f:
        return self._get(f, path, stored)
    except TypeError:
      # numpy has no bfloat16 (the dtype of most LLaMA checkpoints): read it through JAX,
      # whose arrays convert to numpy via ml_dtypes.
      with self._open(path, framework="flax") as f:
        return np.asarray(self._get(f, path, stored))

  def _open(self, path: str, framework: str = "numpy"):
    # safetensors raises its own SafetensorError (or OSError) on a truncated or corrupt
    # header; a tensor cut short fails on get_tensor (see _get).
    try:
      return self._st.safe_open(path, framework=framework)
    except Exception as e:  # noqa: BLE001  (SafetensorError, OSError)
      raise _damaged(path, e) from None

  @staticmethod
  def _get(f: Any, path: str, name: str) -> np.ndarray:
    try:
      return f.get_tensor(name)
    except TypeError:
      raise
    except Exception as e:  # noqa: BLE001  (SafetensorError is no subclass of a builtin)
      raise _damaged(path, e) from None


def _damaged(path: str, e: BaseException) -> JaxlmError:
  first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
  return JaxlmError(f"safetensors file {path} is truncated or damaged ({first}); download or "
                    "export it again")


def _read_json(path: str) -> dict[str, Any]:
  """A JSON object file; one line naming the file and the position when it is not one."""
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise JaxlmError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
                     f"{e.colno}); download the model again") from None
  except (OSError, UnicodeDecodeError) as e:
    raise JaxlmError(f"cannot read {path}: {e}") from None
  if not isinstance(out, dict):
    raise JaxlmError(f"{path} holds a JSON {type(out).__name__}, not an object")
  return out


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
  hf_cfg = _read_json(cfg_path)
  try:
    family, mcfg = hf_map.model_config_from_hf(hf_cfg, cfg_path)
  except KeyError as e:
    raise JaxlmError(f"{cfg_path} lacks {e.args[0]!r}, which its architecture needs; download "
                     "the model again") from None
  except (TypeError, ValueError) as e:
    if isinstance(e, JaxlmError):
      raise
    raise JaxlmError(f"{cfg_path} holds a value of the wrong type ({e})") from None
  reader = _Reader(hf_dir)
  expected = hf_map.expected_names(mcfg, family)
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
    value = value.astype(dtype, copy=False)
    # After the cast: a weight too large for param_dtype becomes inf there.
    if not np.isfinite(value).all():
      raise JaxlmError(f"tensor {hf_name} in {hf_dir} holds {_nonfinite(value)}; a model "
                       "with them computes NaN, so nothing was imported (download or export "
                       "it again)")
    _set(params, path, value)

  for hf_name, path, to_jaxlm, _ in hf_map.tensor_map(mcfg, family):
    x = reader.read(hf_name)
    try:
      y = to_jaxlm(x)
    except ValueError:
      y = x  # A reshape that cannot happen: `put` names the tensor and both shapes.
    put(path, y, hf_name, x.shape)
  D, H, G, K = mcfg.d_model, mcfg.n_head, mcfg.kv_heads, mcfg.head_dim
  for i in range(mcfg.n_layer):
    names = hf_map.qkv_names(mcfg, family, i)
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
    for proj, kernel in zip((model_lib.QUERY, model_lib.KEY_VALUE), qkv_kernel, strict=True):
      put(hf_map.attn_path(i, proj, "kernel"), kernel, names[0], kernel.shape)
    if qkv_bias is not None:
      for proj, bias in zip((model_lib.QUERY, model_lib.KEY_VALUE), qkv_bias, strict=True):
        put(hf_map.attn_path(i, proj, "bias"), bias, names[-1], bias.shape)
  return family, mcfg, params


def _nonfinite(x: np.ndarray) -> str:
  n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
  return " and ".join(f"{n:,} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "infinite"))
                      if n) + f" value(s) of {x.size:,}"


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
  # Only a step counts: a kill -9 mid-import leaves an orbax tmp directory, which the
  # Checkpointer below removes, and the rerun must be able to finish the job.
  if ckpt_dir.is_dir() and any(p.name.isdigit() or checkpoint_lib.DAMAGED in p.name
                               for p in ckpt_dir.iterdir()):
    raise JaxlmError(f"workdir {workdir} already holds checkpoints; convert into a new one")
  tok_json = None
  tokenizer_path = ""
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
    tok = tokenizers.load(os.path.join(hf_dir, "tokenizer.json"))
    tokenizer_path = workdir_lib.absolute(root / "tokenizer.json")
    tokenizers.save(tok, tokenizer_path)
    tok_json = tok.to_json()
  cfg = hf_map.jaxlm_config(mcfg, family, tokenizer_path)
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


def _check_finite(tree: PyTree, prefix: str = "") -> None:
  """Before anything is written: a checkpoint from before jaxlm refused to save a diverged
  state may hold NaN, which an export would pass on silently."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      _check_finite(v, f"{prefix}{k}/")
    return
  x = np.asarray(tree, dtype=np.float32)
  if not np.isfinite(x).all():
    raise JaxlmError(f"{prefix.rstrip('/')} of the latest checkpoint holds {_nonfinite(x)} "
                     "(a diverged run); nothing was exported")


def _check_out(out_dir: str) -> None:
  """Refuses an --out that is a file or already holds a model: nothing there is overwritten."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise JaxlmError(f"--out {out_dir} is a file, not a directory; give a new directory")
  if os.path.isdir(out_dir):
    held = sorted(f for f in os.listdir(out_dir)
                  if f in ("config.json", INDEX) or f.endswith(".safetensors"))
    if held:
      raise JaxlmError(f"--out {out_dir} already holds a model ({', '.join(held[:3])}); "
                       "export into a new directory, or remove it first")


def export_hf(workdir: str, out_dir: str) -> dict[str, Any]:
  """Writes config.json, safetensors shards (one per block) + index, and the tokenizer files
  AutoTokenizer loads (BPE runs; for char and byte runs, "note" says it was not exported)."""
  st = _safetensors()
  _check_out(out_dir)
  mcfg, params = load_workdir(workdir)
  family = hf_map.family_of(mcfg)
  _check_finite(params)
  os.makedirs(out_dir, exist_ok=True)
  D, H, G, K = mcfg.d_model, mcfg.n_head, mcfg.kv_heads, mcfg.head_dim
  rows = hf_map.tensor_map(mcfg, family)

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
      names = hf_map.qkv_names(mcfg, family, block)
      q = _get(params, hf_map.attn_path(block, model_lib.QUERY, "kernel"))
      kv = _get(params, hf_map.attn_path(block, model_lib.KEY_VALUE, "kernel"))
      if family == "gpt2":
        tensors[names[0]] = np.concatenate(
            [q.reshape(D, H * K), kv[:, 0].reshape(D, G * K), kv[:, 1].reshape(D, G * K)], 1)
        qb = _get(params, hf_map.attn_path(block, model_lib.QUERY, "bias"))
        kvb = _get(params, hf_map.attn_path(block, model_lib.KEY_VALUE, "bias"))
        tensors[names[1]] = np.concatenate([qb.reshape(-1), kvb[0].reshape(-1),
                                            kvb[1].reshape(-1)])
      else:
        tensors[names[0]] = np.ascontiguousarray(q.reshape(D, H * K).T)
        tensors[names[1]] = np.ascontiguousarray(kv[:, 0].reshape(D, G * K).T)
        tensors[names[2]] = np.ascontiguousarray(kv[:, 1].reshape(D, G * K).T)
        if mcfg.bias:
          qb = _get(params, hf_map.attn_path(block, model_lib.QUERY, "bias"))
          kvb = _get(params, hf_map.attn_path(block, model_lib.KEY_VALUE, "bias"))
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
  hf_cfg = hf_map.hf_config(mcfg)
  tok_path = workdir_lib.path(workdir) / "tokenizer.json"
  tok = tokenizers.load(tok_path) if tok_path.is_file() else None
  tokenizer_files, note = [], None
  if tok is not None:
    # The model's bos/eos are the tokenizer's end-of-text (else transformers' GPT-2 default,
    # id 50256, which a small vocabulary lacks).
    hf_cfg.update(hf_tokenizer.special_token_ids(tok))
    tokenizer_files = hf_tokenizer.export(tok, out_dir, mcfg.block_size)
    note = None if tokenizer_files else hf_tokenizer.not_exported(tok)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_cfg, f, indent=2)
  return {"family": family, "files": len(shard_ids), "bytes": total_bytes, "out": out_dir,
          "tokenizer_files": tokenizer_files, "note": note}
