"""`python -m jaxlm.lm_eval_backend ARGS`: lm-eval's command line, with the model "jaxlm" in it.

  python -m jaxlm.lm_eval_backend --model jaxlm --model_args workdir=runs/x,step=best \
      --tasks hellaswag --batch_size 32

ARGS are lm-eval's own. lm-eval 0.4.13 discovers no plugins, so this wrapper imports
jaxlm.tasks.harness (which registers "jaxlm") and then hands ARGS to lm-eval's CLI. A jaxlm
error (lm-eval not installed, no checkpoint, a bad model argument) is one line, exit 2.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from jaxlm.errors import JaxlmError


def _fail(error: JaxlmError) -> NoReturn:
  sys.stderr.write(f"jaxlm: error: {error}\n")
  sys.exit(2)


def main(argv: list[str]) -> None:
  try:
    from jaxlm.tasks import harness  # noqa: F401  (registers the model, or gives the hint)
  except JaxlmError as e:
    _fail(e)
  from lm_eval import __main__ as lm_eval_cli
  sys.argv = ["lm_eval", *argv]  # lm-eval's CLI parses sys.argv itself.
  try:
    lm_eval_cli.cli_evaluate()
  except JaxlmError as e:  # From the model: no checkpoint, a bad model argument, ...
    _fail(e)


if __name__ == "__main__":
  main(sys.argv[1:])
