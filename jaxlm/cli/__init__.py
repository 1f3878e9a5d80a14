"""The `jaxlm` console script: `jaxlm <command> --config FILE --workdir DIR [--config.K=V ...]`.

Commands: train, eval, sample, sweep, bench, params, convert, launch, tpu. Each command parses
flags, hands the locked config to the library and prints bad input as one line
(`jaxlm: error: ...`) instead of a traceback.
"""

from __future__ import annotations

import logging as py_logging
import os
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
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "launch: processes to start.")
_DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", 0, "launch: fake CPU devices per process (0 = the real devices).")
_TIMEOUT = flags.DEFINE_float("timeout", 0, "launch: stop everything after this many seconds "
                              "(0 = no limit).")
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout", 300, "launch: seconds for all peers to join.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout", 100,
                                          "launch: seconds of silence before a peer is dead.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "launch: host:port of process 0 "
                                   "(default: a free loopback port).")
_PROCESS_IDS = flags.DEFINE_list("process_ids", [], "launch: start only these process ids here "
                                 "(default: all).")
_BENCH_STEPS = flags.DEFINE_integer("steps", 20, "bench: timed steps after warm-up.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "bench: also write the report to this file.")
_PROFILE = flags.DEFINE_string("profile", None, "bench: trace a few steps with the JAX profiler "
                               "into this directory and list the ops that take the time.")
_SAMPLING = flags.DEFINE_bool("sampling", True, "bench: also time sampling (prefill, decode).")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "Batches to evaluate (default: the run's "
                                   "train.eval_steps).")
# `jaxlm params` flags.
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "params: report format.")
_DEVICE = flags.DEFINE_string(
    "device", None, "params: target device by name, e.g. 'TPU v4' or 'NVIDIA A100-SXM4-80GB' "
    "(sets --peak_tflops and --device_memory_gb unless they are given).")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "params: peak TFLOP/s of one device, for the step-time estimate.")
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    "device_memory_gb", None, "params: memory of one device in GiB; warns if the run won't fit.")
_MFU = flags.DEFINE_float("mfu", 0.4, "params: model FLOPs utilisation assumed for step time.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "params: devices of the target (default: this machine's).")
_PLOT = flags.DEFINE_string("plot", None, "params --workdir: write a PNG of drift per layer.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "sweep: trials to run at once.")
_SUMMARIZE = flags.DEFINE_bool("summarize", False, "sweep: only rebuild results.csv, results.md "
                               "and the plots from the trial directories in --workdir.")
_WORKER = flags.DEFINE_bool("worker", False, "sweep: run trials of an adaptive search as one of "
                            "several workers sharing its study; leaves the summary to --summarize.")
_STORAGE = flags.DEFINE_string("storage", None, "sweep: Optuna storage URL of the study, e.g. "
                               "postgresql://host/db (default: sqlite in --workdir).")
_N_TRIALS = flags.DEFINE_integer("n_trials", None, "sweep: trials of an adaptive search (default: "
                                 "the sweep file's N_TRIALS).")

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
  sweep   run (or resume) a sweep, one `jaxlm train` per trial, then a table and plots:
            jaxlm sweep --config configs/sweeps/shakespeare_lr.py --workdir runs/lr [--parallel N]
          adaptive search workers sharing one study: add --worker [--storage URL] [--n_trials N]
          rebuild the table and plots:  jaxlm sweep --summarize --workdir runs/lr
  bench   time the train step, tokens/s and MFU:  jaxlm bench --config C [--steps 20]
          [--profile DIR] [--nosampling]
  params  what the parameters are, what they cost, whether a config fits (nothing allocated):
            jaxlm params --config configs/gpt2_small.py [--device "TPU v4"] [--format json]
          and, for a trained run, how far each tensor moved from its random init:
            jaxlm params --workdir runs/sc [--step N|best] [--plot drift.png]
  convert Hugging Face GPT-2 / LLaMA checkpoints (safetensors) to a jaxlm workdir and back:
            jaxlm convert --from_hf DIR --workdir W
            jaxlm convert --to_hf --workdir W --out DIR
  launch  run a command as N processes of one JAX cluster on this machine:
            jaxlm launch --num_processes 2 --devices_per_process 2 -- train --config C --workdir W
  tpu     Cloud TPU VMs: up, run, logs, stop, down, watch (relaunches when preempted):
            jaxlm tpu watch --tpu_name lm1 --tpu_zone us-central2-b --tpu_accelerator v4-8 \\
              --tpu_spot -- train --config configs/shakespeare_char.py --workdir gs://B/sc
"""


def _require(flag_value, name: str) -> None:
  if flag_value is None:
    raise JaxlmError(f"--{name} is required")


def cmd_train(argv: list[str]) -> None:
  del argv
  _require(_CONFIG.value, "config")
  _require(_WORKDIR.value, "workdir")
  # Imported here so that `jaxlm --help` does not load jax.
  from jaxlm import host
  host.prepare_process(_CONFIG.value)
  from jaxlm import train
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
  from jaxlm import runs
  result = runs.evaluate_run(_WORKDIR.value, step=_step_flag(), eval_steps=_EVAL_STEPS.value)
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

  from jaxlm import runs, sample
  run = runs.load_run(_WORKDIR.value, step=_step_flag())
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


def cmd_params(argv: list[str]) -> None:
  del argv
  if (_CONFIG.value is None) == (_WORKDIR.value is None):
    raise JaxlmError("give --config (a config's parameters) or --workdir (a trained run's)")
  import json

  from jaxlm import params
  if _WORKDIR.value is not None:
    report = params.run_report(_WORKDIR.value, step=_step_flag())
    if _PLOT.value:
      params.plot_drift(report, _PLOT.value)
    text = params.format_run_text(report)
  else:
    if _STEP.value is not None or _PLOT.value:
      raise JaxlmError("--step and --plot need --workdir (a trained run)")
    import jax
    report = params.config_report(
        _CONFIG.value, config_path=config_flags.get_config_filename(flags.FLAGS["config"]),
        n_devices=_NUM_DEVICES.value or jax.device_count(), device=_DEVICE.value or "",
        peak_tflops=_PEAK_TFLOPS.value or 0.0, device_memory_gib=_DEVICE_MEMORY_GB.value or 0.0,
        mfu=_MFU.value)
    text = params.format_config_text(report)
  for warning in report["warnings"]:
    logging.warning("%s", warning)
  sys.stdout.write(json.dumps(report, indent=2) + "\n" if _FORMAT.value == "json" else text)


def cmd_bench(argv: list[str]) -> None:
  del argv
  _require(_CONFIG.value, "config")
  import json

  from jaxlm import host
  host.prepare_process(_CONFIG.value, compile_cache=False)
  from jaxlm import bench, workdir
  if _PROFILE.value:
    workdir.prepare(_PROFILE.value)  # A directory that cannot be made is one line, up front.
  report = bench.bench_train(_CONFIG.value, steps=_BENCH_STEPS.value,
                             profile_dir=_PROFILE.value, sampling=_SAMPLING.value)
  print(bench.format_report(report))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  print(json.dumps(report))


def cmd_launch(argv: list[str]) -> None:
  from jaxlm.host import launch
  code = launch.launch_local(argv, num_processes=_NUM_PROCESSES.value,
                             devices_per_process=_DEVICES_PER_PROCESS.value,
                             timeout=_TIMEOUT.value, init_timeout=_INIT_TIMEOUT.value,
                             heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
                             coordinator=_COORDINATOR.value,
                             process_ids=[int(i) for i in _PROCESS_IDS.value] or None)
  sys.exit(code)


def cmd_sweep(argv: list[str]) -> None:
  del argv
  _require(_WORKDIR.value, "workdir")
  from jaxlm import sweep
  if _SUMMARIZE.value:
    sweep.summarize(_WORKDIR.value)
    return
  _require(_CONFIG.value, "config")
  config_flag = flags.FLAGS["config"]
  plan = sweep.prepare(config_flags.get_config_filename(config_flag), _CONFIG.value,
                       config_flags.get_override_values(config_flag), n_trials=_N_TRIALS.value)
  sweep.run(plan, _WORKDIR.value, parallel=_PARALLEL.value, worker=_WORKER.value,
            storage=_STORAGE.value)



# `jaxlm tpu` flags: Cloud TPU VMs (experiments/tpu/README.md).
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "tpu: name of the TPU VM (slice).")
_TPU_ZONE = flags.DEFINE_string("tpu_zone", None, "tpu: zone, e.g. us-central2-b.")
_TPU_ACCELERATOR = flags.DEFINE_string("tpu_accelerator", None,
                                       "tpu: accelerator type, e.g. v4-8, v4-32, v5litepod-16.")
_TPU_VERSION = flags.DEFINE_string("tpu_version", "", "tpu: runtime version (default: the one "
                                   "Google recommends for JAX on that TPU generation).")
_TPU_SPOT = flags.DEFINE_bool("tpu_spot", False, "tpu: a Spot VM: far cheaper, preemptible.")
_TPU_PREEMPTIBLE = flags.DEFINE_bool("tpu_preemptible", False,
                                     "tpu: a preemptible VM (the older kind; at most 24 hours).")
_TPU_QUEUED = flags.DEFINE_bool("tpu_queued", False, "tpu: request the slice as a queued "
                                "resource, which waits for capacity instead of failing.")
_TPU_REPO = flags.DEFINE_string("tpu_repo", "", "tpu: git URL the workers clone (default: "
                                "copy this checkout's committed HEAD).")
_TPU_JAX = flags.DEFINE_string("tpu_jax", "jax[tpu]", "tpu: pip requirement for JAX on the "
                               "workers, e.g. 'jax[tpu]==0.6.2'.")
_TPU_CHECK_ZONE = flags.DEFINE_bool("tpu_check_zone", True, "tpu: refuse a zone that does not "
                                    "offer the accelerator (per jaxlm's snapshot of the docs).")
_TPU_POLL = flags.DEFINE_float("tpu_poll", 60, "tpu watch: seconds between checks.")
_TPU_MAX_RETRIES = flags.DEFINE_integer("tpu_max_retries", 5,
                                        "tpu watch: relaunches before giving up.")
_TPU_DOWN_WHEN_DONE = flags.DEFINE_bool("tpu_down_when_done", False,
                                        "tpu watch: delete the slice once the run has finished.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def cmd_tpu(argv: list[str]) -> None:
  from jaxlm.host import tpu
  tpu.main(argv[0] if argv else "", argv[1:], name=_TPU_NAME.value, zone=_TPU_ZONE.value,
           accelerator=_TPU_ACCELERATOR.value, version=_TPU_VERSION.value,
           spot=_TPU_SPOT.value, preemptible=_TPU_PREEMPTIBLE.value, queued=_TPU_QUEUED.value,
           repo_url=_TPU_REPO.value, jax=_TPU_JAX.value, check_zone=_TPU_CHECK_ZONE.value,
           poll=_TPU_POLL.value, max_retries=_TPU_MAX_RETRIES.value,
           down_when_done=_TPU_DOWN_WHEN_DONE.value, dry_run=_DRY_RUN.value)


_FROM_HF = flags.DEFINE_string("from_hf", None, "convert: a Hugging Face model directory "
                               "(config.json + safetensors) to import into --workdir.")
_TO_HF = flags.DEFINE_bool("to_hf", False, "convert: export --workdir to Hugging Face format.")
_OUT = flags.DEFINE_string("out", None, "convert --to_hf: the output directory.")


def cmd_convert(argv: list[str]) -> None:
  del argv
  _require(_WORKDIR.value, "workdir")
  if bool(_FROM_HF.value) == _TO_HF.value:
    raise JaxlmError("convert needs exactly one of --from_hf DIR and --to_hf")
  from jaxlm import hf
  if _FROM_HF.value:
    result = hf.import_hf(_FROM_HF.value, _WORKDIR.value)
    print(f"imported a {result['family']} of {result['params']:,} parameters into "
          f"{result['workdir']} (step 0)")
  else:
    _require(_OUT.value, "out")
    result = hf.export_hf(_WORKDIR.value, _OUT.value)
    print(f"exported a {result['family']} ({result['bytes']:,} bytes in {result['files']} "
          f"safetensors files) to {result['out']}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "sweep": cmd_sweep,
            "bench": cmd_bench, "params": cmd_params, "launch": cmd_launch, "tpu": cmd_tpu,
            "convert": cmd_convert}


class _QuietLibraries(py_logging.Filter):
  """Hides orbax's per-save bookkeeping and JAX's backend probing unless --verbosity >= 1."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR or logging.get_verbosity() >= 1:
      return True
    path = record.pathname.replace("\\", "/")
    return "/orbax/" not in path and not path.endswith("xla_bridge.py")


def _load_config() -> None:
  """Loads --config now (config_flags loads lazily), so a bad file is one line, not a traceback."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # A file that failed to load stands in as an object that raises on use.
  except Exception as e:  # noqa: BLE001  (any failure inside the user's config file)
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.exists(path):
      raise JaxlmError(f"config file not found: {path!r}") from None
    cause = e.__cause__ or e
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    raise JaxlmError(f"cannot load config file {path!r}: {first}") from None


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = f"unknown command {argv[1]!r}\n" if len(argv) > 1 else ""
    sys.stderr.write(got + USAGE)
    sys.exit(2)
  for handler in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_QuietLibraries())
  try:
    _load_config()
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
  except Exception as e:  # noqa: BLE001  (raised inside the user's config file while loading it)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = f"cannot load the config file: {type(e).__name__}: {first}"
  sys.stderr.write(f"jaxlm: error: {msg}\n")
  sys.exit(2)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
