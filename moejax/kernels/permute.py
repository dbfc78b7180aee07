"""Token-slot permutation for dropless MoE: sort slots by expert, and unsort + combine.

Shapes: T tokens, D d_model, E experts, K slots per token, N = T·K token slots.

Slot s = t·K + j is slot j of token t. `order` [N] lists the slots sorted by expert (empty slots,
expert -1, last) and `inverse` [N] is its inverse permutation (inverse[order[i]] = i).

Both movements have custom VJPs made of gathers only: the transpose of a gather is a scatter-add,
which on GPU serialises on atomics for the K duplicate rows of each token, whereas here
  gather_rows:     dx[t]        = Σ_j dy_sorted[inverse[t·K + j]]      (gather, then sum over K)
  unsort_combine:  dy_sorted[i] = g[order[i]] · dy[order[i] // K]       (gather)
                   dg[t, j]     = <dy[t], y_sorted[inverse[t·K + j]]>  (gather)
The gate weighting is fused into the unsort, so the [N, D] unsorted copy is never stored.
"""
import functools

import jax
import jax.numpy as jnp


def sort_slots(expert_index: jax.Array, num_experts: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """expert_index [T, K] (-1 = empty slot) -> (order [N], inverse [N], rows_per_expert [E])."""
  key = jnp.where(expert_index < 0, num_experts, expert_index).reshape(-1).astype(jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  # A permutation scatter with unique indices: no atomics, and no gradient flows through it.
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(order.size, dtype=jnp.int32), unique_indices=True)
  rows_per_expert = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return order, inverse, rows_per_expert


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_rows(x, order, inverse, top_k):
  return x[order // top_k]


def _gather_rows_fwd(x, order, inverse, top_k):
  return x[order // top_k], (order, inverse)


def _gather_rows_bwd(top_k, residuals, dy_sorted):
  order, inverse = residuals
  t, d = inverse.size // top_k, dy_sorted.shape[1]
  dx = jnp.sum(dy_sorted[inverse].reshape(t, top_k, d).astype(jnp.float32), axis=1)
  return dx.astype(dy_sorted.dtype), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def gather_rows(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
  """x [T, D] -> x_sorted [N, D] with x_sorted[i] = x[order[i] // K]; backward without scatter."""
  top_k = order.size // x.shape[0]
  if order.shape != inverse.shape or order.size != top_k * x.shape[0]:
    raise ValueError(f'order {order.shape} and inverse {inverse.shape} must both be [T·K] with '
                     f'T={x.shape[0]}')
  return _gather_rows(x, order, inverse, top_k)


def _combine(y_sorted, inverse, weights):
  t, k = weights.shape
  rows = y_sorted[inverse].reshape(t, k, y_sorted.shape[1]).astype(jnp.float32)
  return jnp.einsum('tk,tkd->td', weights.astype(jnp.float32), rows).astype(y_sorted.dtype)


@jax.custom_vjp
def _unsort_combine(y_sorted, order, inverse, weights):
  return _combine(y_sorted, inverse, weights)


def _unsort_combine_fwd(y_sorted, order, inverse, weights):
  return _combine(y_sorted, inverse, weights), (y_sorted, order, inverse, weights)


def _unsort_combine_bwd(residuals, dy):
  y_sorted, order, inverse, weights = residuals
  t, k = weights.shape
  dy32 = dy.astype(jnp.float32)
  gate_sorted = weights.reshape(-1)[order].astype(jnp.float32)  # [N]
  dy_sorted = (gate_sorted[:, None] * dy32[order // k]).astype(y_sorted.dtype)
  rows = y_sorted[inverse].reshape(t, k, -1).astype(jnp.float32)
  dweights = jnp.einsum('td,tkd->tk', dy32, rows).astype(weights.dtype)
  return dy_sorted, None, None, dweights


_unsort_combine.defvjp(_unsort_combine_fwd, _unsort_combine_bwd)


def unsort_combine(y_sorted: jax.Array, order: jax.Array, inverse: jax.Array,
                   weights: jax.Array) -> jax.Array:
  """y_sorted [N, D], weights [T, K] -> y [T, D].

  y[t] = Σ_j weights[t, j] · y_sorted[inverse[t·K + j]]. Accumulates in float32 and returns
  y_sorted's dtype; differentiable in y_sorted and weights.
  """
  if weights.ndim != 2:
    raise ValueError(f'weights must be [T, K], got shape {weights.shape}')
  if order.shape != (weights.size,) or inverse.shape != order.shape:
    raise ValueError(f'order {order.shape} and inverse {inverse.shape} must both be '
                     f'[T·K]=[{weights.size}] for weights {weights.shape}')
  # Out-of-range gathers clamp silently, so a wrong row count would give wrong numbers, not errors.
  if y_sorted.ndim != 2 or y_sorted.shape[0] != order.size:
    raise ValueError(f'y_sorted must be [T·K, D]=[{order.size}, D], got shape {y_sorted.shape}')
  return _unsort_combine(y_sorted, order, inverse, weights)
