"""The `jaxlm` console script: `jaxlm <command> --config FILE --workdir DIR [--config.K=V ...]`.

Commands: train, eval, sample. Each command parses flags, hands the locked config to the
library and prints bad input as one line (`jaxlm: error: ...`) instead of a traceback.
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.errors import JaxlmError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()); override any "
    "key with --config.section.key=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_STEP = flags.DEFINE_string("step", None, "Checkpoint to load: a step number, 'latest' (the "
                            "default) or 'best' (lowest validation loss).")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "Batches to evaluate (default: the run's "
                                   "train.eval_steps).")

# `jaxlm sample` flags; None = the value in the run's config.json `sample` section.
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue (default: sample.prompt).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this UTF-8 file.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest set of most likely "
                            "tokens whose probability reaches p; 1 = off.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw from the prompt; one is "
                                    "printed as it is decoded, several at the end.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")

USAGE = """usage: jaxlm <command> [flags]

commands:
  train   train a model, or resume it:
            jaxlm train --config configs/shakespeare_char.py --workdir runs/sc
  eval    evaluate a checkpoint:  jaxlm eval --workdir runs/sc [--step N|best]
  sample  generate text from a trained run:
            jaxlm sample --workdir runs/sc --prompt "ROMEO:" --temperature 0.8 --top_k 40 \\
                --top_p 0.95 [--max_new_tokens N] [--num_samples N] [--seed N] [--step N|best]
                [--prompt_file F]
"""


def _require(flag_value, name: str) -> None:
  if flag_value is None:
    raise JaxlmError(f"--{name} is required")


def cmd_train(argv: list[str]) -> None:
  del argv
  _require(_CONFIG.value, "config")
  _require(_WORKDIR.value, "workdir")
  from jaxlm import train  # Imported here so that `jaxlm --help` does not load jax.
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _step_flag() -> int | str | None:
  value = _STEP.value
  if value is None or value in ("latest", "best"):
    return value
  try:
    return int(value)
  except ValueError:
    raise JaxlmError(f"--step must be a number, 'latest' or 'best', got {value!r}") from None


def cmd_eval(argv: list[str]) -> None:
  del argv
  _require(_WORKDIR.value, "workdir")
  from jaxlm import train
  result = train.evaluate_run(_WORKDIR.value, step=_step_flag(), eval_steps=_EVAL_STEPS.value)
  print(f"step {result['step']} | val loss {result['val/loss']:.4f} | val perplexity "
        f"{result['val/perplexity']:.3f} | val bits/token {result['val/bits_per_token']:.4f} | "
        f"{result['tokens']:,} tokens")


def _read_prompt() -> str | None:
  if _PROMPT.value is not None and _PROMPT_FILE.value is not None:
    raise JaxlmError("give --prompt or --prompt_file, not both")
  if _PROMPT_FILE.value is None:
    return _PROMPT.value
  try:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise JaxlmError(f"cannot read --prompt_file {_PROMPT_FILE.value!r}: {e.strerror}") from None
  except UnicodeDecodeError as e:
    raise JaxlmError(f"--prompt_file {_PROMPT_FILE.value!r} is not UTF-8 text (byte "
                     f"{e.start})") from None


def cmd_sample(argv: list[str]) -> None:
  del argv
  _require(_WORKDIR.value, "workdir")
  if _NUM_SAMPLES.value < 1:
    raise JaxlmError(f"--num_samples must be >= 1, got {_NUM_SAMPLES.value}")
  prompt = _read_prompt()
  import jax

  from jaxlm import sample, train
  run = train.load_run(_WORKDIR.value, step=_step_flag())
  saved = run.cfg.sample
  choose = lambda flag, default: default if flag.value is None else flag.value
  settings = sample.SampleSettings(
      max_new_tokens=choose(_MAX_NEW_TOKENS, saved.max_new_tokens),
      temperature=choose(_TEMPERATURE, saved.temperature), top_k=choose(_TOP_K, saved.top_k),
      top_p=choose(_TOP_P, saved.top_p), vocab_size=run.tokenizer.vocab_size)
  prompts = [saved.prompt if prompt is None else prompt] * _NUM_SAMPLES.value
  sample.encode_prompts(run.tokenizer, prompts[:1])  # Bad prompts fail before compiling.
  sampler = sample.make_sampler(run.model, settings)
  logging.info("sampling from %s at step %d: %s", _WORKDIR.value, run.step, settings)
  streaming = len(prompts) == 1

  def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

  if streaming:
    write(prompts[0])
  result = sample.sample_text(sampler, run.params, run.tokenizer, prompts,
                              jax.random.key(_SEED.value), on_text=write if streaming else None)
  if streaming:
    write("\n")
  else:
    for text in result.texts:
      write(f"{prompts[0]}{text}\n---------------\n")
  logging.info("%d sample(s), %d tokens in %.2fs: %.1f tokens/s (compile %.2fs, not counted)",
               len(prompts), result.num_tokens, result.seconds, result.tokens_per_sec,
               result.compile_seconds)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample}


class _QuietLibraries(py_logging.Filter):
  """Hides orbax's per-save bookkeeping and JAX's backend probing unless --verbosity >= 1."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR or logging.get_verbosity() >= 1:
      return True
    path = record.pathname.replace("\\", "/")
    return "/orbax/" not in path and not path.endswith("xla_bridge.py")


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = f"unknown command {argv[1]!r}\n" if len(argv) > 1 else ""
    sys.stderr.write(got + USAGE)
    sys.exit(2)
  for handler in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_QuietLibraries())
  try:
    COMMANDS[argv[1]](argv[2:])
  except JaxlmError as e:
    logging.flush()
    sys.stderr.write(f"jaxlm: error: {e}\n")
    sys.exit(2)
  except KeyboardInterrupt:
    sys.stderr.write("jaxlm: aborted\n")
    sys.exit(130)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config errors (unknown key, bad value) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
  except (KeyError, AttributeError) as e:
    # ml_collections reports an unknown override key as KeyError('key\nDid you mean ...?').
    text = str(e.args[0] if e.args else e)
    text = text.replace("\\n", "\n").replace('\\"', '"').replace("\\'", "'")
    lines = [line.strip("'\" ") for line in text.splitlines()] or [""]
    key, hint = lines[0], (lines[1] if len(lines) > 1 else "")
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=")[0].split(".")), key)
    msg = f"unknown config key {flag}" + (f" ({hint})" if hint else "")
  sys.stderr.write(f"jaxlm: error: {msg}\n")
  sys.exit(2)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
