"""μP, the Maximal Update Parametrization (Yang et al. 2021, "Tensor Programs V: Tuning Large
Neural Networks via Zero-Shot Hyperparameter Transfer", arXiv:2203.03466): the rule table and
its optimizer side.

model.parametrization = mup with model.mup_base_width = the d_model at which the
hyperparameters were tuned; width_mult = d_model / mup_base_width. Every tensor has a μP role,
read off jaxlm's parameter roles (optim.Param.role):

  input   embeddings (wte, wpe), norm scales and all biases (vector-like: one infinite dim)
  hidden  the kernels in the blocks (matrix-like: fan_in and fan_out both grow with width)
  output  an untied head (lm_head); a tied head is wte, whose role stays input

The convention is the mup package's (github.com/microsoft/mup: MuReadout, MuSharedReadout,
MuAdam, MuSGD), the form of Table 3 of the paper that keeps the input and output weights'
init and Adam lr unchanged and moves the output's width dependence into a forward multiplier:

                       input          hidden                    output
  init std             1              1 / sqrt(width_mult)      1   (logits x 1 / width_mult)
  Adam-type lr         1              1 / width_mult            1
  SGD lr               width_mult     1                         width_mult

relative to the standard parametrization's values (GPT-2's N(0, 0.02), optim.lr), so that at
width_mult = 1 μP is exactly the sp model. With the 1 / width_mult logit multiplier, Table 3's
output init variance 1 / fan_in^2 and lr 1 / fan_in (Adam) become a constant init and lr on
the stored weight; the SGD column follows from the same change of variables (MuSGD's
vector-like rule). Attention scores use 1 / head_dim (model_config.py:
ModelConfig.attention_divisor). A tied embedding and head (GPT-2) is MuSharedReadout's case:
both roles of wte are vector-like with the same Adam lr, and the logit multiplier does the
readout's part, so tying needs no special rule.

Assumed (as the mup package's base shapes would measure): every hidden fan-in and fan-out
(heads x head_dim, d_ff) grows in proportion to d_model, so one width_mult serves all.

Adam-type here means an update whose size per entry does not depend on the gradient's scale:
adamw, lion (sign), adafactor (optim.py runs it with absolute, RMS-clipped steps) and
schedule_free_adamw (Adam's normalized step under its averaging). Muon's orthogonalized update
has another width scaling (its spectral norm is fixed); μP refuses it rather than guess.
Weight decay is decoupled (lr * weight_decay * p) and so follows each tensor's lr, as in the
mup package's MuAdamW.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from jaxlm import optim
from jaxlm.errors import JaxlmError
from jaxlm.model_config import TOKEN_EMBED, ModelConfig

PyTree = Any
MUP_ROLES = ("input", "hidden", "output")
# jaxlm's parameter role -> μP role.
ROLE_OF = {"embeddings": "input", "norms": "input", "biases": "input", "matrices": "hidden",
           "head": "output"}
# The lr multiplier of each μP role is width_mult ** exponent; the init std multiplier is
# width_mult ** INIT_EXPONENT (the model applies it, model_config.hidden_init_mult).
ADAM_LR_EXPONENT = {"input": 0.0, "hidden": -1.0, "output": 0.0}
SGD_LR_EXPONENT = {"input": 1.0, "hidden": 0.0, "output": 1.0}
LR_EXPONENT = {"adamw": ADAM_LR_EXPONENT, "lion": ADAM_LR_EXPONENT,
               "adafactor": ADAM_LR_EXPONENT, "schedule_free_adamw": ADAM_LR_EXPONENT,
               "sgd": SGD_LR_EXPONENT}
INIT_EXPONENT = {"input": 0.0, "hidden": -0.5, "output": 0.0}


def enabled(mcfg: ModelConfig) -> bool:
  return mcfg.parametrization == "mup"


def optimizers_of(opt_cfg: ml_collections.ConfigDict) -> list[str]:
  if opt_cfg.groups:
    return [g.optimizer for g in opt_cfg.groups.values()]
  return [opt_cfg.name]


def check_optimizers(mcfg: ModelConfig, opt_cfg: ml_collections.ConfigDict) -> None:
  """Refuses μP with an optimizer that has no rule in the table (muon), before any compile."""
  if not enabled(mcfg):
    return
  for name in optimizers_of(opt_cfg):
    if name not in LR_EXPONENT:
      raise JaxlmError(f"μP has no rule for optimizer {name}; use "
                       f"{', '.join(n for n in LR_EXPONENT if n != 'sgd')} or sgd (or "
                       "model.parametrization=sp)")


def role(p: optim.Param) -> str:
  return ROLE_OF.get(p.role, "input")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor's μP role and multipliers (relative to sp at the same width)."""
  role: str
  init_mult: float
  lr_mult: float


def rule(mcfg: ModelConfig, optimizer: str, p: optim.Param) -> Rule:
  r = role(p)
  m = mcfg.width_mult
  init = mcfg.hidden_init_mult if r == "hidden" else 1.0
  lr = m ** LR_EXPONENT[optimizer][r] if enabled(mcfg) else 1.0
  if mcfg.tie_embeddings and p.path == f"{TOKEN_EMBED}/embedding":
    r = "input (+ tied output)"  # MuSharedReadout: the input rule, logits x logit_mult.
  return Rule(r, init, lr)


def split_groups(mcfg: ModelConfig, opt_cfg: ml_collections.ConfigDict, params: PyTree,
                 groups: tuple[optim.Group, ...]) -> tuple[optim.Group, ...]:
  """The optimizer groups under μP: each group (or the single optimizer, as group "all") split
  by μP role, its lr_mult times the role's lr multiplier. Group names: input / hidden /
  output without optim.groups, else <group>_<role>. sp: the groups unchanged."""
  if not enabled(mcfg):
    return groups
  check_optimizers(mcfg, opt_cfg)
  if not groups:
    groups = (optim.Group("all", opt_cfg.name, 1.0, None, tuple(optim.params_of(params))),)
  out = []
  for g in groups:
    for r in MUP_ROLES:
      members = tuple(p for p in g.params if role(p) == r)
      if not members:
        continue
      name = r if g.name == "all" else f"{g.name}_{r}"
      lr_mult = g.lr_mult * mcfg.width_mult ** LR_EXPONENT[g.optimizer][r]
      out.append(optim.Group(name, g.optimizer, lr_mult, g.weight_decay, members))
  return tuple(out)


def describe(mcfg: ModelConfig) -> str:
  """One line: the width multiplier and the model-side multipliers."""
  return (f"μP: width_mult {mcfg.width_mult:g} (d_model {mcfg.d_model} / base "
          f"{mcfg.mup_base_width}), logits x {mcfg.logit_mult:g}, attention scores x "
          f"sqrt({mcfg.base_head_dim}) / {mcfg.head_dim} (base head dim / head dim), hidden "
          f"init std x {mcfg.hidden_init_mult:g}")
