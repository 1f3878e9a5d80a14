"""Device mesh from config, logical -> NamedSharding for pytrees, and host -> global batches."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import axes
from jaxlm import model as model_lib
from jaxlm.errors import JaxlmError

PyTree = Any
Rules = Sequence[tuple[str, Any]]


def mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves the (data, fsdp, tensor) sizes; one of them may be -1 (= whatever is left)."""
  shape = [int(sizes[a]) for a in axes.MESH_AXES]
  spec = ", ".join(f"{a}={s}" for a, s in zip(axes.MESH_AXES, shape, strict=True))
  if shape.count(-1) > 1:
    raise JaxlmError(f"mesh ({spec}): at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise JaxlmError(f"mesh ({spec}): sizes must be positive, or -1 for one axis")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n_devices % known:
      raise JaxlmError(f"mesh ({spec}): {n_devices} devices are not divisible by {known}")
    shape[shape.index(-1)] = n_devices // known
  if int(np.prod(shape)) != n_devices:
    raise JaxlmError(f"mesh ({spec}) has {int(np.prod(shape))} devices but there are "
                     f"{n_devices}; make the sizes multiply to {n_devices} or set one to -1")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh whose axes are all `Auto` (what flax linen expects)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  try:
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, axes.MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(axes.MESH_AXES))


def local_position(mesh: Mesh, process_index: int | None = None) -> str:
  """Where one process's devices sit in the mesh, e.g. "data 2-3, fsdp 0, tensor 0"."""
  process_index = jax.process_index() if process_index is None else process_index
  mine = np.vectorize(lambda d: d.process_index == process_index)(mesh.devices)
  coords = np.argwhere(mine)
  if not len(coords):
    return "no devices"
  parts = []
  for axis, name in enumerate(mesh.axis_names):
    lo, hi = coords[:, axis].min(), coords[:, axis].max()
    parts.append(f"{name} {lo}" if lo == hi else f"{name} {lo}-{hi}")
  return ", ".join(parts)


def split_ways(mesh_axes: str | tuple[str, ...] | None, mesh_sizes: Mapping[str, int]) -> int:
  """How many ways one PartitionSpec entry splits a dimension: the product of its mesh axes'
  sizes (1 for None). `mesh_sizes` is a Mesh's `.shape` or {axis: size} from the config."""
  names = () if mesh_axes is None else (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,))
  return math.prod(int(mesh_sizes[n]) for n in names)


def logical_ways(logical: str, rules: Rules, mesh_sizes: Mapping[str, int]) -> int:
  """How many ways `rules` split logical axis `logical` (axes.BATCH, axes.HEADS, ...)."""
  return split_ways(nn.logical_to_mesh_axes((logical,), rules)[0], mesh_sizes)


def get_rules(name: str) -> Rules:
  if name not in axes.RULES:
    raise JaxlmError(f"unknown mesh.rules={name!r}: expected one of {', '.join(axes.RULES)}")
  return axes.RULES[name]


def logical_shardings(boxed_tree: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """NamedShardings for a tree of flax `Partitioned` boxes (abstract or concrete).

  A dimension that the mesh axes would not split evenly (say a 65-symbol vocab over 4
  tensor-parallel devices) is replicated instead, with one warning naming what was affected.
  Leaves without a box (step counts), and boxes whose names do not fit their value's rank
  (optax's adafactor keeps a parameter's box on its factored row/column moments), are
  replicated. The tree is mapped leaf by leaf (not through flax's PartitionSpec trees, which
  take optax's empty MaskedNode tuples of a multi_transform state for specs).
  """
  def leaf_sharding(leaf: Any) -> Any:
    if isinstance(leaf, nn.Partitioned):
      if not hasattr(leaf.value, "shape"):
        return leaf.value  # A masked-out MaskedNode: no array, nothing to shard.
      if len(leaf.names) == len(leaf.value.shape):
        return NamedSharding(mesh, nn.logical_to_mesh_axes(leaf.names, rules))
    return NamedSharding(mesh, PartitionSpec())

  shardings = jax.tree.map(leaf_sharding, boxed_tree,
                           is_leaf=lambda x: isinstance(x, nn.Partitioned))
  # Keyed by parameter name: a parameter's optimizer moments share its name, shape and axes,
  # so each replicated dimension is named once (a dict as an ordered set).
  replicated_dims: dict[str, None] = {}

  def fit(path, value, named: NamedSharding) -> NamedSharding:
    spec = list(named.spec) + [None] * (len(value.shape) - len(named.spec))
    for i, axis in enumerate(spec):
      size = split_ways(axis, mesh.shape)
      if size > 1 and value.shape[i] % size:
        if value.shape[i] == 1:  # E.g. adafactor's placeholder moments: nothing to split.
          spec[i] = None
          continue
        replicated_dims[f"{model_lib.path_name(path)}[{i}]={value.shape[i]}"] = None
        spec[i] = None
    return NamedSharding(mesh, PartitionSpec(*spec))

  fitted = jax.tree_util.tree_map_with_path(fit, nn.unbox(boxed_tree), shardings)
  if replicated_dims:
    logging.warning("replicating %d dimension(s) that the mesh %s does not divide evenly, e.g. %s",
                    len(replicated_dims), dict(mesh.shape), ", ".join(list(replicated_dims)[:3]))
  return fitted


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Rows of a [B, L] batch split over the mesh axes that `rules` assign to `batch`."""
  spec = nn.logical_to_mesh_axes((axes.BATCH, None), rules)
  return NamedSharding(mesh, PartitionSpec(*spec))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split (the global batch must divide by this)."""
  return logical_ways(axes.BATCH, rules, mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process' rows into one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """Abstract arrays (ShapeDtypeStruct) that carry the given shardings: an orbax restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
