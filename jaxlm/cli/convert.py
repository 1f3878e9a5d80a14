"""`jaxlm convert`: Hugging Face GPT-2 / LLaMA checkpoints (safetensors) to a jaxlm workdir, and
a jaxlm workdir back to Hugging Face format."""

from __future__ import annotations

from absl import flags

from jaxlm.cli import common
from jaxlm.errors import JaxlmError

USAGE = """\
usage: jaxlm convert --from_hf HF_DIR --workdir DIR
       jaxlm convert --to_hf --workdir DIR --out HF_DIR

Imports a Hugging Face model directory (config.json + safetensors) as step 0 of a jaxlm run, or
exports a run's checkpoint to one, with its tokenizer for AutoTokenizer when it is a BPE
(safetensors needs the hf extra: pip install 'jaxlm[hf]').
"""

FLAGS = flags.FlagValues()  # This command's flags only; the dispatcher parses argv into it.
_WORKDIR = common.define_workdir(FLAGS)
_FROM_HF = flags.DEFINE_string("from_hf", None, "convert: a Hugging Face model directory "
                               "(config.json + safetensors) to import into --workdir.",
                               flag_values=FLAGS)
_TO_HF = flags.DEFINE_bool("to_hf", False, "convert: export --workdir to Hugging Face format.",
                           flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "convert --to_hf: the output directory.",
                           flag_values=FLAGS)


def main(argv: list[str]) -> None:
  del argv
  common.require(_WORKDIR.value, "workdir")
  if bool(_FROM_HF.value) == _TO_HF.value:
    raise JaxlmError("convert needs exactly one of --from_hf DIR and --to_hf")
  from jaxlm import hf
  if _FROM_HF.value:
    result = hf.import_hf(_FROM_HF.value, _WORKDIR.value)
    print(f"imported a {result['family']} of {result['params']:,} parameters into "
          f"{result['workdir']} (step 0)")
  else:
    common.require(_OUT.value, "out")
    result = hf.export_hf(_WORKDIR.value, _OUT.value)
    tokenizer = (f" with its tokenizer ({', '.join(result['tokenizer_files'])})"
                 if result["tokenizer_files"] else "")
    print(f"exported a {result['family']} ({result['bytes']:,} bytes in {result['files']} "
          f"safetensors files){tokenizer} to {result['out']}")
    if result["note"]:
      print(result["note"])
