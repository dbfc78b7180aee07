"""Device mesh, logical axis rules, and shardings for parameters and batches.

The model names every parameter and activation axis logically ('member', 'batch', 'length',
'embed', 'mlp', 'heads', 'kv', 'vocab', 'expert'); the config (`config.mesh.rules`) maps those
names to the five mesh axes, so the same model code runs data parallel, FSDP, expert parallel or tensor parallel by
changing the config only.

Mesh axes, outermost first (the outer axes cross hosts, the inner ones stay on fast links):
  member  ensemble members (moejax.ensemble): each member's parameters on its own devices
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters sharded along 'embed' (ZeRO-3 style)
  expert  expert parallelism: experts split across devices, tokens travel by all_to_all
  model   tensor parallelism along 'mlp', 'heads' and 'vocab'

Shapes: B batch, S seq, T tokens (B*S).
"""
import contextlib
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('member', 'data', 'fsdp', 'expert', 'model')

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Sizes of MESH_AXES from `mesh_config`; -1 takes the rest."""
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f'mesh.{axis} must be a positive int or -1 (the rest), got {size!r}')
  free = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
  if len(free) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got mesh.{" and mesh.".join(free)}')
  fixed = math.prod(size for size in sizes if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'mesh.{free[0]}=-1 needs the device count ({num_devices}) to be divisible by the '
          f'product of the other mesh axes ({fixed})')
    sizes[MESH_AXES.index(free[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'mesh member*data*fsdp*expert*model = {fixed} does not match the device count ({num_devices}); '
        'set one axis to -1 to take the rest')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with the MESH_AXES over `devices` (default: all, every process).

  All axes are `AxisType.Auto`: jax >= 0.9 defaults to Explicit, where every array's sharding is
  part of its type and each op must be told how to shard its result. Our model only annotates
  parameters and a few activations with logical names and lets GSPMD propagate the rest through
  `jit`; the expert-parallel part switches to Manual inside `jax.shard_map`.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _as_mesh_axes(value, logical: str) -> MeshAxes:
  """Normalises a rule's right-hand side to None, a mesh axis name, or a tuple of them."""
  if value is None:
    return None
  names = (value,) if isinstance(value, str) else tuple(value)
  for name in names:
    if name not in MESH_AXES:
      raise ValueError(
          f'mesh.rules: logical axis {logical!r} maps to unknown mesh axis {name!r}; '
          f'allowed: {MESH_AXES} or None')
  return names[0] if len(names) == 1 else names


def logical_rules(mesh_config) -> Rules:
  """`mesh_config.rules` as (logical name, mesh axes) pairs, for `nn.logical_axis_rules`."""
  rules = []
  for rule in mesh_config.rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'mesh.rules entries must be (logical_name, mesh_axes) pairs, got {rule!r}')
    rules.append((rule[0], _as_mesh_axes(rule[1], rule[0])))
  return tuple(rules)


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> P:
  """PartitionSpec for an array whose axes carry logical `names`.

  Like flax: each logical name takes the first rule whose mesh axes are still unused by the earlier
  dimensions, else it is replicated. Given `shape` and `mesh`, a dimension that the mesh axes do
  not divide evenly (e.g. vocab 257 over model=2) is replicated instead of failing in `jit`.
  """
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    chosen = None
    for logical, axes in rules:
      if name is None or logical != name:
        continue
      if used.isdisjoint(_axes_tuple(axes)):
        chosen = axes
        break
    if chosen is not None and shape is not None and mesh is not None:
      if shape[dim] % math.prod(mesh.shape[a] for a in _axes_tuple(chosen)):
        chosen = None
    used.update(_axes_tuple(chosen))
    spec.append(chosen)
  return P(*spec)


def mesh_axes_for(logical: str, rules: Rules) -> tuple[str, ...]:
  """The mesh axes that logical axis `logical` is sharded over (empty when replicated)."""
  return _axes_tuple(logical_to_spec((logical,), rules)[0])


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules: Rules):
  """NamedSharding tree for a tree of (possibly abstract) values, boxed or not.

  `nn.LogicallyPartitioned` leaves are sharded by `rules`; `nn.Partitioned` leaves carry mesh axis
  names already; anything else (step counters, RNG keys, loss scales) is replicated. As in flax's
  `logical_to_mesh_sharding`, a box becomes its NamedSharding, so the result is a tree prefix of
  the boxed tree and has the structure of the unboxed one: it serves as `jit(init)`'s
  `out_shardings` either way.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, rules, np.shape(leaf.value), mesh))
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, P(*leaf.names))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=_is_box)


def abstract_with_shardings(tree, mesh: jax.sharding.Mesh, rules: Rules):
  """`tree` (boxed or not) as jax.ShapeDtypeStructs carrying their target NamedSharding, boxes kept.

  This is what a checkpoint restore needs to place every array directly on `mesh`.
  """
  def one(sharding, leaf):
    def struct(x):
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return jax.tree.map(struct, leaf)
  return jax.tree.map(one, tree_shardings(tree, mesh, rules), tree)


def _batch_names(rank: int | None) -> tuple[str | None, ...]:
  """Logical names of a batch's axes: [B, S] ('batch', 'length'); an ensemble's one batch per
  member, [M, B, S], ('member', 'batch', 'length'); other ranks pad ('batch', 'length')."""
  if rank == 3:
    return ('member', 'batch', 'length')
  names = ('batch', 'length')
  return names if rank is None else (names + (None,) * rank)[:rank]


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules,
                   shape: Sequence[int] | None = None) -> NamedSharding:
  """Sharding of a [B, S] batch: B over the 'batch' mesh axes, S over 'length' (usually replicated).

  With `shape`, any rank is allowed and dimensions the mesh does not divide are replicated; rank 3
  is an ensemble's [M, B, S] with M over the 'member' mesh axes.
  """
  names = _batch_names(None if shape is None else len(shape))
  return NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh))


def global_batch(local: np.ndarray, mesh: jax.sharding.Mesh, rules: Rules) -> jax.Array:
  """This process's rows of the global batch -> one global jax.Array sharded like `batch_sharding`.

  Every process passes an equal share of the batch axis, [B / process_count, ...] (an ensemble's
  [M, B / process_count, ...]); process i holds rows [i * B_local, (i + 1) * B_local).
  """
  local = np.asarray(local)
  axis = _batch_names(local.ndim).index('batch')
  global_shape = list(local.shape)
  global_shape[axis] *= jax.process_count()
  sharding = batch_sharding(mesh, rules, tuple(global_shape))
  return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def validate_mesh(config, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError (naming both numbers) when the batch axes of `mesh` do not divide the
  global batches; the MoE layers' own mesh checks are moejax.expert_parallel.validate_mesh."""
  rules = logical_rules(config.mesh)
  batch_axes = mesh_axes_for('batch', rules)
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  for field in ('batch_size', 'eval_batch_size'):
    size = config.data[field]
    if size % shards:
      raise ValueError(
          f'data.{field}={size} is not divisible by the {shards} batch shards '
          f'(mesh axes {batch_axes} of the batch rule)')


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[jax.sharding.Mesh]:
  """Activates `mesh` (for shard_map and sharding constraints) and flax's logical axis `rules`.

  Enter it outside `jit`, around tracing (the first call) of functions that build the model.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh
