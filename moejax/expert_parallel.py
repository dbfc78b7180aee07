"""Expert parallelism: each device holds E / n experts; token slots travel to them by all_to_all.

With n = 1 (a mesh that splits only the tokens: data parallelism) the same shard_map runs each
device's dispatch on its own tokens with every expert local and no all_to_all; GSPMD left to itself
would gather the global sort of the ragged dispatch onto every device.

Shapes: T tokens (this device's T_l inside shard_map), D d_model, E experts, E_l = E / n local
experts (n = size of the expert mesh axis), C capacity, G groups, N token slots sorted by expert.

Only the dispatch runs under `jax.shard_map`; the router, its aux losses and the shared experts
stay outside, in GSPMD's global view, so the losses and metrics are those of one device by
construction and expert choice (which ranks the tokens of each capacity group) stays exact.
Inside the shard_map every device runs the single-device dispatch of `moejax.dispatch` on its own
tokens, with an `expert_fn` that wraps the local experts in all_to_alls:

  capacity / dense: the dispatch hands over a buffer [..., E, C', D]. Expert block j (experts
    j·E_l .. (j+1)·E_l - 1) goes to device j, which stacks what it receives from the n devices
    along the capacity axis, runs its E_l experts once, and sends every block back. Capacity is
    computed per group of `group_size` consecutive tokens; groups never straddle devices (the
    group size divides T_l), so exactly the same slots drop as on one device.
  ragged (dropless): the dispatch hands over x [N, D] sorted by expert and rows_per_expert [E]:
    rows for device j are one contiguous run of x; each device sends every other device a block
    padded to the worst case R = T_l·min(K, E_l) rows (a token's K slots pick distinct experts,
    at most E_l of them on one device) together with the E_l counts, re-sorts what it receives
    by local expert, runs the grouped matmul and sends the rows back to where they came from.
    Buffers per device are n·R·D, the price of static shapes; `jax.lax.ragged_all_to_all` would
    send only the real rows but does not run on CPU, where the tests check the maths.

The expert weights enter the shard_map split along E only (dimensions sharded over fsdp or
model are gathered on the way in), so tensor parallelism inside an expert is not used here.
Gradients need nothing special: all_to_all is its own transpose, and shard_map sums the weight
gradients over the data axes that replicate the weights.
"""
import contextlib
import contextvars
import functools
import math
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import dispatch as dispatch_lib
from moejax import experts as experts_lib
from moejax import sharding
from moejax.routing import Routing

ExpertFn = dispatch_lib.ExpertFn


def buffer_expert_fn(local_fn: ExpertFn, axis: str, axis_size: int) -> ExpertFn:
  """Wraps local experts (buffers [..., E_l, C, D]) into a fn of global buffers [..., E, C, D].

  Covers the capacity ([E, G·C, D]) and dense ([E, T, D]) dispatches and [G, E, C, D] buffers.
  """
  def fn(x: jax.Array) -> jax.Array:
    e_dim = x.ndim - 3
    lead, (e, c, d) = x.shape[:e_dim], x.shape[e_dim:]
    x = x.reshape(lead + (axis_size, e // axis_size, c, d))
    # After the exchange dim e_dim indexes the source device instead of the destination.
    x = jax.lax.all_to_all(x, axis, e_dim, e_dim)
    x = jnp.moveaxis(x, e_dim, e_dim + 1)  # [..., E_l, n, C, D]
    x = x.reshape(lead + (e // axis_size, axis_size * c, d))
    out = local_fn(x)
    out = jnp.moveaxis(out.reshape(lead + (e // axis_size, axis_size, c, d)), e_dim + 1, e_dim)
    out = jax.lax.all_to_all(out, axis, e_dim, e_dim)
    return out.reshape(lead + (e, c, d))
  return fn


def ragged_expert_fn(local_fn: ExpertFn, axis: str, axis_size: int, block_rows: int) -> ExpertFn:
  """Wraps local experts (x [N', D], rows_per_expert [E_l]) into a fn of
  (x [N, D], rows_per_expert [E]).

  `block_rows` (R) bounds the rows one device sends to another: T_l · min(K, E_l), because a
  token's K slots pick K distinct experts, at most E_l of which live on one device.
  """
  def fn(x: jax.Array, rows_per_expert: jax.Array) -> jax.Array:
    n_rows, d = x.shape
    per_device = rows_per_expert.reshape(axis_size, -1)  # [n, E_l]
    device_rows = jnp.sum(per_device, axis=1)  # [n]
    device_start = jnp.cumsum(device_rows) - device_rows
    block_row = jnp.arange(block_rows)

    # Send: block j holds this device's rows for device j's experts, zero-padded to R rows.
    take = device_start[:, None] + block_row  # [n, R]
    valid = block_row < device_rows[:, None]
    send = jnp.where(valid[..., None], x[jnp.minimum(take, n_rows - 1)], 0)  # [n, R, D]
    received = jax.lax.all_to_all(send, axis, 0, 0)  # [n (source), R, D]
    counts = jax.lax.all_to_all(per_device, axis, 0, 0)  # [n (source), E_l]

    # Each source's rows arrive sorted by local expert; padding gets key E_l and sorts last.
    ends = jnp.cumsum(counts, axis=1)
    local_expert = jax.vmap(lambda e: jnp.searchsorted(e, block_row, side='right'))(ends)
    order = jnp.argsort(local_expert.reshape(-1), stable=True)  # [n·R]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    out = local_fn(received.reshape(-1, d)[order], jnp.sum(counts, axis=0).astype(jnp.int32))
    out = out[inverse].reshape(axis_size, block_rows, d)
    returned = jax.lax.all_to_all(out, axis, 0, 0)  # [n (owner), R, D]

    # Row i of x went to the owner of its expert, at position i - device_start[owner].
    row = jnp.arange(n_rows)
    # E for padding rows.
    expert = jnp.searchsorted(jnp.cumsum(rows_per_expert), row, side='right')
    owner = jnp.minimum(expert // per_device.shape[1], axis_size - 1)
    y = returned[owner, jnp.clip(row - device_start[owner], 0, block_rows - 1)]
    return jnp.where((expert < rows_per_expert.shape[0])[:, None], y, 0)
  return fn


def check_tokens_split(expert_axis: str, token_axes: tuple[str, ...]) -> None:
  """The axis that splits the experts must split the tokens too (each device routes its own)."""
  if expert_axis not in token_axes:
    raise ValueError(f'mesh axis {expert_axis!r} splits the experts, so it must split the tokens '
                     f"too, but the 'batch' rule maps to {token_axes}, which lacks "
                     f'{expert_axis!r}')


def check_experts_split(num_experts: int, expert_axis: str, axis_size: int,
                        field: str = 'num_experts') -> None:
  """Every device holds the same number of experts."""
  if num_experts % axis_size:
    raise ValueError(f'{field}={num_experts} is not divisible by the size of mesh axis '
                     f'{expert_axis!r} ({axis_size})')


def check_groups_split(group_size: int, local_tokens: int, field: str = 'group_size',
                       tokens_of: str = '') -> None:
  """Capacity groups never straddle two devices, so the same slots drop as on one device."""
  if group_size <= 0 or local_tokens % group_size:
    raise ValueError(f'{field}={group_size} must be positive and divide the {local_tokens} '
                     f'tokens per device{tokens_of}, so that no capacity group straddles two '
                     'devices')


def validate_mesh(config, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError naming the fields when `mesh` cannot run `config`'s MoE layers expert
  parallel (nothing to check for dense models or a mesh.expert of 1)."""
  axis_size = mesh.shape['expert']
  if config.model.ffn != 'moe' or axis_size == 1:
    return
  moe = config.model.moe
  check_experts_split(moe.num_experts, 'expert', axis_size, 'model.moe.num_experts')
  axes = sharding.mesh_axes_for('batch', sharding.logical_rules(config.mesh))
  check_tokens_split('expert', axes)
  # group_size 0 means one group per sequence, which always divides the tokens per device.
  if moe.dispatch == 'capacity' and moe.group_size:
    shards = math.prod(mesh.shape[a] for a in axes)
    for field in ('batch_size', 'eval_batch_size'):
      check_groups_split(moe.group_size, config.data[field] // shards * config.data.seq_len,
                         'model.moe.group_size', f' of data.{field}')


def slot_traffic(expert_index: jax.Array, num_experts: int, num_devices: int
                 ) -> dict[str, jax.Array]:
  """What crosses devices for a routing expert_index [T, K], in this module's layout: tokens and
  experts split evenly and in order over num_devices devices (the expert axis alone).

  Returns int32 scalars
    remote_slots: slots whose expert lives on another device than their token; the rows this
      module's all_to_all carries (each slot travels on its own; ragged pads them to fixed blocks),
    remote_copies: distinct (token, other device) pairs; the rows of an all_to_all that sends a
      token once per device and fans it out there, as DeepSeek-V3's node-limited dispatch does,
    max_devices: the most devices one token's slots reach, its own device included when used;
  group-limited routing (one expert group per device) bounds max_devices by top_groups.
  """
  num_tokens = expert_index.shape[0]
  if num_tokens % num_devices or num_experts % num_devices:
    raise ValueError(f'tokens T={num_tokens} and num_experts={num_experts} must split evenly over '
                     f'num_devices={num_devices}')
  filled = expert_index >= 0
  token_device = (jnp.arange(num_tokens) // (num_tokens // num_devices))[:, None]  # [T, 1]
  expert_device = jnp.where(filled, expert_index // (num_experts // num_devices), -1)  # [T, K]
  reached = jnp.any(expert_device[:, :, None] == jnp.arange(num_devices), axis=1)  # [T, n]
  remote = reached & (jnp.arange(num_devices) != token_device)
  return dict(
      remote_slots=jnp.sum(filled & (expert_device != token_device)).astype(jnp.int32),
      remote_copies=jnp.sum(remote).astype(jnp.int32),
      max_devices=jnp.max(jnp.sum(reached, axis=1)).astype(jnp.int32))


# Set inside an ensemble's vmap over members: shard_map cannot run under the vmap's spmd axis, and
# expert parallelism is refused there anyway (moejax.ensemble), so members dispatch in the global view.
_GLOBAL_VIEW = contextvars.ContextVar('moejax_global_view_dispatch', default=False)


@contextlib.contextmanager
def global_view_dispatch() -> Iterator[None]:
  """Within it `context_expert_axis()` is None: MoE layers dispatch in GSPMD's global view."""
  token = _GLOBAL_VIEW.set(True)
  try:
    yield
  finally:
    _GLOBAL_VIEW.reset(token)


def context_expert_axis(axis: str = 'expert') -> str | None:
  """`axis` if the mesh in context (`sharding.mesh_context`) splits the tokens or the experts
  (`axis`) over > 1 devices, else None.

  What a model passes as `MoE(expert_axis=...)`: a dispatch per device under such a mesh (expert
  parallel when `axis` has > 1 devices, data parallel otherwise), plain everywhere else (one
  device, decoding without a mesh, an ensemble's members: `global_view_dispatch`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if _GLOBAL_VIEW.get() or mesh.empty or axis not in mesh.axis_names:
    return None
  if math.prod(mesh.shape[a] for a in {axis, *token_axes()}) == 1:
    return None
  return axis


def splits_experts(axis: str) -> bool:
  """Whether the mesh in context splits the experts over mesh axis `axis` (> 1 devices)."""
  return jax.sharding.get_abstract_mesh().shape[axis] > 1


def token_axes() -> tuple[str, ...]:
  """Mesh axes the tokens are split over: those of the 'batch' rule in flax's current rules."""
  return sharding.mesh_axes_for('batch', tuple(nn.get_logical_axis_rules()))


def dispatch(name: str, x: jax.Array, routing: Routing, expert_params, *, expert_axis: str,
             num_experts: int, top_k: int, capacity_factor: float, group_size: int,
             capacity_priority: str = 'position', activation: str = 'swiglu',
             gmm_impl: str = 'auto', dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """`moejax.dispatch.dispatch` with the experts split over mesh axis `expert_axis`.

  x [T, D] and routing ([T, K] leaves) in the global view, split over the 'batch' mesh axes;
  expert_params {'wi_0': [E, D, F], 'wi_1': [E, D, F], 'wo': [E, F, D]} (boxed or not). The mesh
  and the logical axis rules come from the context (`sharding.mesh_context`).
  Returns (y [T, D], dropped_fraction []) equal to the single-device dispatch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(f'expert_axis={expert_axis!r} needs a mesh: call inside '
                     'moejax.sharding.mesh_context(mesh, rules)')
  if expert_axis not in mesh.axis_names:
    raise ValueError(f'expert_axis={expert_axis!r}; allowed values: the mesh axes '
                     f'{mesh.axis_names}')
  axes = token_axes()
  check_tokens_split(expert_axis, axes)
  axis_size = mesh.shape[expert_axis]
  check_experts_split(num_experts, expert_axis, axis_size)
  shards = math.prod(mesh.shape[a] for a in axes)
  if x.shape[0] % shards:
    raise ValueError(f'tokens T={x.shape[0]} must split evenly over the {shards} devices of mesh '
                     f'axes {axes}')
  if name == 'capacity':
    check_groups_split(group_size, x.shape[0] // shards)

  params = nn.unbox(expert_params)
  weights = tuple(params[k] for k in ('wi_0', 'wi_1', 'wo'))
  routing = Routing(expert_index=routing.expert_index, combine_weight=routing.combine_weight,
                    metrics={}, priority=routing.priority)

  def body(x, routing, *weights):
    # Mark the weights as varying over the data axes too, as the tokens are: a custom-VJP kernel's
    # weight gradient then type-checks, and the cast's transpose sums that gradient over the data
    # axes, in the param dtype (the cast to the compute dtype comes after).
    data_axes = tuple(a for a in axes if a != expert_axis)
    if data_axes:
      weights = [jax.lax.pcast(w, data_axes, to='varying') for w in weights]
    local_fn = functools.partial(experts_lib.expert_ffn, *(w.astype(dtype) for w in weights),
                                 activation=activation, gmm_impl=gmm_impl)
    tokens_local, slots = routing.expert_index.shape
    block_rows = tokens_local * min(slots, num_experts // axis_size)
    if axis_size == 1:  # data parallel: every expert is local
      buffer_fn = ragged_fn = local_fn
    else:
      buffer_fn = buffer_expert_fn(local_fn, expert_axis, axis_size)
      ragged_fn = ragged_expert_fn(local_fn, expert_axis, axis_size, block_rows)

    def expert_fn(x, rows_per_expert=None):
      return buffer_fn(x) if rows_per_expert is None else ragged_fn(x, rows_per_expert)

    y, dropped = dispatch_lib.dispatch(
        name, x, routing, expert_fn, num_experts=num_experts, top_k=top_k,
        capacity_factor=capacity_factor, group_size=group_size,
        capacity_priority=capacity_priority)
    # The global share is total drops over total filled slots (expert choice fills unevenly).
    filled = jnp.sum(routing.expert_index >= 0).astype(jnp.float32)
    dropped = jax.lax.psum(dropped * filled, axes) / jnp.maximum(jax.lax.psum(filled, axes), 1.0)
    return y, dropped

  tokens, experts = P(axes), P(expert_axis)
  return jax.shard_map(body, in_specs=(tokens, tokens, experts, experts, experts),
                       out_specs=(tokens, P()))(x, routing, *weights)
