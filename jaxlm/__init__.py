"""jaxlm: train and study decoder-only language models in JAX."""

import time as _time

# When jaxlm was first imported in this process: where a run's "startup" phase begins
# (jaxlm.phases.process_start). Taken before any other import of the package.
IMPORTED_AT = _time.perf_counter()

__version__ = "0.1.0"
