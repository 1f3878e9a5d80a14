"""`python -m jaxlm.cli ...`: the same as the `jaxlm` console script.

jaxlm/host/launch.py, jaxlm/host/tpu.py and sweep.py start their child processes this way, so
they run the interpreter (and virtualenv) of the parent rather than whatever `jaxlm` is on PATH.
"""

from jaxlm.cli import run

run()
