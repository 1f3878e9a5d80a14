"""Downstream tasks: the scorer against a plain forward pass, lm-eval's rules, the shipped
tasks, in-loop evaluation and `jaxlm eval --tasks`, and bad task input."""

import json
import math
import os

import jax
import numpy as np
import pytest
from conftest import assert_one_line_error, load_config, run_jaxlm

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import tokenizers
from jaxlm.errors import JaxlmError
from jaxlm.tasks import scorer as scorer_lib
from jaxlm.tasks import shakespeare
from jaxlm.tasks import suite as suite_lib
from jaxlm.tasks import task as task_lib

CHARS = "abcdefghijklmnopqrstuvwxyz ,.\n"


@pytest.fixture(scope="module")
def tiny():
  """A random 2-layer model over a char vocabulary with end-of-text, block 24."""
  tok = tokenizers.CharTokenizer(CHARS, eot=True)
  cfg = load_config("smoke")
  cfg.model.block_size, cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head = 24, 2, 32, 2
  mcfg = config_lib.model_config(cfg, tok.vocab_size)
  model = model_lib.make_model(mcfg)
  params = jax.jit(lambda r: model_lib.init_params(model, r))(jax.random.key(3))
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  return model, params, tok


def reference(model, params, ctx, cont, block_size):
  """One request, one forward pass over exactly its tokens, no padding or batching."""
  whole = np.concatenate([ctx, cont])[-(block_size + 1):]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  logits = forward(params, whole[None, :-1])[0]
  logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
  n = len(cont)
  rows = np.arange(len(whole) - 1 - n, len(whole) - 1)
  targets = whole[-n:]
  return float(np.sum(np.asarray(logp)[rows, targets])), bool(
      np.all(np.argmax(np.asarray(logits)[rows], axis=-1) == targets))


def test_scores_equal_a_plain_forward_pass_example_by_example(tiny):
  model, params, tok = tiny
  rng = np.random.default_rng(0)
  requests = []
  for _ in range(20):  # Lengths across all buckets, and some past the block (truncated).
    # A few lengths (each compiles the reference once): across the buckets and past the block.
    text = "".join(rng.choice(list(CHARS[:-1]), size=int(rng.choice([6, 13, 25, 40]))))
    cut = int(rng.integers(max(1, len(text) - 20), len(text)))  # Continuations fit the block.
    requests.append(scorer_lib.encode_pair(tok, text[:cut], text[cut:]))
  scorer = scorer_lib.Scorer(model, params, tok, batch_size=6)
  scores = scorer.loglikelihood(requests)
  assert any(len(c) + len(x) > 25 for c, x in requests)  # Some are truncated on the left.
  for (ctx, cont), s in zip(requests, scores, strict=True):
    logprob, greedy = reference(model, params, ctx, cont, 24)
    assert s.logprob == pytest.approx(logprob, abs=1e-4)
    assert s.greedy == greedy and s.tokens == len(cont)
  assert scorer_lib.buckets(24) == [24] and scorer_lib.buckets(256) == [32, 64, 128, 256]


def test_greedy_is_true_for_the_argmax_continuation(tiny):
  model, params, tok = tiny
  ctx = tok.encode("the cat sat")
  logits = model.apply({"params": params}, ctx[None], train=False)[0, -1]
  best = np.array([int(np.argmax(logits))])
  other = np.array([(best[0] + 1) % (tok.vocab_size - 1)])
  s_best, s_other = scorer_lib.Scorer(model, params, tok).loglikelihood(
      [(ctx, best), (ctx, other)])
  assert s_best.greedy and not s_other.greedy and s_best.logprob > s_other.logprob


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
  tok = tokenizers.BpeTokenizer.train("the cat sat on the mat\n" * 50, 300, eot=True)
  ctx, cont = scorer_lib.encode_pair(tok, "the cat ", "sat")
  assert tok.decode(ctx) == "the cat" and tok.decode(cont) == " sat"
  whole = tok.encode("the cat sat")
  np.testing.assert_array_equal(np.concatenate([ctx, cont]), whole)
  ctx, cont = scorer_lib.encode_pair(tok, "", "the mat")
  assert list(ctx) == [tok.eot_id] and tok.decode(cont) == "the mat"
  with pytest.raises(JaxlmError) as e:
    scorer_lib.encode_pair(tokenizers.CharTokenizer("ab"), "", "ab")
  assert "end-of-text" in str(e.value)


class FakeScorer:
  """Returns given log-likelihoods in order, to check the metrics' arithmetic."""

  def __init__(self, tokenizer, logprobs, greedy=None):
    self.tokenizer, self.logprobs = tokenizer, logprobs
    self.greedy = greedy or [False] * len(logprobs)

  def loglikelihood(self, requests, names=None):
    assert len(requests) == len(self.logprobs)
    return [scorer_lib.Score(lp, g, 1) for lp, g in zip(self.logprobs, self.greedy, strict=True)]


def write_task(tmp_path, examples, **spec):
  data = tmp_path / "ex.jsonl"
  data.write_text("".join(json.dumps(e) + "\n" for e in examples))
  spec = {"name": "t", "type": "multiple_choice", "data": "ex.jsonl", **spec}
  path = tmp_path / "t.yaml"
  path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in spec.items()))
  return str(path)


def test_multiple_choice_acc_and_acc_norm_as_lm_eval_defines_them(tmp_path):
  tok = tokenizers.CharTokenizer(CHARS)
  path = write_task(tmp_path, [{"context": "a", "choices": ["b", "cccc"], "label": 1},
                               {"context": "a", "choices": ["dd", "e", "f"], "label": 0}])
  t = task_lib.load(path)
  # Example 1: raw picks "b" (-2 > -3), per character picks "cccc" (-0.75 > -2): acc 0, norm 1.
  # Example 2: raw and per character pick "dd" (-1.0, -0.5 per character), the label.
  r = task_lib.evaluate(t, FakeScorer(tok, [-2.0, -3.0, -1.0, -1.2, -5.0]))
  assert r == {"acc": 0.5, "acc_norm": 1.0, "chance": pytest.approx((1 / 2 + 1 / 3) / 2)}
  results = {"a": {"acc": 0.5, "chance": 0.25}, "b": {"acc": 0.1, "chance": 0.0}}
  assert task_lib.core(results) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.1) / 2)


def test_cloze_accuracy_is_the_greedy_match(tmp_path):
  tok = tokenizers.CharTokenizer(CHARS)
  path = write_task(tmp_path, [{"context": "ab", "target": "c"}] * 4, type="cloze")
  r = task_lib.evaluate(task_lib.load(path),
                        FakeScorer(tok, [-1.0] * 4, [True, False, True, True]))
  assert r["acc"] == 0.75 and r["logprob"] == -1.0


def test_few_shot_contexts_are_deterministic_and_exclude_the_example(tmp_path):
  ex = [{"context": f"q{i}", "choices": [f"x{i}", f"y{i}"], "label": 0} for i in range(6)]
  t = task_lib.load(write_task(tmp_path, ex, num_fewshot=2, fewshot_delimiter="|",
                               target_delimiter=" "))
  ctxs = task_lib.contexts(t)
  assert ctxs == task_lib.contexts(task_lib.load(t.data.replace("ex.jsonl", "t.yaml")))
  for i, c in enumerate(ctxs):
    shots = c.split("|")
    assert len(shots) == 3 and shots[-1] == f"q{i}" and f"q{i} x{i}" not in shots[:2]


def test_the_shipped_tasks_are_what_their_builder_makes(tmp_path):
  shakespeare.build(str(tmp_path))
  for name in ("shakespeare_next_line", "shakespeare_last_word", "shakespeare_complete_word"):
    for ext in ("jsonl", "yaml"):
      shipped = os.path.join(shakespeare.HERE, f"{name}.{ext}")
      assert open(shipped, "rb").read() == (tmp_path / f"{name}.{ext}").read_bytes(), name
    t = task_lib.load(name)
    assert len(t.examples) == shakespeare.N_EXAMPLES
  held_out = shakespeare.held_out_text()
  for ex in task_lib.load("shakespeare_next_line").examples:  # Never from the training text.
    assert ex["context"] in held_out
    assert ex["context"] + ex["choices"][ex["label"]] in held_out + "\n"


@pytest.mark.slow
def test_in_loop_tasks_and_jaxlm_eval_tasks(tmp_path):
  cfg = load_config("smoke")
  cfg.train.steps, cfg.train.eval_every = 10, 5
  cfg.train.eval_tasks = "shakespeare_last_word,shakespeare_complete_word"
  from jaxlm import train
  final = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  evals = [r for r in records if "tasks/core" in r]
  assert [r["step"] for r in evals] == [0, 5, 10]
  for r in evals:
    assert 0 <= r["tasks/shakespeare_last_word/acc"] <= 1
    assert r["tasks/core"] == pytest.approx(
        ((r["tasks/shakespeare_last_word/acc"] - 0.25) / 0.75 +
         r["tasks/shakespeare_complete_word/acc"]) / 2)
  proc = run_jaxlm("eval", f"--workdir={tmp_path / 'run'}",
                   "--tasks=shakespeare_last_word,shakespeare_complete_word")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "shakespeare_last_word" in proc.stdout and "examples/s" in proc.stdout
  saved = json.load(open(tmp_path / "run" / "eval" / "10.json"))
  # The same params and examples: the same accuracy as in the training loop's last eval.
  assert saved["tasks/shakespeare_last_word/acc"] == final["tasks/shakespeare_last_word/acc"]
  assert saved["val/loss"] == pytest.approx(final["val/loss"], rel=1e-6)
  assert math.isfinite(saved["val/bpb"])


@pytest.mark.parametrize("examples, fragment", [
    ([{"context": "a", "choices": ["b", "c"]}], "ex.jsonl:1: the example lacks the field 'label'"),
    ([{"context": "a", "choices": ["b", "c"], "label": 0},
      {"context": "a", "choices": ["b", "c"], "label": 2}], "ex.jsonl:2: label 2 is out of range"),
    ([{"context": "a", "choices": "b", "label": 0}], "must be a list of two or more strings"),
])
def test_bad_task_data_names_file_and_line(tmp_path, examples, fragment):
  with pytest.raises(JaxlmError) as e:
    task_lib.load(write_task(tmp_path, examples))
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_task_and_bad_config_fail_before_compiling(tmp_path):
  with pytest.raises(JaxlmError) as e:
    task_lib.load("hellaswag")
  assert "unknown task 'hellaswag'" in str(e.value) and "shakespeare_next_line" in str(e.value)
  cfg = load_config("smoke")
  cfg.train.eval_tasks = "shakespeare_next_line,nope"
  with pytest.raises(JaxlmError) as e:
    config_lib.validate_config(cfg)
  assert "unknown task 'nope'" in str(e.value)
  cfg.train.eval_tasks, cfg.train.eval_tasks_truncation = "", "right"
  with pytest.raises(JaxlmError) as e:
    config_lib.validate_config(cfg)
  assert "eval_tasks_truncation='right'" in str(e.value)


def test_a_context_longer_than_the_block_is_truncated_or_refused(tiny, tmp_path):
  model, params, tok = tiny
  path = write_task(tmp_path, [{"context": "abc " * 20, "choices": ["de", "fg"], "label": 0}])
  with pytest.raises(JaxlmError) as e:
    suite_lib.Suite([path], model, tok, truncation="error")
  assert "ex.jsonl:1" in str(e.value) and "more than model.block_size=24" in str(e.value)
  results = suite_lib.Suite([path], model, tok, truncation="left").evaluate(params)
  assert results["t"]["acc"] in (0.0, 1.0)


def test_eval_cli_errors_are_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  assert_one_line_error(run_jaxlm("eval", f"--workdir={tmp_path / 'empty'}", "--tasks=nope"),
                        "unknown task 'nope'")
  assert_one_line_error(run_jaxlm("eval", f"--workdir={tmp_path / 'empty'}",
                                  "--tasks=shakespeare_last_word"), "no run in")
