"""Every config in configs/ loads, validates, and builds abstract params without allocating them."""

import glob
import os

import jax
import pytest
from conftest import CONFIGS, load_config

from jaxlm import config as config_lib
from jaxlm import model as model_lib

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "*.py")))
# The example configs of real corpora read their data directory from these variables.
DATA_DIRS = ("FINEWEB_DIR", "OWT_DIR", "EVAL_DIR")


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory):
  """Small stand-ins of FineWeb (Parquet + tokenizer.json), OpenWebText (JSONL.zst train and
  val shards) and an evaluation corpus, in the layout the example configs expect."""
  import json

  import numpy as np
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  from jaxlm import tokenizers
  root = tmp_path_factory.mktemp("corpora")
  rng = np.random.default_rng(0)
  words = "the of and to in is that for it as was with be by on not he this are or".split()

  def docs(n):
    return [" ".join(rng.choice(words, size=int(rng.integers(50, 400)))) for _ in range(n)]
  dirs = {k: root / k.lower() for k in DATA_DIRS}
  for d in dirs.values():
    d.mkdir()
  for i in range(2):
    pq.write_table(pa.table({"id": list(range(300)), "text": docs(300)}),
                   dirs["FINEWEB_DIR"] / f"part-{i:05d}.parquet")
  tok = tokenizers.BpeTokenizer.train(docs(50), 400, eot=True)
  tok.hf.save(str(dirs["FINEWEB_DIR"] / "tokenizer.json"))
  for name, n in (("train-00000", 300), ("train-00001", 300), ("val-00000", 40)):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in docs(n)).encode()
    (dirs["OWT_DIR"] / f"{name}.jsonl.zst").write_bytes(zstandard.compress(lines))
  (dirs["EVAL_DIR"] / "wiki.jsonl").write_text(
      "".join(json.dumps({"text": t}) + "\n" for t in docs(40)))
  return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(autouse=True)
def _data_dirs(corpus_dirs, monkeypatch):
  for k, v in corpus_dirs.items():
    monkeypatch.setenv(k, v)


def test_there_are_configs():
  assert {"shakespeare_char", "shakespeare_char_large", "smoke"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_and_builds_abstract_params(name):
  cfg = load_config(name)
  config_lib.validate_config(cfg)
  mcfg = config_lib.model_config(cfg, vocab_size=65)
  model = model_lib.make_model(mcfg)
  abstract = jax.eval_shape(lambda r: model_lib.init_params(model, r), jax.random.key(0))
  n = sum(x.value.size for x in jax.tree.leaves(
      abstract, is_leaf=lambda x: hasattr(x, "names")))
  assert n > 0


@pytest.mark.parametrize("name", NAMES)
def test_config_docstring_gives_the_command(name):
  with open(os.path.join(CONFIGS, f"{name}.py")) as f:
    source = f.read()
  assert f"jaxlm train --config configs/{name}.py" in source
  assert "Expected" in source


@pytest.mark.parametrize("name, sources", [("fineweb_like", ["fineweb"]),
                                           ("openwebtext_like", ["owt", "wiki"])])
def test_real_corpus_examples_prepare_their_sources(name, sources, tmp_path):
  cfg = load_config(name)
  cfg.data.vocab_size = 400  # Small stand-in corpora: a small BPE, quickly.
  cfg.data.cache_dir = str(tmp_path)
  if name == "fineweb_like":
    cfg.data.val_fraction = 0.05  # 30 of the 600 stand-in documents.
  config_lib.validate_config(cfg)
  data = config_lib.load_dataset(cfg, log=lambda _: None)
  assert data.names == sorted(sources)
  assert data.tokenizer.eot_id is not None
  batch = data.train_batch(seed=0, step=0, batch_size=2, block_size=cfg.model.block_size)
  assert batch["inputs"].shape == (2, cfg.model.block_size)
  assert set(data.eval_sets()) >= {"train", "val"} | {f"val/{s}" for s in sources[1:]}
  if name == "openwebtext_like":  # wiki is evaluated only: no training row comes from it.
    src, _ = data.draw(data.train, data.weights, [0, 0, 0], 256)
    assert (src == data.names.index("owt")).all()


def test_default_experiment_is_the_nanogpt_cpu_recipe():
  c = load_config("shakespeare_char")
  assert (c.model.n_layer, c.model.n_head, c.model.d_model, c.model.block_size) == (4, 4, 128, 64)
  assert (c.train.batch_size, c.train.steps, c.optim.lr, c.optim.min_lr) == (12, 2000, 1e-3, 1e-4)
  assert (c.optim.warmup_steps, c.optim.b2, c.model.dropout) == (100, 0.99, 0.0)
  assert (c.optim.weight_decay, c.optim.grad_clip) == (0.1, 1.0)
  assert not c.model.tie_embeddings


def test_modern_experiment_differs_from_the_default_only_in_its_optimizer():
  modern, default = load_config("shakespeare_char_modern"), load_config("shakespeare_char")
  for section in ("data", "model", "train", "checkpoint", "mesh"):
    assert modern[section].to_dict() == default[section].to_dict(), section
  assert (modern.optim.name, modern.optim.schedule, modern.optim.lr) == ("muon", "wsd", 3e-3)


def expected_val_loss(name: str) -> float:
  """The val loss that configs/NAME.py's docstring promises ("Expected ...: val loss X")."""
  import re
  with open(os.path.join(CONFIGS, f"{name}.py")) as f:
    found = re.search(r"Expected[^:]*: val loss (\d\.\d+)", f.read())
  assert found, f"configs/{name}.py states no expected val loss"
  return float(found.group(1))


@pytest.mark.slow
def test_modern_experiment_reaches_its_expected_val_loss(tmp_path, monkeypatch):
  """The whole 2000-step run (about two minutes): the result its docstring states, and better
  than the default experiment's stated one by far more than seed noise (~0.01)."""
  import json

  from conftest import run_jaxlm
  expected = expected_val_loss("shakespeare_char_modern")
  assert expected < expected_val_loss("shakespeare_char") - 0.1
  # As a user runs it: one CPU device and jaxlm's own XLA flags, not conftest's 8 fake devices.
  monkeypatch.delenv("XLA_FLAGS")
  proc = run_jaxlm("train", "--config", os.path.join(CONFIGS, "shakespeare_char_modern.py"),
                   "--workdir", str(tmp_path / "run"), "--config.checkpoint.every=0",
                   timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  final = [r["val/loss"] for r in records if "val/loss" in r][-1]
  assert abs(final - expected) < 0.02, (final, expected)


SWEEPS = sorted(os.path.basename(p)[:-3]
                for p in glob.glob(os.path.join(CONFIGS, "sweeps", "*.py")))


def test_there_are_sweeps():
  assert {"shakespeare_lr", "shakespeare_search"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_loads_and_every_trial_is_valid(name):
  from jaxlm import sweep
  path = os.path.join(CONFIGS, "sweeps", f"{name}.py")
  with open(path) as f:
    source = f.read()
  assert f"jaxlm sweep --config configs/sweeps/{name}.py" in source and "Expected" in source
  cfg = sweep.load_module(path).get_config()
  cfg.lock()
  config_lib.validate_config(cfg)
  plan = sweep.prepare(path, cfg, {})
  if plan.trials is not None:
    assert plan.trials and all(spec.error is None for spec in plan.trials)
  else:
    assert plan.space and plan.n_trials >= 1


def test_lr_sweep_is_the_default_experiment_with_lr_varied():
  from jaxlm import sweep
  path = os.path.join(CONFIGS, "sweeps", "shakespeare_lr.py")
  base = load_config("shakespeare_char").to_dict()
  assert sweep.load_module(path).get_config().to_dict() == base
  trials = sweep.load_module(path).get_sweep()
  assert [t["optim.lr"] for t in trials] == [3e-4, 1e-3, 3e-3, 1e-2]
  cfg = sweep.load_module(path).get_config()
  assert sweep.resolve(cfg, {"optim.lr": 3e-3}).optim.min_lr == pytest.approx(3e-4)
