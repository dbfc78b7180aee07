"""Dispatch: move token slots to experts, run them, combine the results with the gates.

Shapes: T tokens, D d_model, E experts, K slots per token, G groups, S tokens per group (T = G·S),
C capacity (slots per expert per group), N = T·K token slots.

Every dispatch is a pure function `(x [T, D], routing, expert_fn, ...) -> (y [T, D],
dropped_fraction [])`. The experts are reached only through `expert_fn` (the `Experts` module or a
function with its signature: `expert_fn(x [E, C', D]) -> [E, C', D]` or
`expert_fn(x [N, D], rows_per_expert [E]) -> [N, D]`), so expert parallelism can wrap it
(all_to_all in shard_map) without touching the code here. Slots with expert_index -1 are empty: no capacity, no compute, no output.
Gates are applied in float32; y comes back in x's dtype.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax import routing as routing_lib
from moejax.kernels import permute
from moejax.routing import Routing

DISPATCHES = ('dense', 'capacity', 'ragged')
CAPACITY_PRIORITIES = ('position', 'score')

ExpertFn = Callable[..., jax.Array]


def _no_drops() -> jax.Array:
  return jnp.zeros((), jnp.float32)


def dense_dispatch(x: jax.Array, routing: Routing, expert_fn: ExpertFn, *,
                   num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Every expert on every token, weighted by the gates; the O(E·T) reference for tiny sizes."""
  t, d = x.shape
  out = expert_fn(jnp.broadcast_to(x, (num_experts, t, d)))  # [E, T, D]
  slot_expert = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)  # [T, K, E]
  weight = jnp.einsum('tk,tke->te', routing.combine_weight, slot_expert)
  y = jnp.einsum('te,etd->td', weight, out.astype(jnp.float32))
  return y.astype(x.dtype), _no_drops()


def group_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per group: ceil(capacity_factor · k · S / E), at least 1 and at most S (an
  expert cannot receive a token twice, so more than S slots would stay empty). The same C that
  the expert-choice router fills per group, so this dispatch never drops what it chose."""
  return routing_lib.expert_choice_capacity(group_size, num_experts, top_k, capacity_factor)


def check_capacity_priority(capacity_priority: str) -> None:
  if capacity_priority not in CAPACITY_PRIORITIES:
    raise ValueError(f'capacity_priority={capacity_priority!r}; allowed values: '
                     f'{CAPACITY_PRIORITIES}')


def capacity_dispatch(x: jax.Array, routing: Routing, expert_fn: ExpertFn, *, num_experts: int,
                      top_k: int, capacity_factor: float, group_size: int,
                      capacity_priority: str = 'position') -> tuple[jax.Array, jax.Array]:
  """Token dropping with a fixed capacity per expert and group (GShard, Lepikhin et al. 2020;
  Switch, Fedus et al. 2021).

  Tokens are split into G = T / group_size groups of S consecutive tokens. Within a group, an
  expert keeps its first C slots in priority order: every token's slot 0 before any slot 1, and
  so on, so second choices never push out first choices. Among the tokens' slot j the order is
  - 'position': by position in the group. A token's slot 0 then competes only with earlier
    tokens, so with top_k = 1 whether a token drops depends on no later token (causal); with
    top_k > 1 a later token's slot 0 can still push out an earlier token's slot 1.
  - 'score': batch-prioritized routing (V-MoE, Riquelme et al. 2021): by `routing.priority` (the
    token's highest router probability), highest first, ties by position, so the most confident
    tokens keep their slots. Not causal: a later token with a higher score can make an earlier
    one drop; for encoders, study, and inference on whole sequences.
  Dropped slots contribute zero (the residual connection carries the token). The experts see one
  [E, G·C, D] buffer.
  """
  t, d = x.shape
  if group_size <= 0 or t % group_size:
    raise ValueError(f'group_size={group_size} must be positive and divide the number of tokens '
                     f'T={t} (batch * seq)')
  check_capacity_priority(capacity_priority)
  if capacity_priority == 'score' and routing.priority is None:
    raise ValueError("capacity_priority='score' ranks tokens by routing.priority, which this "
                     'Routing lacks (None)')
  k = routing.expert_index.shape[1]
  g, s = t // group_size, group_size
  c = group_capacity(s, num_experts, top_k, capacity_factor)

  index = routing.expert_index.reshape(g, s, k)
  if capacity_priority == 'score':
    # order[g, i]: the token of group g with the i-th highest score (stable: ties by position).
    order = jnp.argsort(-routing.priority.reshape(g, s), axis=1, stable=True)
    index = jnp.take_along_axis(index, order[:, :, None], axis=1)
  # Slots in priority order within each group: [G, K·S], slot j of every token before slot j+1.
  index = index.transpose(0, 2, 1).reshape(g, k * s)
  one_hot = jax.nn.one_hot(index, num_experts, dtype=jnp.int32)  # [G, K·S, E]; -1 -> all zero
  position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)  # [G, K·S]
  filled = index >= 0
  kept = filled & (position < c)

  # Row of each kept slot in the flat [E, G, C] buffer; dropped and empty slots go to a dump row.
  dump = num_experts * g * c
  row = jnp.where(kept, index * (g * c) + jnp.arange(g)[:, None] * c + position, dump)
  row = row.reshape(g, k, s).transpose(0, 2, 1)  # [G, S, K] in priority order
  if capacity_priority == 'score':
    row = jnp.zeros_like(row).at[jnp.arange(g)[:, None], order].set(row)  # back to positions
  row = row.reshape(t, k)

  buffer = jnp.zeros((dump + 1, d), x.dtype).at[row].add(x[:, None, :])
  out = expert_fn(buffer[:dump].reshape(num_experts, g * c, d))  # [E, G·C, D]
  out = jnp.concatenate([out.reshape(dump, d), jnp.zeros((1, d), out.dtype)])
  y = jnp.einsum('tk,tkd->td', routing.combine_weight, out[row].astype(jnp.float32))

  dropped = jnp.sum(filled & ~kept) / jnp.maximum(jnp.sum(filled), 1)
  return y.astype(x.dtype), dropped.astype(jnp.float32)


def ragged_dispatch(x: jax.Array, routing: Routing, expert_fn: ExpertFn, *,
                    num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Dropless (MegaBlocks, Gale et al. 2022): sort the T·K slots by expert, run the grouped matmul
  on the sorted rows, unsort, combine. Empty slots (-1) sort to the end, outside every group.
  The permutations are gathers both ways (kernels/permute.py), the gates fused into the unsort."""
  order, inverse, rows_per_expert = permute.sort_slots(routing.expert_index, num_experts)
  out_sorted = expert_fn(permute.gather_rows(x, order, inverse), rows_per_expert)  # [N, D]
  y = permute.unsort_combine(out_sorted, order, inverse, routing.combine_weight)
  return y.astype(x.dtype), _no_drops()


def dispatch(name: str, x: jax.Array, routing: Routing, expert_fn: ExpertFn, *, num_experts: int,
             top_k: int, capacity_factor: float, group_size: int,
             capacity_priority: str = 'position') -> tuple[jax.Array, jax.Array]:
  """Runs the dispatch called `name` (one of DISPATCHES); x [T, D] -> (y [T, D], dropped []).
  capacity_factor, group_size and capacity_priority are the capacity dispatch's."""
  if name == 'dense':
    return dense_dispatch(x, routing, expert_fn, num_experts=num_experts)
  if name == 'capacity':
    return capacity_dispatch(x, routing, expert_fn, num_experts=num_experts, top_k=top_k,
                             capacity_factor=capacity_factor, group_size=group_size,
                             capacity_priority=capacity_priority)
  if name == 'ragged':
    return ragged_dispatch(x, routing, expert_fn, num_experts=num_experts)
  raise ValueError(f'dispatch={name!r}; allowed values: {DISPATCHES}')
