"""The first layer of a gated expert FFN on rows sorted by expert: a = act(x @ w0[g]) * (x @ w1[g]).

Shapes: M rows (token slots sorted by group), D d_model (the contraction), F d_ff, G groups.

One custom VJP around the whole gated layer, so that the products can be paired:
  forward          h0 = x w0,  h1 = x w1,  a = act(h0) * h1                     [M, F] each
  backward(da)     dh0 = act'(h0) * h1 * da,  dh1 = act(h0) * da                (elementwise)
                   dx  = dh0 w0^T + dh1 w1^T                                    [M, D]
                   dw0 = x^T dh0,  dw1 = x^T dh1                                per group
With impl='hopper_ws' on an H100 each line is one paired kernel (`hopper.glu`, `gmm_t_sum`,
`tgmm_pair`): the forward reads x once and applies the activation in its epilogue, dx sums both
products on chip, and the weight gradients share each loaded x tile. On the E=64 benchmark shape
that avoids about 2.4 GB of HBM traffic per step (the [M, D] partial gradients and their sum, two
extra reads of x, a re-read of h0 and h1). Every other case, and every shape the paired kernels
cannot serve, runs the same maths as separate grouped matmuls (`grouped_matmul.*_product` with the
same impl).
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.kernels import grouped_matmul as gmm_lib
from moejax.kernels import hopper


def _paired(impl: str, op: str, reason_fn, m: int, k: int, n: int, dtype) -> bool:
  """Whether the paired hopper_ws kernel serves op; logs the reason once when it cannot."""
  if impl != 'hopper_ws':
    return False
  return gmm_lib.log_fallback_once(impl, op, m, k, n, dtype,
                                   hopper.platform_reason() or reason_fn(m, k, n, dtype),
                                   fallback='separate products')


def _forward(x, w0, w1, group_sizes, activation, impl):
  m, d = x.shape
  f = w0.shape[2]
  if _paired(impl, 'glu', hopper.glu_reason, m, d, f, x.dtype):
    return hopper.glu(x, w0, w1, group_sizes, activation)
  h0 = gmm_lib.forward_product(x, w0, group_sizes, impl)
  h1 = gmm_lib.forward_product(x, w1, group_sizes, impl)
  a = activation(h0.astype(jnp.float32)) * h1.astype(jnp.float32)
  return h0, h1, a.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _glu(x, w0, w1, group_sizes, activation, impl):
  return _forward(x, w0, w1, group_sizes, activation, impl)[2]


def _glu_fwd(x, w0, w1, group_sizes, activation, impl):
  h0, h1, a = _forward(x, w0, w1, group_sizes, activation, impl)
  return a, (x, w0, w1, group_sizes, h0, h1)


def _glu_bwd(activation, impl, residuals, da):
  x, w0, w1, group_sizes, h0, h1 = residuals
  m, d = x.shape
  f = w0.shape[2]
  act_h0, act_vjp = jax.vjp(activation, h0.astype(jnp.float32))
  da = da.astype(jnp.float32)
  dh0 = act_vjp(da * h1.astype(jnp.float32))[0].astype(x.dtype)
  dh1 = (da * act_h0).astype(x.dtype)
  if _paired(impl, 'glu input-gradient', hopper.gmm_t_sum_reason, m, d, f, x.dtype):
    dx = hopper.gmm_t_sum(dh0, w0, dh1, w1, group_sizes)
  else:
    dx = (gmm_lib.input_grad_product(dh0, w0, group_sizes, impl).astype(jnp.float32)
          + gmm_lib.input_grad_product(dh1, w1, group_sizes, impl).astype(jnp.float32))
  if _paired(impl, 'glu weight-gradient', hopper.tgmm_pair_reason, m, d, f, x.dtype):
    dw0, dw1 = hopper.tgmm_pair(x, dh0, dh1, group_sizes)
  else:
    dw0 = gmm_lib.weight_grad_product(x, dh0, group_sizes, impl)
    dw1 = gmm_lib.weight_grad_product(x, dh1, group_sizes, impl)
  return dx.astype(x.dtype), dw0.astype(w0.dtype), dw1.astype(w1.dtype), None


_glu.defvjp(_glu_fwd, _glu_bwd)


def grouped_glu(x: jax.Array, w0: jax.Array, w1: jax.Array, group_sizes: jax.Array,
                activation: Callable[[jax.Array], jax.Array], impl: str = 'auto') -> jax.Array:
  """x [M, D], w0, w1 [G, D, F], group_sizes [G] (sum <= M) -> act(x w0[g]) * (x w1[g]) [M, F].

  Rows past sum(group_sizes) come out zero. Operands are promoted to a common dtype, which is the
  output dtype; the products accumulate in float32 and the activation runs in float32.
  `activation` is an elementwise function (jax.nn.silu for SwiGLU); `impl` as in grouped_matmul.
  """
  if x.ndim != 2 or w0.ndim != 3 or w1.shape != w0.shape or x.shape[1] != w0.shape[1]:
    raise ValueError(f'grouped_glu wants x [M, D] and w0, w1 [G, D, F], got {x.shape}, '
                     f'{w0.shape} and {w1.shape}')
  if group_sizes.shape != (w0.shape[0],):
    raise ValueError(f'group_sizes must have shape ({w0.shape[0]},), got {group_sizes.shape}')
  dtype = jnp.result_type(x.dtype, w0.dtype, w1.dtype)
  return _glu(x.astype(dtype), w0.astype(dtype), w1.astype(dtype),
              group_sizes.astype(jnp.int32), activation, gmm_lib.resolve_impl(impl))
