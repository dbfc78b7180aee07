"""Mixed precision: dtype policies, fp16 dynamic loss scaling, optimizer-state dtypes.

A `Policy` names two dtypes: params are stored in `param_dtype`, matmuls run in `compute_dtype`.
Every module takes its `dtype`/`param_dtype` from the policy, except the router, its softmax/top-k
and the aux losses (float32 unless `model.moe.router_dtype` says otherwise: ST-MoE's "selective
precision", Zoph et al. 2022) and the output projection, logits and losses (always float32, see
moejax.model).

fp16 needs loss scaling (Micikevicius et al. 2018): multiply the loss by S before the backward pass,
divide the grads by S, skip the step and halve S on overflow, double S after `period` finite steps.

bf16 parameters need stochastic rounding (Zamirai et al. 2020, "Revisiting BFloat16 Training":
stochastic rounding or Kahan summation recover fp32 accuracy that nearest rounding loses): adding
an update smaller than half a bf16 ulp (2^-9 relative) to a parameter and rounding to nearest gives
back the old value, so late, small updates vanish. `apply_updates` adds in float32 and rounds
stochastically, which keeps every update's expected value.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Policy:
  """Parameter and compute dtypes of a model (its logits and losses are float32 under all)."""
  param_dtype: jnp.dtype
  compute_dtype: jnp.dtype


POLICIES = {
    'fp32': Policy(jnp.float32, jnp.float32),
    'bf16': Policy(jnp.float32, jnp.bfloat16),
    'pure_bf16': Policy(jnp.bfloat16, jnp.bfloat16),
    'fp16': Policy(jnp.float32, jnp.float16),
}


# Inference compute dtypes (`evaluate.py`/`generate.py --precision`), whatever the run trained with.
INFERENCE_DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16, 'fp16': jnp.float16}


def inference_policy(train_policy: str, name: str = '') -> tuple[str, Policy]:
  """(name, Policy) computing in INFERENCE_DTYPES[name] on the params as trained under
  `train_policy`; name '' keeps the run's compute dtype (and names it)."""
  policy = get_policy(train_policy)
  if not name:
    name = {jnp.dtype(v): k for k, v in INFERENCE_DTYPES.items()}[jnp.dtype(policy.compute_dtype)]
  if name not in INFERENCE_DTYPES:
    raise ValueError(f'--precision={name!r}; allowed values: {sorted(INFERENCE_DTYPES)}')
  return name, Policy(policy.param_dtype, jnp.dtype(INFERENCE_DTYPES[name]))


def _check_policy_name(name: str):
  if name not in POLICIES:
    raise ValueError(f'precision.policy={name!r}; allowed values: {sorted(POLICIES)}')


def get_policy(name: str) -> Policy:
  """Returns the preset policy 'fp32' | 'bf16' | 'pure_bf16' | 'fp16'."""
  _check_policy_name(name)
  return POLICIES[name]


def _dtype_from_name(field: str, name: str) -> jnp.dtype:
  allowed = ('float32', 'bfloat16', 'float16')
  if name not in allowed:
    raise ValueError(f'precision.{field}={name!r}; allowed values: {allowed} or empty')
  return jnp.dtype(name)


def optimizer_state_dtypes(policy_name: str, mu_dtype: str = '',
                           nu_dtype: str = '') -> tuple[jnp.dtype, jnp.dtype]:
  """Adam moment dtypes (mu, nu) for a policy; non-empty `mu_dtype`/`nu_dtype` override.

  pure_bf16 keeps both moments in bf16 (memory); bf16 keeps mu in bf16 but nu in float32, because
  nu moves by a relative (1 - b2) ~ 1e-3 per step, below bf16's 2^-8 resolution, so it would stall;
  all other policies use float32.
  """
  _check_policy_name(policy_name)
  if policy_name == 'pure_bf16':
    mu, nu = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)
  elif policy_name == 'bf16':
    mu, nu = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  else:
    mu, nu = jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)
  if mu_dtype:
    mu = _dtype_from_name('mu_dtype', mu_dtype)
  if nu_dtype:
    nu = _dtype_from_name('nu_dtype', nu_dtype)
  return mu, nu


def stochastic_round(x: jax.Array, dtype, key: jax.Array) -> jax.Array:
  """Rounds float32 `x` to `dtype` (bfloat16 or float16) up or down at random, unbiasedly.

  Each element becomes one of its two neighbours in `dtype`, the upper one with probability
  (x - lower) / (upper - lower), so E[result] = x. bf16 keeps float32's exponent: adding 16
  uniform random bits below the kept mantissa of the float32 bit pattern and truncating them does
  exactly that (a carry into the kept bits happens with that probability). fp16 has its own
  exponent range, so its two neighbours are found with `nextafter`; past the largest finite fp16
  it saturates there. NaN and inf stay what they are. x: any shape; key: a PRNG key.
  """
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(x, jnp.float32)
  if dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    # inf and NaN: the addition could turn inf into NaN's pattern or NaN's into inf's; keep them.
    out = jnp.where(jnp.isfinite(x), jax.lax.bitcast_convert_type(rounded, jnp.float32), x)
    return out.astype(jnp.bfloat16)
  if dtype == jnp.float16:
    nearest = x.astype(jnp.float16)
    away = jnp.abs(nearest.astype(jnp.float32)) > jnp.abs(x)
    lower = jnp.where(away, jnp.nextafter(nearest, jnp.zeros_like(nearest)), nearest)  # toward 0
    upper = jnp.nextafter(lower, jnp.where(x < 0, -jnp.inf, jnp.inf).astype(jnp.float16))
    lower32, upper32 = lower.astype(jnp.float32), upper.astype(jnp.float32)
    p_upper = (x - lower32) / (upper32 - lower32)  # NaN for exact values and inf: never rounds up
    go_up = jax.random.uniform(key, x.shape, jnp.float32) < p_upper
    return jnp.where(go_up & jnp.isfinite(upper32), upper, lower)
  raise ValueError(f'stochastic_round: dtype={dtype.name}; allowed values: bfloat16, float16')


def apply_updates(params: PyTree, updates: PyTree, key: jax.Array | None = None) -> PyTree:
  """params + updates, each leaf back in its own dtype.

  With `key` None this is `optax.apply_updates` (nearest rounding). With a key, bf16 and fp16
  leaves are summed in float32 and stochastically rounded (`stochastic_round`, one key per leaf
  split from `key`); float32 leaves are unaffected. The train step keys it by (state.rng, step), so
  a resumed run draws the same rounding as an uninterrupted one.
  """
  if key is None:
    return optax.apply_updates(params, updates)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))

  def add(p, u, k):
    total = p.astype(jnp.float32) + u.astype(jnp.float32)
    if p.dtype in (jnp.bfloat16, jnp.float16):
      return stochastic_round(total, p.dtype, k)
    return total.astype(p.dtype)

  new = [add(p, u, k) for p, u, k in zip(leaves, treedef.flatten_up_to(updates), keys)]
  return jax.tree.unflatten(treedef, new)


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar bool array: True when every element of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise `where(pred, on_true, on_false)`; used to skip an update whose grads overflowed."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# The lowest dynamic loss scale: below 1 the scaling would shrink fp16 gradients instead.
LOSS_SCALE_FLOOR = 1.0


@flax.struct.dataclass
class DynamicLossScale:
  """fp16 dynamic loss scale; pure and jit-friendly (a pytree of two scalars).

  scale: float32 [] current scale; good_steps: int32 [] consecutive finite steps since the last
  change; period: finite steps before the scale grows; factor: growth (and shrink) factor.
  """
  scale: jax.Array
  good_steps: jax.Array
  period: int = flax.struct.field(pytree_node=False, default=2000)
  factor: float = flax.struct.field(pytree_node=False, default=2.0)

  def scale_loss(self, loss: jax.Array) -> jax.Array:
    return loss * self.scale.astype(loss.dtype)

  def unscale(self, grads: PyTree) -> PyTree:
    inv = 1.0 / self.scale
    return jax.tree.map(lambda g: (g * inv).astype(g.dtype), grads)

  def adjust(self, grads_finite: jax.Array) -> 'DynamicLossScale':
    """New scale after a step: shrink by `factor` on overflow (never below LOSS_SCALE_FLOOR), grow
    after `period` consecutive finite steps. The caller skips the parameter update when `grads_finite` is False."""
    grow = grads_finite & (self.good_steps + 1 >= self.period)
    scale = jnp.where(grads_finite,
                      jnp.where(grow, self.scale * self.factor, self.scale),
                      jnp.maximum(self.scale / self.factor, LOSS_SCALE_FLOOR))
    good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
    return self.replace(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))


@flax.struct.dataclass
class NoOpLossScale:
  """The loss scale of every policy but fp16: scale 1, nothing to adjust."""

  @property
  def scale(self) -> jax.Array:
    return jnp.array(1.0, jnp.float32)

  def scale_loss(self, loss: jax.Array) -> jax.Array:
    return loss

  def unscale(self, grads: PyTree) -> PyTree:
    return grads

  def adjust(self, grads_finite: jax.Array) -> 'NoOpLossScale':
    del grads_finite
    return self


def loss_scale_for(policy_name: str, init: float = 2.0**15,
                   period: int = 2000) -> DynamicLossScale | NoOpLossScale:
  """A `DynamicLossScale(init, period)` for 'fp16', a `NoOpLossScale` for the other policies."""
  _check_policy_name(policy_name)
  if policy_name != 'fp16':
    return NoOpLossScale()
  if init < 1.0:
    raise ValueError(f'precision.loss_scale_init={init}; must be >= 1')
  if period < 1:
    raise ValueError(f'precision.loss_scale_period={period}; must be >= 1')
  return DynamicLossScale(scale=jnp.array(init, jnp.float32),
                          good_steps=jnp.array(0, jnp.int32), period=int(period))
