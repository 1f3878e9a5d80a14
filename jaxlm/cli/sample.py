"""`jaxlm sample`: generate text from a trained run, streaming one sample or printing several.

The sampling flags default to None: the value in the run's config.json `sample` section.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import flags, logging

from jaxlm.cli import common
from jaxlm.errors import JaxlmError

USAGE = """\
usage: jaxlm sample --workdir DIR [--prompt TEXT | --prompt_file F] [--temperature X]
           [--top_k N] [--top_p X] [--max_new_tokens N] [--num_samples N] [--seed N]
           [--step N|latest|best]

Generates text from a checkpoint of the run in --workdir, e.g.
  jaxlm sample --workdir runs/sc --prompt "ROMEO:" --temperature 0.8 --top_k 40 --top_p 0.95
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_WORKDIR = common.define_workdir(FLAGS)
_STEP = common.define_step(FLAGS)
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue (default: sample.prompt).",
                              flag_values=FLAGS)
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this UTF-8 file.",
                                   flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per sample.",
                                       flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature; 0 = greedy.",
                                  flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens; 0 = off.",
                              flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest set of most likely "
                            "tokens whose probability reaches p; 1 = off.", flag_values=FLAGS)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw from the prompt; one is "
                                    "printed as it is decoded, several at the end.",
                                    flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.",
                             flag_values=FLAGS)


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


class _Interrupt:
  """Ctrl-C as a flag, asked between decode chunks.

  A KeyboardInterrupt raised while a decode call is still running on the device (dispatch is
  asynchronous) ends the interpreter under XLA's feet, which can crash it (SIGSEGV); the flag
  lets the current chunk finish first. A second Ctrl-C exits at once, without cleanup.
  """

  def __init__(self):
    self.pressed = False
    signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame) -> None:
    if self.pressed:
      os._exit(130)
    self.pressed = True

  def __call__(self) -> bool:
    return self.pressed


def _interrupted(done: str) -> None:
  """The one line of a Ctrl-C, then exit 130 (what a shell reports for SIGINT)."""
  sys.stdout.flush()
  sys.stderr.write(f"jaxlm: interrupted{done}\n")
  sys.stderr.flush()
  # os._exit: nothing is left to save, and interpreter teardown with live device buffers is
  # where a crash would come from.
  os._exit(130)


def main(argv: list[str]) -> None:
  del argv
  interrupt = _Interrupt()
  common.require(_WORKDIR.value, "workdir")
  if _NUM_SAMPLES.value < 1:
    raise JaxlmError(f"--num_samples must be >= 1, got {_NUM_SAMPLES.value}")
  prompt = _read_prompt()
  import jax

  from jaxlm import runs, sample
  run = runs.load_run(_WORKDIR.value, step=common.parse_step(_STEP.value))
  saved = run.cfg.sample
  choose = lambda flag, default: default if flag.value is None else flag.value
  settings = sample.SampleSettings(
      max_new_tokens=choose(_MAX_NEW_TOKENS, saved.max_new_tokens),
      temperature=choose(_TEMPERATURE, saved.temperature), top_k=choose(_TOP_K, saved.top_k),
      top_p=choose(_TOP_P, saved.top_p), vocab_size=run.tokenizer.vocab_size)
  prompts = [saved.prompt if prompt is None else prompt] * _NUM_SAMPLES.value
  sample.encode_prompts(run.tokenizer, prompts[:1])  # Bad prompts fail before compiling.
  sampler = sample.make_sampler(run.model, settings)
  if interrupt():
    _interrupted(" before sampling")
  logging.info("sampling from %s at step %d: %s", _WORKDIR.value, run.step, settings)
  streaming = len(prompts) == 1

  def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

  if streaming:
    write(prompts[0])
  result = sample.sample_text(sampler, run.params, run.tokenizer, prompts,
                              jax.random.key(_SEED.value), on_text=write if streaming else None,
                              should_stop=interrupt)
  if result.interrupted:
    if streaming:
      write("\n")
    _interrupted(f" after {result.num_tokens} of "
                 f"{len(prompts) * settings.max_new_tokens} tokens")
  if streaming:
    write("\n")
  else:
    for text in result.texts:
      write(f"{prompts[0]}{text}\n---------------\n")
  logging.info("%d sample(s), %d tokens in %.2fs: %.1f tokens/s (compile %.2fs, not counted)",
               len(prompts), result.num_tokens, result.seconds, result.tokens_per_sec,
               result.compile_seconds)
