"""Items 5, 6, 14 and part of 17: what a resume may change, the run's own tokenizer, a damaged
config.json, and hints that name the right cause (jaxlm/resume.py)."""

from __future__ import annotations

import json
import os

from harness import Case, jaxlm, train_smoke

SM = ["--config", "{SM}", "--workdir", "{W}"]
SHORT = ("--config.train.steps=2", "--config.train.eval_every=0", "--config.checkpoint.every=0")
# A corpus beside the workdir, with a 'z' and no '~'; 56 characters, more than sample.top_k.
CORPUS_ARG = "--config.data.path={W}/../corpus.txt"
CORPUS = ("the lazy dog jumps over a quick brown fox; ZEBRAS graze in the hazy maze.\n"
          "Fourscore and seven years ago, 0123456789 (ok) [yes] {no}!?\n") * 14


def corpus_path(workdir: str) -> str:
  return os.path.join(os.path.dirname(workdir), "corpus.txt")


def trained(workdir: str, *extra: str) -> None:
  train_smoke(workdir, *SHORT, *extra)
  with open(os.path.join(workdir, "config.json"), "rb") as f:  # To compare after the case.
    before = f.read()
  with open(os.path.join(os.path.dirname(workdir), "config.before"), "wb") as f:
    f.write(before)


def unchanged(workdir: str, result) -> str | None:
  """config.json as the finished run left it, one checkpoint, no change in the history."""
  with open(os.path.join(os.path.dirname(workdir), "config.before"), "rb") as f:
    before = f.read()
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    if f.read() != before:
      return "config.json rewritten"
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  if [s for s in steps if s.isdigit()] != ["2"]:
    return f"checkpoints {steps}"
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    events = [json.loads(line)["event"] for line in f]
  return None if events == ["start"] else f"history {events}"


def recorded_steps(workdir: str, result) -> str | None:
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    changes = {r["key"]: r for r in map(json.loads, f) if r["event"] == "change"}
  if changes.get("train.steps", {}).get("new") != 4:
    return f"history holds {sorted(changes)}"
  return None


def trained_on_corpus(edit):
  def prepare(workdir: str) -> None:
    os.makedirs(workdir)
    with open(corpus_path(workdir), "w", encoding="utf-8") as f:
      f.write(CORPUS)
    trained(workdir, CORPUS_ARG.replace("{W}", workdir))
    with open(corpus_path(workdir), "w", encoding="utf-8") as f:
      f.write(edit(CORPUS))
  return prepare


def damaged(name: str, text: str, *extra: str):
  def prepare(workdir: str) -> None:
    trained(workdir, *extra)
    with open(os.path.join(workdir, name), "w") as f:
      f.write(text)
  return prepare


def seed_rewritten(workdir: str) -> None:
  """config.json as an older jaxlm left it after a resume with --config.seed=5."""
  trained(workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg["seed"] = 5
  with open(path, "w") as f:
    json.dump(cfg, f)


def only_config(workdir: str) -> None:
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write('{"model": ')


def no_get_config(workdir: str) -> None:
  os.makedirs(workdir)
  with open(os.path.join(os.path.dirname(workdir), "noget.py"), "w") as f:
    f.write("c = 1\n")


def no_init_from_hint(workdir: str, result) -> str | None:
  lines = result.error_lines()
  if lines and "--config.train.init_from" in lines[0]:
    return "offers init_from for another model shape"
  return unchanged(workdir, result)


CASES = [
    Case("resume with another seed is refused", 5,
         jaxlm("train", *SM, *SHORT, "--config.seed=5"), prepare=trained, check=unchanged,
         expect_in_output=("seed=0 but the config says 5",)),
    Case("resume with another batch size is refused", 5,
         jaxlm("train", *SM, *SHORT, "--config.train.batch_size=16"), prepare=trained,
         check=unchanged, expect_in_output=("train.batch_size=8",)),
    Case("resume extending train.steps is logged and recorded", 5,
         jaxlm("train", *SM, "--config.train.steps=4", "--config.train.eval_every=0"),
         expect_rc=(0,), prepare=trained, check=recorded_steps,
         expect_in_output=("resume at step 2 changes train.steps: 2 -> 4",)),
    Case("params --workdir drifts from the run's first seed", 5,
         jaxlm("params", "--workdir", "{W}", "--format", "json"), expect_rc=(0,),
         prepare=seed_rewritten, expect_in_output=('"seed": 0',)),
    Case("resume of a corpus edited in place is refused", 6,
         jaxlm("train", *SM, *SHORT, CORPUS_ARG),
         prepare=trained_on_corpus(lambda t: t.replace("z", "~")), check=unchanged,
         expect_in_output=("'~'", "tokenizer.json")),
    Case("resume of a corpus that lost a character keeps its ids", 6,
         jaxlm("train", *SM, "--config.train.steps=3", "--config.train.eval_every=0",
               CORPUS_ARG), expect_rc=(0,),
         prepare=trained_on_corpus(lambda t: t.replace("z", "a")),
         expect_in_output=("changed since step 2",)),
    Case("eval with a damaged config.json", 14, jaxlm("eval", "--workdir", "{W}"),
         expect_rc=(0,), prepare=damaged("config.json", '{"model": '),
         expect_in_output=("config.json is damaged; using the config saved with checkpoint",)),
    Case("params with a damaged config.json", 14, jaxlm("params", "--workdir", "{W}"),
         expect_rc=(0,), prepare=damaged("config.json", "[]"),
         expect_in_output=("config.json is damaged",)),
    Case("train resumes past a damaged config.json", 14,
         jaxlm("train", *SM, "--config.train.steps=3", "--config.train.eval_every=0"),
         expect_rc=(0,), prepare=damaged("config.json", "\x00\x01"),
         check=lambda w, r: None if json.load(open(os.path.join(w, "config.json")))["train"][
             "steps"] == 3 else "config.json not repaired"),
    Case("eval with only a damaged config.json", 14, jaxlm("eval", "--workdir", "{W}"),
         prepare=only_config, expect_in_output=("no checkpoint holds a copy",)),
    Case("sample with a damaged tokenizer.json", 0,
         jaxlm("sample", "--workdir", "{W}", "--max_new_tokens=4"), expect_rc=(0,),
         prepare=damaged("tokenizer.json", "{not json"),
         expect_in_output=("using the tokenizer saved with the latest checkpoint",)),
    Case("another model shape gets no init_from hint", 17,
         jaxlm("train", *SM, *SHORT, "--config.model.n_layer=3"), prepare=trained,
         check=no_init_from_hint, expect_in_output=("model.n_layer=2",)),
    Case("a config file without get_config says so", 17,
         jaxlm("train", "--config", "{W}/../noget.py", "--workdir", "{W}"),
         prepare=no_get_config, expect_in_output=("has no get_config()",)),
]
