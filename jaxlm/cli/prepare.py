"""`jaxlm prepare`: tokenize the data.sources of a config into its token store, with progress."""

from __future__ import annotations

from absl import flags, logging

from jaxlm.cli import common
from jaxlm.errors import JaxlmError

USAGE = """\
usage: jaxlm prepare --config FILE [--rebuild] [--config.KEY=VALUE ...]

Streams every source of the config's data.sources, tokenizes it on all cores with bounded
memory, and writes the token store that `jaxlm train` with the same config reads (train does
this itself when the store is missing; prepare does it ahead, e.g. on a bigger machine):
  jaxlm prepare --config configs/fineweb_like.py
A store prepared from other sources or another tokenizer is refused; --rebuild replaces it.
"""

FLAGS = flags.FlagValues()
_CONFIG = common.define_config(FLAGS)
_REBUILD = flags.DEFINE_boolean("rebuild", False, "Delete and rewrite a store that was prepared "
                                "from other sources or another tokenizer.", flag_values=FLAGS)


def main(argv: list[str]) -> None:
  del argv
  common.require(_CONFIG.value, "config")
  # No jax here: preparing is reading, tokenizing and writing, and starts in a fraction of
  # a second.
  from jaxlm.corpus import batches as batches_lib
  from jaxlm.corpus import spec as spec_lib
  cfg = _CONFIG.value
  if not spec_lib.uses_sources(cfg):
    raise JaxlmError("jaxlm prepare reads data.sources, and this config has none (data.path "
                     "is tokenized in memory by jaxlm train): add data.sources.<name>.path")
  data = batches_lib.load(spec_lib.from_config(cfg), cfg.model.block_size, log=logging.info,
                          rebuild=_REBUILD.value)
  logging.info("data: %s", data.summary())
  for line in data.mixture(cfg.train.steps, cfg.train.batch_size):
    logging.info("mixture: %s", line)
