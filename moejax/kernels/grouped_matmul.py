"""Grouped matmul: rows of `x`, sorted by group, times that group's weight matrix.

Shapes: M rows (token slots sorted by expert), K contraction, N output, G groups (experts).

`grouped_matmul` carries a custom VJP whose three products (forward, input gradient, weight
gradient) each pick an implementation:
  'xla'       `jax.lax.ragged_dot` / `ragged_dot_general`: the reference; CPU, TPU, any GPU.
  'blocked'   batched dense matmuls over padded row blocks (`blocked.py`), any platform; 3.4x
              faster than 'xla' fwd+bwd on CPU at moe_tiny's size (docs/benchmarks.md).
  'hopper'    JAX's Pallas Mosaic-GPU kernels, through `hopper.py` (sm90 only).
  'hopper_ws' moejax's warp-specialized Mosaic-GPU kernels (`hopper_ws.py`, sm90 only); not yet
              timed on a GPU, so 'auto' does not choose them.
  'auto'      'hopper' on an sm90 GPU, 'blocked' on CPU, else 'xla'.
A product the chosen implementation cannot serve (a Hopper kernel: dtype, shape; 'blocked': a
large per-block weight copy) falls back to 'xla' and logs why once.
"""
import functools

from absl import logging
import jax
import jax.numpy as jnp

from moejax.kernels import blocked
from moejax.kernels import hopper

IMPLS = ('auto', 'xla', 'blocked') + hopper.IMPLS

# Transposed ragged contraction: dw[g] = x_g^T dy_g, contracting the ragged row dimension.
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)

_logged_fallbacks: set[tuple] = set()


def resolve_impl(impl: str) -> str:
  """'auto' -> the fastest implementation for the default device; validates `impl`."""
  if impl not in IMPLS:
    raise ValueError(f'gmm_impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    if hopper.platform_reason() is None:
      return 'hopper'
    return 'blocked' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def log_fallback_once(impl: str, op: str, m: int, k: int, n: int, dtype, reason: str | None,
                      fallback: str = 'xla') -> bool:
  """True when reason is None (the kernel serves op); else logs why, once per case, and False."""
  if reason is None:
    return True
  key = (impl, op, m, k, n, jnp.dtype(dtype).name, reason)
  if key not in _logged_fallbacks:
    _logged_fallbacks.add(key)
    logging.warning('grouped_matmul %s %s [M=%d, K=%d, N=%d] %s: falling back to %s (%s)',
                    impl, op, m, k, n, jnp.dtype(dtype).name, fallback, reason)
  return False


def _use_hopper(impl: str, op: str, reason_fn, m: int, k: int, n: int, dtype) -> bool:
  if impl not in hopper.IMPLS:
    return False
  reason = hopper.platform_reason() or reason_fn(m, k, n, dtype, impl)
  return log_fallback_once(impl, op, m, k, n, dtype, reason)


def _use_blocked(impl: str, op: str, m: int, k: int, n: int, g: int, dtype) -> bool:
  if impl != 'blocked':
    return False
  return log_fallback_once(impl, op, m, k, n, dtype, blocked.reason(m, k, n, g, dtype))


def forward_product(x, w, group_sizes, impl):
  """y [M, N] = x [M, K] @ w[g] [G, K, N], with a resolved `impl`."""
  m, k = x.shape
  n = w.shape[2]
  if _use_hopper(impl, 'forward', hopper.gmm_reason, m, k, n, x.dtype):
    return hopper.gmm(x, w, group_sizes, impl)
  if _use_blocked(impl, 'forward', m, k, n, w.shape[0], x.dtype):
    return blocked.gmm(x, w, blocked.layout(group_sizes, m))
  return jax.lax.ragged_dot(x, w, group_sizes)


def input_grad_product(dy, w, group_sizes, impl):
  """dx [M, K] = dy [M, N] @ w[g]^T, with a resolved `impl`."""
  m, n = dy.shape
  k = w.shape[1]
  if _use_hopper(impl, 'input-gradient', hopper.gmm_t_reason, m, k, n, dy.dtype):
    return hopper.gmm_t(dy, w, group_sizes, impl)
  if _use_blocked(impl, 'input-gradient', m, k, n, w.shape[0], dy.dtype):
    return blocked.gmm_t(dy, w, blocked.layout(group_sizes, m))
  return jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes)


def weight_grad_product(x, dy, group_sizes, impl):
  """dw [G, K, N] = x_g^T dy_g, with a resolved `impl`."""
  m, k = x.shape
  n = dy.shape[1]
  if _use_hopper(impl, 'weight-gradient', hopper.tgmm_reason, m, k, n, x.dtype):
    return hopper.tgmm(x, dy, group_sizes, impl)
  if _use_blocked(impl, 'weight-gradient', m, k, n, group_sizes.shape[0], x.dtype):
    return blocked.tgmm(x, dy, blocked.layout(group_sizes, m), group_sizes.shape[0])
  return jax.lax.ragged_dot_general(x, dy, group_sizes, _TGMM_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, group_sizes, impl):
  return forward_product(x, w, group_sizes, impl)


def _gmm_fwd(x, w, group_sizes, impl):
  return forward_product(x, w, group_sizes, impl), (x, w, group_sizes)


def _gmm_bwd(impl, residuals, dy):
  x, w, group_sizes = residuals
  dy = dy.astype(x.dtype)
  dx = input_grad_product(dy, w, group_sizes, impl).astype(x.dtype)
  dw = weight_grad_product(x, dy, group_sizes, impl).astype(w.dtype)
  return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(x, w, group_sizes, impl='auto'):
  """[M, K] x [G, K, N] with group_sizes [G] (sum <= M) -> [M, N]; rows past the sum are zero.

  Operands are promoted to a common dtype, which is also the output dtype (f32 accumulation).
  `impl` is one of `IMPLS` (see the module docstring).
  """
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise ValueError(f'grouped_matmul wants x [M, K] and w [G, K, N], got {x.shape} and {w.shape}')
  if group_sizes.shape != (w.shape[0],):
    raise ValueError(f'group_sizes must have shape ({w.shape[0]},), got {group_sizes.shape}')
  dtype = jnp.result_type(x.dtype, w.dtype)
  return _gmm(x.astype(dtype), w.astype(dtype), group_sizes.astype(jnp.int32), resolve_impl(impl))
