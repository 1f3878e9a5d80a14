"""Optimizers, learning-rate schedules and parameter groups from the `optim` config section.

Every optimizer is optax's own; this module only picks one per parameter group, gives it the
shared schedule times the group's lr_mult and its weight decay, and glues the groups together
with optax.multi_transform. With no groups (and a name other than muon) the whole tree gets one
optimizer, exactly as before groups existed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from optax import contrib as optax_contrib
from optax.transforms import _masking as optax_masking

from jaxlm import axes, schedules
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

# The schedules (jaxlm/schedules.py) are part of what optim offers.
SCHEDULES, DECAY_SHAPES, SCHEDULE_FREE = (schedules.SCHEDULES, schedules.DECAY_SHAPES,
                                          schedules.SCHEDULE_FREE)
make_schedule, group_schedule = schedules.make_schedule, schedules.group_schedule
lr_at, lr_curves = schedules.lr_at, schedules.lr_curves

PyTree = Any
OPTIMIZERS = ("adamw", "lion", "sgd", "adafactor", "muon", "schedule_free_adamw")
# Role keywords of optim.groups.*.roles; every parameter of the model has exactly one.
ROLES = ("matrices", "embeddings", "head", "norms", "biases")
GROUP_KEYS = ("match", "roles", "optimizer", "lr_mult", "weight_decay")


# --- Parameters and their roles -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Param:
  """One parameter tensor as the optimizer sees it: name, shape and logical axes if known."""
  path: str
  shape: tuple[int, ...]
  logical_axes: tuple[str | None, ...] | None

  @property
  def count(self) -> int:
    return math.prod(self.shape)

  @property
  def matrix_axes(self) -> tuple[int, ...]:
    """The axes that are not the stacked layers axis of scan_layers."""
    if self.logical_axes is None:
      return tuple(range(len(self.shape)))
    return tuple(i for i, a in enumerate(self.logical_axes) if a != axes.LAYERS)

  @property
  def role(self) -> str:
    """matrices (kernels in the blocks), embeddings, head (an untied output head), norms (norm
    scales) or biases (linear biases and LayerNorm shifts); '' for anything else."""
    top, _, rest = self.path.partition("/")
    last = self.path.rsplit("/", 1)[-1]
    if last == "embedding":
      return "embeddings"
    if last == "kernel":
      return "head" if top == model_lib.HEAD else "matrices"
    return {"scale": "norms", "bias": "biases"}.get(last, "")


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def params_of(params: PyTree) -> list[Param]:
  """The tensors of a param tree (boxed, abstract or concrete), in tree order."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
    value = leaf.value if _is_box(leaf) else leaf
    names = tuple(leaf.names) if _is_box(leaf) else None
    out.append(Param(model_lib.path_name(path), tuple(int(d) for d in value.shape), names))
  return out


def muon_dimension_numbers(p: Param) -> optax_contrib.MuonDimensionNumbers:
  """Which axes of a kernel Newton-Schulz treats as its input (reduction) and output.

  Every other axis is a batch axis, orthogonalized independently: the layers axis of
  scan_layers and unnamed axes such as key_value's k/v pair (keys and values are two
  matrices). The embed axis is the input of a projection out of the residual stream (query,
  fc: D -> heads x head_dim, mlp) and the output of one into it (out, proj). Without logical
  axes the first axis is the input and the rest the output, flax's DenseGeneral layout.
  """
  names = p.logical_axes or (axes.EMBED,) + ("?",) * (len(p.shape) - 1)
  batch = [i for i, a in enumerate(names) if a == axes.LAYERS]
  unnamed = [i for i, a in enumerate(names) if a is None]
  if len(names) - len(batch) - len(unnamed) >= 2:
    batch += unnamed
  matrix = [i for i in range(len(names)) if i not in batch]
  if names[matrix[-1]] == axes.EMBED and names[matrix[0]] != axes.EMBED:
    reduction, output = matrix[:-1], matrix[-1:]
  else:
    reduction, output = matrix[:1], matrix[1:]
  return optax_contrib.MuonDimensionNumbers(reduction_axis=tuple(reduction),
                                            output_axis=tuple(output))


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices and embeddings only, never on biases or norm scales (GPT-2)."""
  def decays(path, _):
    return model_lib.path_name(path).rpartition("/")[2] in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decays, params)


# --- Groups ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Group:
  """A resolved parameter group: its optimizer, lr multiplier, weight decay and tensors."""
  name: str
  optimizer: str
  lr_mult: float
  # An explicit decay applies to every tensor of the group; None = optim.weight_decay on its
  # kernels and embeddings only (the rule without groups).
  weight_decay: float | None
  params: tuple[Param, ...]

  @property
  def n_params(self) -> int:
    return sum(p.count for p in self.params)

  def decay_text(self, default: float) -> str:
    if self.weight_decay is None:
      return f"{default:g} (kernels, embeddings)"
    return f"{self.weight_decay:g}"


def _split(roles: str) -> list[str]:
  return [r.strip() for r in roles.split(",") if r.strip()]


def check_config(opt_cfg: ml_collections.ConfigDict) -> None:
  """What can be checked without the model: names, ranges, the groups' own keys."""
  if opt_cfg.name not in OPTIMIZERS:
    raise JaxlmError(f"unknown optim.name={opt_cfg.name!r}: expected one of "
                     f"{', '.join(OPTIMIZERS)}")
  if opt_cfg.schedule not in SCHEDULES:
    raise JaxlmError(f"unknown optim.schedule={opt_cfg.schedule!r}: expected one of "
                     f"{', '.join(SCHEDULES)}")
  if opt_cfg.decay_shape not in DECAY_SHAPES:
    raise JaxlmError(f"unknown optim.decay_shape={opt_cfg.decay_shape!r}: expected one of "
                     f"{', '.join(DECAY_SHAPES)}")
  # Every number is checked to be finite too: a NaN passes any comparison-based check
  # (`nan < 0` is false), compiles, and trains to NaN.
  in_range = {
      "decay_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
      "lr": (lambda v: v >= 0, ">= 0"), "min_lr": (lambda v: v >= 0, ">= 0"),
      "warmup_steps": (lambda v: v >= 0, ">= 0"),
      "muon_adam_lr_mult": (lambda v: v >= 0, ">= 0"),
      # Decay rates of moving averages: 1 never forgets its initial zeros; b1 = 0 is sgd
      # without momentum (and an adamw without it).
      "b1": (lambda v: 0 <= v < 1, "in [0, 1)"), "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "muon_beta": (lambda v: 0 <= v < 1, "in [0, 1)"),
      # adamw's (and schedule-free adamw's) update divides by sqrt(nu) + eps: eps = 0 turns a
      # tensor entry whose gradient is exactly 0 (an unused embedding row) into 0/0 = NaN.
      # The other optimizers ignore eps.
      "eps": (lambda v: v > 0, "> 0"),
      "weight_decay": (lambda v: v >= 0, ">= 0 (negative decay grows the weights)"),
      "grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
  }
  for key, (ok, want) in in_range.items():
    if key in opt_cfg and not (_finite(opt_cfg[key]) and ok(opt_cfg[key])):
      raise JaxlmError(f"optim.{key}={opt_cfg[key]} must be {want}")
  # The decaying schedules end at min_lr, so min_lr > lr would make them rise. A constant
  # schedule and schedule-free optimizers (which always run constant) never reach min_lr,
  # so there it is left alone: the default min_lr must not refuse a low constant lr.
  optimizers = ({g.optimizer for g in opt_cfg.groups.values()} if opt_cfg.groups
                else {opt_cfg.name})
  decays = opt_cfg.schedule != "constant" and bool(optimizers - set(SCHEDULE_FREE))
  if decays and opt_cfg.min_lr > opt_cfg.lr:
    raise JaxlmError(f"optim.min_lr={opt_cfg.min_lr} is above optim.lr={opt_cfg.lr}: the "
                     f"{opt_cfg.schedule} schedule decays from lr to min_lr; lower min_lr")
  for name, g in opt_cfg.groups.items():
    where = f"optim.groups.{name}"
    if not isinstance(g, ml_collections.ConfigDict):
      raise JaxlmError(f"{where} must be a group (make one with defaults.group(...))")
    unknown = sorted(set(g.keys()) - set(GROUP_KEYS))
    if unknown:
      raise JaxlmError(f"{where} has unknown key(s) {', '.join(unknown)}: a group has "
                       f"{', '.join(GROUP_KEYS)}")
    if g.optimizer not in OPTIMIZERS:
      raise JaxlmError(f"unknown {where}.optimizer={g.optimizer!r}: expected one of "
                       f"{', '.join(OPTIMIZERS)}")
    if not (_finite(g.lr_mult) and g.lr_mult >= 0):
      raise JaxlmError(f"{where}.lr_mult={g.lr_mult} must be >= 0")
    if g.weight_decay is not None and not (_finite(g.weight_decay) and g.weight_decay >= 0):
      raise JaxlmError(f"{where}.weight_decay={g.weight_decay} must be >= 0")
    bad = [r for r in _split(g.roles) if r not in ROLES]
    if bad:
      raise JaxlmError(f"unknown role {bad[0]!r} in {where}.roles: expected one of "
                       f"{', '.join(ROLES)}")
    if not g.match and not _split(g.roles):
      raise JaxlmError(f"{where} selects nothing: give it match (a regex over parameter paths) "
                       "and/or roles")
    try:
      re.compile(g.match)
    except re.error as e:
      raise JaxlmError(f"{where}.match={g.match!r} is not a regex: {e}") from None


def _finite(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _selects(g: ml_collections.ConfigDict, p: Param) -> bool:
  """A group takes a tensor that has one of its roles (if any) and whose path matches its
  regex anywhere (if any): both must hold when both are given."""
  roles = _split(g.roles)
  return (not roles or p.role in roles) and (not g.match or re.search(g.match, p.path) is not None)


def _describe(g: ml_collections.ConfigDict) -> str:
  return ", ".join(f"{k}={g[k]!r}" for k in ("match", "roles") if g[k])


def uses_groups(opt_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the optimizer is built from groups (and so needs the model's params)."""
  return bool(opt_cfg.groups) or opt_cfg.name == "muon"


def resolve_groups(opt_cfg: ml_collections.ConfigDict, params: PyTree) -> tuple[Group, ...]:
  """The groups of `params` (boxed or abstract: the logical axes name muon's matrix axes).

  () when one optimizer takes every tensor (no groups, optim.name not muon). With
  optim.name = muon and no groups: the standard recipe, muon on the matrices of the blocks
  and adamw (at lr * muon_adam_lr_mult) on everything else. Raises JaxlmError naming a tensor
  that no group or two groups select, a group that selects nothing, or a muon group holding a
  tensor that is not a matrix.
  """
  check_config(opt_cfg)
  if not uses_groups(opt_cfg):
    return ()
  tensors = params_of(params)
  if not opt_cfg.groups:
    groups = [
        Group("muon", "muon", 1.0, None, tuple(p for p in tensors if p.role == "matrices")),
        Group("adamw", "adamw", float(opt_cfg.muon_adam_lr_mult), None,
              tuple(p for p in tensors if p.role != "matrices"))]
    return tuple(g for g in groups if g.params)
  specs = dict(opt_cfg.groups.items())
  members: dict[str, list[Param]] = {name: [] for name in specs}
  for p in tensors:
    hits = [name for name, g in specs.items() if _selects(g, p)]
    if not hits:
      raise JaxlmError(f"optim.groups: parameter {p.path} (role {p.role or 'none'}) is in no "
                       f"group (groups: {', '.join(specs)}); every parameter must be in exactly "
                       "one")
    if len(hits) > 1:
      raise JaxlmError(f"optim.groups: parameter {p.path} is in groups {' and '.join(hits[:2])}; "
                       "every parameter must be in exactly one (narrow match or roles)")
    members[hits[0]].append(p)
  for name, g in specs.items():
    if not members[name]:
      raise JaxlmError(f"optim.groups.{name} ({_describe(g)}) matches no parameter")
  groups = tuple(Group(name, g.optimizer, float(g.lr_mult),
                       None if g.weight_decay is None else float(g.weight_decay),
                       tuple(members[name])) for name, g in specs.items())
  for g in groups:
    if g.optimizer == "muon":
      for p in g.params:
        if len(p.matrix_axes) < 2:
          raise JaxlmError(f"optim.groups.{g.name} uses muon but holds {p.path} of shape "
                           f"{p.shape}, which is not a matrix: muon needs 2-D (or larger) "
                           "parameters; give it another group")
  return groups


# --- Optimizers -----------------------------------------------------------------------------------

def _by_path(table: dict[str, Any]) -> Callable[[PyTree], PyTree]:
  """A function of a tree (boxed, masked or plain) giving each leaf its path's value."""
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: table[model_lib.path_name(path)], tree)


def _optimizer(name: str, opt_cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
               weight_decay: float, mask: Any,
               muon_dims: Callable[[PyTree], PyTree] | None = None
               ) -> optax.GradientTransformation:
  """One optax optimizer on `schedule`; decoupled decay lr * weight_decay * p where `mask`."""
  c = opt_cfg
  if name == "adamw":
    return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=weight_decay,
                       mask=mask)
  if name == "lion":
    return optax.lion(schedule, b1=c.b1, b2=c.b2, weight_decay=weight_decay, mask=mask)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                       optax.sgd(schedule, momentum=c.b1 or None))
  if name == "adafactor":
    # Absolute steps (no multiply_by_parameter_scale), so that lr means what it means for adamw:
    # the update's RMS is clipped to 1 and scaled by lr. optax adds adafactor's decay after the
    # lr scaling; a rate of lr * weight_decay makes it decoupled decay like the others'.
    return optax.adafactor(
        schedule, multiply_by_parameter_scale=False,
        weight_decay_rate=(lambda count: weight_decay * schedule(count)) if weight_decay else None,
        weight_decay_mask=mask)
  if name == "muon":
    # consistent_rms (Liu et al., arXiv:2502.16982) scales each orthogonalized update to the
    # RMS of an AdamW update, so muon runs at AdamW's lr and weight decay; 0 = Jordan's
    # sqrt(max(1, fan_out / fan_in)) scaling, which wants a lr about 30x larger.
    return optax_contrib.muon(
        schedule, beta=c.muon_beta, weight_decay=weight_decay, weight_decay_mask=mask,
        consistent_rms=c.muon_rms or None, muon_weight_dimension_numbers=muon_dims)
  if name == "schedule_free_adamw":
    # optax.contrib.schedule_free_adamw's own chain (Adam without momentum, decay, lr), with the
    # decay mask it lacks; schedule_free replaces the momentum by its interpolation (b1).
    base = optax.chain(
        optax.scale_by_rms(decay=c.b2, eps=c.eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.scale_by_learning_rate(schedule))
    return optax_contrib.schedule_free(base, learning_rate=schedule, b1=c.b1)
  raise JaxlmError(f"unknown optim.name={name!r}: expected one of {', '.join(OPTIMIZERS)}")


def make_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int,
                   params: PyTree | None = None,
                   groups: tuple[Group, ...] | None = None) -> optax.GradientTransformation:
  """Gradient clipping (by global norm, over all groups) followed by the groups' optimizers.

  `params` (boxed or abstract) is needed with groups and for muon; without groups any other
  optimizer takes every tensor and needs no params. `groups` (non-empty) replaces the ones
  resolve_groups would give: μP's split of them (jaxlm/mup.py).
  """
  check_config(opt_cfg)
  if not groups and not uses_groups(opt_cfg):
    opt = _optimizer(opt_cfg.name, opt_cfg, make_schedule(opt_cfg, total_steps),
                     opt_cfg.weight_decay, decay_mask)
  else:
    if params is None:
      raise JaxlmError("optim.groups and optim.name=muon need the model's params to group")
    groups = groups or resolve_groups(opt_cfg, params)
    transforms = {}
    for g in groups:
      schedule = group_schedule(opt_cfg, total_steps, g.optimizer, g.lr_mult)
      if g.weight_decay is None:
        weight_decay, mask = opt_cfg.weight_decay, decay_mask
      else:
        weight_decay, mask = g.weight_decay, None
      dims = (_by_path({p.path: muon_dimension_numbers(p) for p in g.params})
              if g.optimizer == "muon" else None)
      transforms[g.name] = _optimizer(g.optimizer, opt_cfg, schedule, weight_decay, mask, dims)
    labels = {p.path: g.name for g in groups for p in g.params}
    opt = optax.multi_transform(transforms, _by_path(labels))
  if opt_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), opt)
  return opt


def uses_schedule_free(opt_cfg: ml_collections.ConfigDict) -> bool:
  """Whether some tensor trains with a schedule-free optimizer (see `eval_params`)."""
  names = [g.optimizer for g in opt_cfg.groups.values()] if opt_cfg.groups else [opt_cfg.name]
  return any(n in SCHEDULE_FREE for n in names)


def _is_schedule_free_state(x: Any) -> bool:
  return isinstance(x, optax_contrib.ScheduleFreeState)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax_masking.MaskedNode)


def eval_params(opt_state: PyTree, params: PyTree) -> PyTree:
  """The params to evaluate, sample from and export: `params` where each schedule-free
  optimizer's tensors are replaced by its averaged sequence x (the training iterate `params`
  is its interpolation y; optax.contrib.schedule_free_eval_params). The identity otherwise."""
  for sf in jax.tree.leaves(opt_state, is_leaf=_is_schedule_free_state):
    if not _is_schedule_free_state(sf):
      continue
    # Under multi_transform, z holds MaskedNode where another group's tensors are.
    mine = jax.tree.map(lambda z, p: z if _is_masked(z) else p, sf.z, params,
                        is_leaf=_is_masked)
    averaged = optax_contrib.schedule_free_eval_params(sf, mine)
    params = jax.tree.map(lambda a, p: p if _is_masked(a) else a, averaged, params,
                          is_leaf=_is_masked)
  return params


def describe(opt_cfg: ml_collections.ConfigDict, groups: tuple[Group, ...],
             params: PyTree) -> list[str]:
  """One line per group (or one for the single optimizer): what trains what, and how much."""
  if not groups:
    tensors = params_of(params)
    return [f"all: {opt_cfg.name}, lr_mult 1, weight decay {opt_cfg.weight_decay:g} (kernels, "
            f"embeddings), {len(tensors)} tensors, {sum(p.count for p in tensors):,} params"]
  return [f"{g.name}: {g.optimizer}, lr_mult {g.lr_mult:g}, weight decay "
          f"{g.decay_text(opt_cfg.weight_decay)}, {len(g.params)} tensors, "
          f"{g.n_params:,} params" for g in groups]
