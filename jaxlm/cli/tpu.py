"""`jaxlm tpu VERB`: Cloud TPU VMs through gcloud: up, run, logs, stop, down, and watch (which
relaunches a preempted run). See experiments/tpu/README.md."""

from __future__ import annotations

from absl import flags

USAGE = """\
usage: jaxlm tpu VERB --tpu_name NAME --tpu_zone ZONE [--tpu_accelerator TYPE] [flags]
           [-- COMMAND [its flags]]

VERB is one of up, run, logs, stop, down, watch; run and watch take the jaxlm command to start
on every worker after --, e.g.
  jaxlm tpu watch --tpu_name lm1 --tpu_zone us-central2-b --tpu_accelerator v4-8 --tpu_spot \\
    -- train --config configs/shakespeare_char.py --workdir gs://B/sc
"""
# The dispatcher adds this to a flag of another command: it was meant for COMMAND.
CHILD_HINT = ("the command to run on the workers and its flags go after --: "
              "jaxlm tpu run [flags] -- train --config C --workdir gs://B/W")

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "tpu: name of the TPU VM (slice).",
                                flag_values=FLAGS)
_TPU_ZONE = flags.DEFINE_string("tpu_zone", None, "tpu: zone, e.g. us-central2-b.",
                                flag_values=FLAGS)
_TPU_ACCELERATOR = flags.DEFINE_string("tpu_accelerator", None,
                                       "tpu: accelerator type, e.g. v4-8, v4-32, v5litepod-16.",
                                       flag_values=FLAGS)
_TPU_VERSION = flags.DEFINE_string("tpu_version", "", "tpu: runtime version (default: the one "
                                   "Google recommends for JAX on that TPU generation).",
                                   flag_values=FLAGS)
_TPU_SPOT = flags.DEFINE_bool("tpu_spot", False, "tpu: a Spot VM: far cheaper, preemptible.",
                              flag_values=FLAGS)
_TPU_PREEMPTIBLE = flags.DEFINE_bool("tpu_preemptible", False,
                                     "tpu: a preemptible VM (the older kind; at most 24 hours).",
                                     flag_values=FLAGS)
_TPU_QUEUED = flags.DEFINE_bool("tpu_queued", False, "tpu: request the slice as a queued "
                                "resource, which waits for capacity instead of failing.",
                                flag_values=FLAGS)
_TPU_REPO = flags.DEFINE_string("tpu_repo", "", "tpu: git URL the workers clone (default: "
                                "copy this checkout's committed HEAD).", flag_values=FLAGS)
_TPU_JAX = flags.DEFINE_string("tpu_jax", "jax[tpu]", "tpu: pip requirement for JAX on the "
                               "workers, e.g. 'jax[tpu]==0.6.2'.", flag_values=FLAGS)
_TPU_CHECK_ZONE = flags.DEFINE_bool("tpu_check_zone", True, "tpu: refuse a zone that does not "
                                    "offer the accelerator (per jaxlm's snapshot of the docs).",
                                    flag_values=FLAGS)
_TPU_POLL = flags.DEFINE_float("tpu_poll", 60, "tpu watch: seconds between checks.",
                               flag_values=FLAGS)
_TPU_MAX_RETRIES = flags.DEFINE_integer("tpu_max_retries", 5,
                                        "tpu watch: relaunches before giving up.",
                                        flag_values=FLAGS)
_TPU_DOWN_WHEN_DONE = flags.DEFINE_bool("tpu_down_when_done", False,
                                        "tpu watch: delete the slice once the run has finished.",
                                        flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.",
                             flag_values=FLAGS)


def main(argv: list[str]) -> None:
  # argv: the verb, then the command after `--` with its flags (positional words count too).
  from jaxlm.host import tpu
  tpu.main(argv[0] if argv else "", argv[1:], name=_TPU_NAME.value, zone=_TPU_ZONE.value,
           accelerator=_TPU_ACCELERATOR.value, version=_TPU_VERSION.value,
           spot=_TPU_SPOT.value, preemptible=_TPU_PREEMPTIBLE.value, queued=_TPU_QUEUED.value,
           repo_url=_TPU_REPO.value, jax=_TPU_JAX.value, check_zone=_TPU_CHECK_ZONE.value,
           poll=_TPU_POLL.value, max_retries=_TPU_MAX_RETRIES.value,
           down_when_done=_TPU_DOWN_WHEN_DONE.value, dry_run=_DRY_RUN.value)
