"""`jaxlm launch`: run a jaxlm command as N processes of one JAX cluster on this machine (or
some of them here, the rest elsewhere with the same --coordinator)."""

from __future__ import annotations

import sys

from absl import flags

from jaxlm.errors import JaxlmError

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


def _process_ids() -> list[int] | None:
  try:
    return [int(i) for i in _PROCESS_IDS.value] or None
  except ValueError:
    raise JaxlmError(f"--process_ids takes comma-separated integers, e.g. --process_ids 0,1; "
                     f"got {','.join(_PROCESS_IDS.value)!r}") from None


def _check_coordinator(address: str) -> None:
  host, _, port = address.rpartition(":")
  if address and not (host and port.isdigit() and 0 < int(port) < 65536):
    raise JaxlmError(f"--coordinator must be host:port (process 0's address, e.g. "
                     f"10.0.0.2:1234), got {address!r}")


def main(argv: list[str]) -> None:
  # argv: what is left after this command's flags, i.e. the command after `--` with its flags.
  process_ids = _process_ids()
  _check_coordinator(_COORDINATOR.value)
  from jaxlm.host import launch
  code = launch.launch_local(argv, num_processes=_NUM_PROCESSES.value,
                             devices_per_process=_DEVICES_PER_PROCESS.value,
                             timeout=_TIMEOUT.value, init_timeout=_INIT_TIMEOUT.value,
                             heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
                             coordinator=_COORDINATOR.value,
                             process_ids=process_ids)
  sys.exit(code)
