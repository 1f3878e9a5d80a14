"""`jaxlm launch`: run a jaxlm command as N processes of one JAX cluster on this machine (or
some of them here, the rest elsewhere with the same --coordinator)."""

from __future__ import annotations

import sys

from absl import flags

USAGE = """\
usage: jaxlm launch [--num_processes N] [--devices_per_process N] [--timeout S] [flags]
           -- COMMAND [its flags]

Starts `jaxlm COMMAND` as N processes of one multi-process JAX cluster (loopback), relays their
logs with a [i] prefix and stops them all when one fails, e.g.
  jaxlm launch --num_processes 2 --devices_per_process 2 -- train --config C --workdir W
"""
# The dispatcher adds this to a flag of another command: it was meant for COMMAND.
CHILD_HINT = ("the command to launch and its flags go after --: "
              "jaxlm launch --num_processes 2 -- train --config C --workdir W")

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "launch: processes to start.",
                                      flag_values=FLAGS)
_DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", 0, "launch: fake CPU devices per process (0 = the real devices).",
    flag_values=FLAGS)
_TIMEOUT = flags.DEFINE_float("timeout", 0, "launch: stop everything after this many seconds "
                              "(0 = no limit).", flag_values=FLAGS)
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout", 300, "launch: seconds for all peers to join.",
                                     flag_values=FLAGS)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout", 100,
                                          "launch: seconds of silence before a peer is dead.",
                                          flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string("coordinator", "", "launch: host:port of process 0 "
                                   "(default: a free loopback port).", flag_values=FLAGS)
_PROCESS_IDS = flags.DEFINE_list("process_ids", [], "launch: start only these process ids here "
                                 "(default: all).", flag_values=FLAGS)


def main(argv: list[str]) -> None:
  # argv: what is left after this command's flags, i.e. the command after `--` with its flags.
  from jaxlm.host import launch
  code = launch.launch_local(argv, num_processes=_NUM_PROCESSES.value,
                             devices_per_process=_DEVICES_PER_PROCESS.value,
                             timeout=_TIMEOUT.value, init_timeout=_INIT_TIMEOUT.value,
                             heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
                             coordinator=_COORDINATOR.value,
                             process_ids=[int(i) for i in _PROCESS_IDS.value] or None)
  sys.exit(code)
