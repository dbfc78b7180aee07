"""int8 experts: per-expert, per-output-channel weight quantisation for inference, and int8
quantisation-aware training (fake quantisation with a straight-through gradient).

Shapes: E experts, K contraction (D for wi_0/wi_1, F for wo), N output channels, R rows.

Symmetric int8 (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"): w[e, :, n] ~ q[e, :, n] · scale[e, 0, n] with
scale = max_k |w[e, k, n]| / 127 and q = round(w / scale) in [-127, 127]; each expert and each
output channel has its own scale, so one large channel does not flatten the others. At inference
the int8 weights are dequantised into the compute dtype right before the grouped matmul
(`dequantize`; XLA fuses the multiply into the weight read); activations stay in the compute dtype.
Quantisation-aware training (`Experts(quantization='int8_qat')`) rounds the weights the same way
and the matmul inputs per row (per token), in the forward pass only: the backward pass sees the
identity (the straight-through estimator, Bengio et al. 2013), so the float weights keep learning.

Own code rather than qwix (Google's JAX quantisation library, qwix 0.1.8 on the package index,
which imports on jax 0.10.2): qwix quantises by intercepting the jnp/lax matmul calls of a model,
but the expert matmuls run through moejax's grouped-matmul custom VJPs ('blocked', Hopper kernels)
whose inner dots are implementation details, so intercepting them would quantise whichever dot an
implementation happens to call, not the expert weights with per-expert scales; and the offline GPU
machine has no qwix and no way to install it. The fake quantisation here is a few lines.
"""
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
INT8_MAX = 127
EXPERT_WEIGHTS = ('wi_0', 'wi_1', 'wo')
SCALE_SUFFIX = '_scale'
QUANTIZATIONS = ('', 'int8', 'int8_qat')  # float weights | stored int8 (inference) | QAT


def check_quantization(quantization: str):
  if quantization not in QUANTIZATIONS:
    raise ValueError(f'expert quantization={quantization!r}; allowed values: {QUANTIZATIONS}')


def _scale(x: jax.Array, axis: int) -> jax.Array:
  """max |x| / 127 along `axis` (kept), in float32; 1 where the slice is all zeros."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return jnp.where(amax > 0, amax / INT8_MAX, 1.0)


def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w [E, K, N] -> (q int8 [E, K, N], scale float32 [E, 1, N]) with w ~ q · scale."""
  scale = _scale(w, axis=1)
  q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -INT8_MAX, INT8_MAX)
  return q.astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """q int8 [E, K, N], scale [E, 1, N] -> q · scale [E, K, N] in `dtype`."""
  return q.astype(dtype) * scale.astype(dtype)


def _straight_through(x: jax.Array, rounded: jax.Array) -> jax.Array:
  """`rounded` forward, identity backward."""
  return x + jax.lax.stop_gradient(rounded.astype(x.dtype) - x)


def fake_quantize_weight(w: jax.Array) -> jax.Array:
  """w [E, K, N] rounded to its int8 grid (per expert and output channel), straight-through."""
  q, scale = quantize_weight(w)
  return _straight_through(w, dequantize(q, scale, jnp.float32))


def fake_quantize_rows(x: jax.Array) -> jax.Array:
  """x [..., R, K] rounded to int8 with one scale per row (dynamic, per token), straight-through.
  All-zero rows (the padding of grouped matmuls) stay zero."""
  scale = _scale(x, axis=-1)
  rounded = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -INT8_MAX, INT8_MAX) * scale
  return _straight_through(x, rounded)


def quantize_expert_params(params: PyTree) -> PyTree:
  """The params tree with every routed-experts module's wi_0, wi_1, wo replaced by int8 arrays and
  float32 `<name>_scale` [E, 1, N] beside them: what `Experts(quantization='int8')` reads."""
  def convert(tree, path=()):
    if not isinstance(tree, Mapping):
      return tree
    if path and path[-1] == 'experts' and set(EXPERT_WEIGHTS) <= set(tree):
      out = {k: v for k, v in tree.items() if k not in EXPERT_WEIGHTS}
      for name in EXPERT_WEIGHTS:
        out[name], out[name + SCALE_SUFFIX] = quantize_weight(nn.unbox(tree[name]))
      return out
    return {k: convert(v, path + (k,)) for k, v in tree.items()}
  return convert(dict(nn.unbox(params)))
