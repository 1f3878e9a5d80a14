"""The lm-eval backend: scores like lm-eval's own Hugging Face backend on the exported run,
generates what a direct greedy decode gives, runs from the documented command line, and fails
in one line."""

import importlib
import json
import os
import subprocess
import sys

# Offline, before lm-eval (and through it `datasets` and huggingface_hub) reads the settings.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The dev extra installs lm-eval, and accelerate for lm-eval's HF backend: a missing package
# is a collection error, not a silent skip.
import accelerate  # noqa: E402, F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm_eval  # noqa: E402
import lm_eval.api.registry  # noqa: E402
import lm_eval.tasks  # noqa: E402
import lm_eval.utils  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from conftest import REPO, assert_one_line_error, load_config, run_jaxlm  # noqa: E402

import jaxlm.tasks  # noqa: E402
from jaxlm import data as data_lib  # noqa: E402
from jaxlm import hf, lm_eval_backend, tokenizers, train  # noqa: E402
from jaxlm.errors import JaxlmError  # noqa: E402
from jaxlm.tasks import harness  # noqa: E402
from jaxlm.tasks import scorer as scorer_lib  # noqa: E402
from jaxlm.tasks import task as task_lib  # noqa: E402

BLOCK = 32
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------
# A trained BPE run, its Hugging Face export, and lm-eval task files over local JSONL.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text():
  return data_lib.read_corpus("")[0].decode()[:300_000]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
  """(workdir, exported Hugging Face directory) of a tiny GPT-2 with an end-of-text BPE."""
  root = tmp_path_factory.mktemp("trained")
  (root / "corpus.txt").write_text(text)
  tokenizers.save(tokenizers.BpeTokenizer.train(text, 320, eot=True), root / "tok.json")
  cfg = load_config("smoke")
  cfg.data.path = str(root / "corpus.txt")
  cfg.data.tokenizer = str(root / "tok.json")
  cfg.model.block_size = BLOCK
  cfg.train.steps = 20
  cfg.train.eval_every = 10
  cfg.checkpoint.every = 10
  cfg.sample.max_new_tokens = 4
  train.train_and_evaluate(cfg, str(root / "w"))
  proc = run_jaxlm("convert", "--to_hf", "--workdir", str(root / "w"), "--out", str(root / "hf"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "with its tokenizer (tokenizer.json, tokenizer_config.json" in proc.stdout
  return str(root / "w"), str(root / "hf")


def lines_of(text, start, n):
  return [line for line in text[start:].split("\n") if len(line.split()) >= 4][:n]


def write_task(directory, name, output_type, rows, **fields):
  """An lm-eval task YAML (JSON is YAML) over a local JSONL; datasets caches under the dir."""
  data = directory / f"{name}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  spec = {"task": name, "dataset_path": "json",
          "dataset_kwargs": {"data_files": {"test": str(data)},
                             "cache_dir": str(directory / "datasets")},
          "test_split": "test", "output_type": output_type, **fields}
  (directory / f"{name}.yaml").write_text(json.dumps(spec, indent=1))
  return data


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, text):
  d = tmp_path_factory.mktemp("tasks")
  rng = np.random.default_rng(0)
  lines = lines_of(text, 250_000, 400)
  mc = []
  for i in range(24):  # Which two words end the line? Short choices: every one fits the block.
    words = lines[i].split()
    choices = [" ".join(words[-2:])] + [" ".join(lines[j].split()[-2:]) for j in
                                        rng.choice(np.arange(100, 400), 3, replace=False)]
    label = int(rng.integers(4))
    choices[0], choices[label] = choices[label], choices[0]
    mc.append({"context": " ".join(words[:-2]), "choices": choices, "label": label})
  write_task(d, "local_mc", "multiple_choice", mc, doc_to_text="{{context}}",
             doc_to_choice="{{choices}}", doc_to_target="label",
             metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
  # Some documents are a few lines long: several windows of BLOCK tokens each. No two share
  # text: lm-eval's HF backend reuses the logits of requests with the same input, and
  # (0.4.13) reads a shorter continuation's log-probabilities from the wrong positions of the
  # longer one's, so overlapping documents would test that bug rather than jaxlm.
  docs = [{"text": "\n".join(lines[40 + 5 * i:41 + 5 * i + i % 4])} for i in range(10)]
  write_task(d, "local_rolling", "loglikelihood_rolling", docs, doc_to_text="",
             doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"},
                                                    {"metric": "bits_per_byte"}])
  return d


def evaluate(model, task_dir, tasks, **kwargs):
  return lm_eval.simple_evaluate(
      model=model, tasks=tasks, task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)),
      log_samples=True, **kwargs)


@pytest.fixture(scope="module")
def jaxlm_lm(trained):
  return harness.JaxlmLM(workdir=trained[0], step="best", batch_size=8)


@pytest.fixture(scope="module")
def both(trained, task_dir):
  """lm-eval's results of the same two tasks with the jaxlm backend (by name, as the README
  says: importing jaxlm.tasks.harness registered it) and lm-eval's HF backend."""
  tasks = ["local_mc", "local_rolling"]
  return {"jaxlm": evaluate("jaxlm", task_dir, tasks, model_args=f"workdir={trained[0]},step=best",
                            batch_size=8),
          "hf": evaluate("hf", task_dir, tasks, model_args=f"pretrained={trained[1]},dtype=float32",
                         device="cpu", batch_size=8)}


def per_request(results, task):
  """(arguments, log-likelihood) of every request, in lm-eval's document order."""
  out = []
  for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
    for args, resp in zip(s["arguments"], s["filtered_resps"], strict=True):
      out.append((args, resp[0] if isinstance(resp, (tuple, list)) else resp))
  return out


# ---------------------------------------------------------------------------------------------
# Fidelity against lm-eval's Hugging Face backend.
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_export_has_a_tokenizer_that_encodes_as_the_run_does(trained, text):
  run_tok = tokenizers.load(os.path.join(trained[0], "tokenizer.json"))
  hf_tok = transformers.AutoTokenizer.from_pretrained(trained[1])
  assert hf_tok.eos_token_id == hf_tok.bos_token_id == run_tok.eot_id
  for line in lines_of(text, 250_000, 30):
    assert hf_tok.encode(line) == list(map(int, run_tok.encode(line)))


@pytest.mark.slow
def test_per_example_loglikelihoods_match_lm_evals_hf_backend(both):
  ours, theirs = per_request(both["jaxlm"], "local_mc"), per_request(both["hf"], "local_mc")
  assert len(ours) == len(theirs) == 24 * 4
  assert [a for a, _ in ours] == [a for a, _ in theirs]
  diff = np.abs(np.array([x for _, x in ours]) - np.array([x for _, x in theirs]))
  print(f"max |jaxlm - hf| per-request log-likelihood: {diff.max():.3g}")
  assert diff.max() <= 1e-4
  assert np.ptp([x for _, x in ours]) > 1.0  # The scores differ: the comparison means something.


@pytest.mark.slow
def test_accuracies_are_equal_and_match_the_built_in_scorer(both, jaxlm_lm, task_dir, tmp_path):
  for metric in ("acc,none", "acc_norm,none"):
    assert both["jaxlm"]["results"]["local_mc"][metric] == both["hf"]["results"]["local_mc"][
        metric]
  # jaxlm's own task file over the same JSONL, scored by the same Scorer outside lm-eval.
  (tmp_path / "mc.yaml").write_text(
      f"name: mc\ntype: multiple_choice\ndata: {task_dir / 'local_mc.jsonl'}\n")
  built_in = task_lib.evaluate(task_lib.load(str(tmp_path / "mc.yaml")), jaxlm_lm.scorer)
  assert built_in["acc"] == both["jaxlm"]["results"]["local_mc"]["acc,none"]
  assert built_in["acc_norm"] == both["jaxlm"]["results"]["local_mc"]["acc_norm,none"]


@pytest.mark.slow
def test_rolling_loglikelihoods_match_lm_evals_hf_backend(both, trained, task_dir):
  ours = per_request(both["jaxlm"], "local_rolling")
  theirs = per_request(both["hf"], "local_rolling")
  assert len(ours) == len(theirs) == 10
  diff = np.abs(np.array([x for _, x in ours]) - np.array([x for _, x in theirs]))
  print(f"max |jaxlm - hf| per-document rolling log-likelihood: {diff.max():.3g}")
  assert diff.max() <= 1e-4
  tok = tokenizers.load(os.path.join(trained[0], "tokenizer.json"))
  lengths = [len(tok.encode(json.loads(line)["text"]))
             for line in (task_dir / "local_rolling.jsonl").read_text().splitlines()]
  assert max(lengths) > 2 * BLOCK  # Several windows, a shorter last one among them.
  assert any(n % BLOCK for n in lengths if n > BLOCK)
  for metric in ("bits_per_byte,none", "word_perplexity,none"):
    a, b = (both[k]["results"]["local_rolling"][metric] for k in ("jaxlm", "hf"))
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 8, 32])
def test_rolling_windows_are_lm_evals(block_size):
  for n in range(0, 3 * block_size + 3):
    ids = np.arange(100, 100 + n)
    want = [lm_eval.utils.make_disjoint_window(w) for w in lm_eval.utils.get_rolling_token_windows(
        token_list=list(ids), prefix_token=7, max_seq_len=block_size, context_len=1)]
    got = scorer_lib.rolling_windows(ids, 7, block_size)
    assert [(list(c), list(x)) for c, x in got] == [(list(c), list(x)) for c, x in want]


def test_the_model_is_registered_beside_lm_evals_own():
  assert lm_eval.api.registry.get_model("jaxlm") is harness.JaxlmLM
  assert lm_eval.api.registry.get_model("hf").__name__ == "HFLM"


# ---------------------------------------------------------------------------------------------
# generate_until.
# ---------------------------------------------------------------------------------------------

def greedy_text(run, forward, context, max_new):
  """A full forward pass per token (no cache), the prompt truncated as lm-eval's HF backend
  does: what generate_until must produce before its stop sequences. The window is
  zero-padded to the block (one compilation of `forward`); causality makes the padding
  irrelevant to the logits read at the last real token."""
  tok, T = run.tokenizer, run.mcfg.block_size
  ids = list(map(int, tok.encode(context)))[-(T - max_new):]
  new = []
  for _ in range(max_new):
    window = ids + new
    logits = forward(run.params, jnp.asarray([window + [0] * (T - len(window))], jnp.int32))
    token = int(jnp.argmax(logits[0, len(window) - 1, :tok.vocab_size]))
    if token == tok.eot_id:
      break
    new.append(token)
  return tok.decode(new)


@pytest.fixture(scope="module")
def noisy_lm(tmp_path_factory, text):
  """A GPT-2 of random weights far from their init, imported with a BPE: the tiny trained run
  greedily writes newlines only, this one varied text."""
  import torch
  root = tmp_path_factory.mktemp("noisy")
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=320, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
      embd_pdrop=0.0, attn_pdrop=0.0))
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.3)
  model.save_pretrained(str(root / "hf"))
  tokenizers.BpeTokenizer.train(text[:100_000], 320, eot=True).hf.save(
      str(root / "hf" / "tokenizer.json"))
  hf.import_hf(str(root / "hf"), str(root / "w"))
  return harness.JaxlmLM(workdir=str(root / "w"), batch_size=8)


@pytest.mark.slow
def test_generate_until_stops_where_a_direct_greedy_decode_reaches_a_stop(
    noisy_lm, tmp_path, text):
  jaxlm_lm, run = noisy_lm, noisy_lm.run
  contexts = [" ".join(line.split()[:3]) for line in lines_of(text, 270_000, 6)]
  contexts[0] = "ROMEO:\nO, she doth teach the torches to burn bright! It seems she hangs " * 2
  max_new = 20  # More than one decode chunk of harness.CHUNK_TOKENS.
  forward = jax.jit(lambda params, x: run.model.apply({"params": params}, x))
  full = [greedy_text(run, forward, c, max_new) for c in contexts]
  assert len(set(full)) > 2, full  # Not one repeated continuation.
  # Stop sequences taken from the greedy text itself, so that they do occur in some rows.
  until = sorted({t[len(t) // 2:len(t) // 2 + 2] for t in full[:2]} | {"\n\n"})
  want = []
  for t in full:
    ends = [t.find(s) for s in until if s in t]
    want.append(t[:min(ends)] if ends else t)
  print("greedy:", full, "until:", until, "want:", want)
  assert any(w != t for w, t in zip(want, full, strict=True))
  rows = [{"context": c, "target": ""} for c in contexts]
  write_task(tmp_path, "local_gen", "generate_until", rows, doc_to_text="{{context}}",
             doc_to_target="{{target}}", metric_list=[{"metric": "exact_match"}],
             generation_kwargs={"until": until, "max_gen_toks": max_new, "do_sample": False})
  results = evaluate(jaxlm_lm, tmp_path, ["local_gen"])
  got = [s["filtered_resps"][0] for s in sorted(results["samples"]["local_gen"],
                                                key=lambda s: s["doc_id"])]
  assert got == want


def test_generation_kwargs_are_read_as_lm_evals_hf_backend_reads_them():
  until, s = harness.generation_settings({"until": "\n", "max_new_tokens": 7, "max_tokens": 9,
                                          "temperature": 0.7, "do_sample": False}, 256, 300, 299)
  assert until == ["\n"] and s.max_new_tokens == 7 and s.temperature == 0.0
  assert s.end_token == 299 and s.vocab_size == 300
  until, s = harness.generation_settings({"temperature": 0.5, "top_k": 5}, 64, 300, None)
  assert until == [] and s.max_new_tokens == 64 and (s.temperature, s.top_k) == (0.5, 5)
  assert harness.cut_at_stop("abc. def\nx", [".", "\n"]) == ("abc", True)
  assert harness.cut_at_stop("abc", ["", "z"]) == ("abc", False)


# ---------------------------------------------------------------------------------------------
# The documented command line, and one-line errors.
# ---------------------------------------------------------------------------------------------

def run_backend(*args, timeout=600):
  """`python -m jaxlm.lm_eval_backend ARGS` from the repo root, offline, captured."""
  env = {**os.environ, **OFFLINE_ENV,
         "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, "-m", "jaxlm.lm_eval_backend", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_documented_command_line_evaluates_the_run(trained, task_dir, both, tmp_path):
  proc = run_backend("--model", "jaxlm", "--model_args", f"workdir={trained[0]},step=best",
                     "--tasks", "local_mc", "--include_path", str(task_dir), "--batch_size", "8",
                     "--output_path", str(tmp_path / "out"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs
           if f.startswith("results")]
  assert len(files) == 1, files
  with open(files[0]) as f:
    results = json.load(f)
  assert results["config"]["model"] == "jaxlm"
  assert results["config"]["step"] == both["jaxlm"]["config"]["step"]  # "best", resolved.
  assert results["results"]["local_mc"]["acc,none"] == both["hf"]["results"]["local_mc"][
      "acc,none"]


@pytest.mark.slow
def test_a_workdir_without_a_checkpoint_is_a_one_line_error(trained, task_dir, tmp_path):
  (tmp_path / "w").mkdir()  # A run stopped before its first checkpoint.
  for name in ("config.json", "tokenizer.json"):
    with open(os.path.join(trained[0], name)) as f:
      (tmp_path / "w" / name).write_text(f.read())
  with pytest.raises(JaxlmError, match="no checkpoint in") as e:
    harness.JaxlmLM(workdir=str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  proc = run_backend("--model", "jaxlm", "--model_args", f"workdir={tmp_path / 'w'}",
                     "--tasks", "local_mc", "--include_path", str(task_dir), timeout=300)
  assert_one_line_error(proc, "no checkpoint in")


def test_bad_model_arguments_are_one_line_errors():
  with pytest.raises(JaxlmError, match="unknown jaxlm model argument 'pretrained'"):
    harness.JaxlmLM(workdir="runs/x", pretrained="gpt2")
  with pytest.raises(JaxlmError, match="needs --model_args workdir=DIR"):
    harness.JaxlmLM()
  with pytest.raises(JaxlmError, match="step must be a number, 'latest' or 'best'"):
    harness.parse_step("last")
  assert [harness.parse_batch_size(b) for b in (None, "auto", "auto:4", "16", 3)] == [
      32, 32, 32, 16, 3]


def test_without_lm_eval_the_backend_is_a_one_line_install_hint(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails.
  monkeypatch.delitem(sys.modules, "jaxlm.tasks.harness")
  monkeypatch.delattr(jaxlm.tasks, "harness")  # Else `from jaxlm.tasks import harness` finds it.
  with pytest.raises(JaxlmError) as e:
    importlib.import_module("jaxlm.tasks.harness")
  assert str(e.value) == harness.INSTALL_HINT
  assert "pip install 'jaxlm[eval]'" in str(e.value) and "\n" not in str(e.value)
  monkeypatch.delitem(sys.modules, "jaxlm.tasks.harness", raising=False)
  with pytest.raises(SystemExit) as exit_:
    lm_eval_backend.main(["--model", "jaxlm", "--tasks", "x"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == f"jaxlm: error: {harness.INSTALL_HINT}\n"

