"""Stacked expert FFNs and the dense gated FFN used for shared experts and dense layers.

Shapes: E experts, D d_model, F d_ff, C slots per expert, G capacity groups, N token slots sorted
by expert. `rows_per_expert` [E] counts each expert's rows of a sorted [N, D] input; the kernels
(moejax/kernels/, like jax.lax.ragged_dot) call the same counts `group_sizes`.

Both activations are gated (three matrices wi_0, wi_1, wo), so the parameter tree does not depend
on the activation: swiglu = wo(silu(x wi_0) * (x wi_1)) (Shazeer 2020, as in Mixtral/DeepSeek) and
gelu = wo(gelu(x wi_0) * (x wi_1)), i.e. GeGLU (same paper).
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import int8
from moejax.kernels.grouped_glu import grouped_glu
from moejax.kernels.grouped_matmul import grouped_matmul

ACTIVATIONS = {'swiglu': nn.silu, 'gelu': nn.gelu}

Initializer = Callable[..., jax.Array]


def check_activation(activation: str, field: str = 'activation'):
  if activation not in ACTIVATIONS:
    raise ValueError(f'{field}={activation!r}; allowed values: {sorted(ACTIVATIONS)}')


def expert_ffn(wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, x: jax.Array,
               rows_per_expert: jax.Array | None = None, *, activation: str = 'swiglu',
               gmm_impl: str = 'auto', int8_activations: bool = False) -> jax.Array:
  """The expert maths as a pure function of the weights (handy for shard_map expert parallelism).

  wi_0, wi_1 [E, D, F], wo [E, F, D], all in the compute dtype, and either
    rows_per_expert None: x [E, C, D] or [G, E, C, D] -> same shape (batched einsum), or
    rows_per_expert [E] int32: x [N, D] sorted by expert -> [N, D] (the gated layer
    `grouped_glu`, then a grouped matmul; rows past sum(rows_per_expert) come out zero).
  `int8_activations` rounds both matmul inputs (x and the hidden h) to int8 per token,
  straight-through (quantisation-aware training, see moejax.int8).
  """
  check_activation(activation)
  act = ACTIVATIONS[activation]
  quantize = int8.fake_quantize_rows if int8_activations else lambda a: a
  if rows_per_expert is not None:
    h = grouped_glu(quantize(x), wi_0, wi_1, rows_per_expert, act, impl=gmm_impl)
    return grouped_matmul(quantize(h), wo, rows_per_expert, impl=gmm_impl)
  if x.ndim in (3, 4):
    x = quantize(x)
    h = act(jnp.einsum('...ecd,edf->...ecf', x, wi_0)) * jnp.einsum('...ecd,edf->...ecf', x, wi_1)
    return jnp.einsum('...ecf,efd->...ecd', quantize(h), wo)
  raise ValueError(f'expert inputs must be [E, C, D] or [G, E, C, D]; got shape {x.shape}')


class Experts(nn.Module):
  """E gated FFNs with stacked weights wi_0, wi_1 [E, D, F] and wo [E, F, D].

  Fine-grained setups (DeepSeek-MoE: many small experts, e.g. E=64, top_k=6..8, small F) are just
  other values of the fields. `quantization` (moejax.int8): '' float weights; 'int8' weights
  stored int8 with float32 scales `<name>_scale` [E, 1, N] (inference; `int8.quantize_expert_params`
  converts a float tree), dequantised into the compute dtype; 'int8_qat' float weights, int8
  weights and activations in the forward pass with straight-through gradients.
  """
  num_experts: int
  d_ff: int
  activation: str = 'swiglu'
  gmm_impl: str = 'auto'
  quantization: str = ''
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal', in_axis=-2, out_axis=-1, batch_axis=(0,))

  @nn.compact
  def __call__(self, x: jax.Array, rows_per_expert: jax.Array | None = None) -> jax.Array:
    """x [E, C, D] / [G, E, C, D] (rows_per_expert None), or x [N, D] with rows_per_expert [E]
    sorted by expert."""
    int8.check_quantization(self.quantization)
    d_model = x.shape[-1]
    e, f = self.num_experts, self.d_ff
    shapes = {'wi_0': ((e, d_model, f), ('expert', 'embed', 'mlp')),
              'wi_1': ((e, d_model, f), ('expert', 'embed', 'mlp')),
              'wo': ((e, f, d_model), ('expert', 'mlp', 'embed'))}
    weights = [self._weight(name, shape, names) for name, (shape, names) in shapes.items()]
    x, wi_0, wi_1, wo = nn.dtypes.promote_dtype(x, *weights, dtype=self.dtype)
    return expert_ffn(wi_0, wi_1, wo, x, rows_per_expert, activation=self.activation,
                      gmm_impl=self.gmm_impl, int8_activations=self.quantization == 'int8_qat')

  def _weight(self, name, shape, names):
    """The weight `name` [E, K, N] as the matmul sees it (dequantised or fake-quantised)."""
    if self.quantization == 'int8':
      q = self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, names), shape,
                     jnp.int8)
      scale = self.param(name + int8.SCALE_SUFFIX, nn.with_logical_partitioning(
          nn.initializers.ones, (names[0], None, names[2])), (shape[0], 1, shape[2]), jnp.float32)
      return int8.dequantize(q, scale, self.dtype)
    w = self.param(name, nn.with_logical_partitioning(self.kernel_init, names), shape,
                   self.param_dtype)
    return int8.fake_quantize_weight(w) if self.quantization == 'int8_qat' else w


class GatedFFN(nn.Module):
  """One dense gated FFN, [..., D] -> [..., D]: wi_0, wi_1 [D, F], wo [F, D].

  Used for DeepSeek-MoE shared experts (n shared experts of width F = one FFN of width n·F) and
  by `moe.DenseFFN`.
  """
  d_ff: int
  activation: str = 'swiglu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_activation(self.activation)
    d_model = x.shape[-1]
    wi_0 = self.param('wi_0', nn.with_logical_partitioning(self.kernel_init, ('embed', 'mlp')),
                      (d_model, self.d_ff), self.param_dtype)
    wi_1 = self.param('wi_1', nn.with_logical_partitioning(self.kernel_init, ('embed', 'mlp')),
                      (d_model, self.d_ff), self.param_dtype)
    wo = self.param('wo', nn.with_logical_partitioning(self.kernel_init, ('mlp', 'embed')),
                    (self.d_ff, d_model), self.param_dtype)
    x, wi_0, wi_1, wo = nn.dtypes.promote_dtype(x, wi_0, wi_1, wo, dtype=self.dtype)
    act = ACTIVATIONS[self.activation]
    h = act(jnp.einsum('...d,df->...f', x, wi_0)) * jnp.einsum('...d,df->...f', x, wi_1)
    return jnp.einsum('...f,fd->...d', h, wo)
