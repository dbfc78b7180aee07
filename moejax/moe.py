"""The MoE layer (router + dispatch + experts + shared experts) and the dense FFN baseline.

Shapes: B batch, S seq, D d_model, T tokens (B·S), E experts, K top_k, F d_ff.

Both layers return `(y [B, S, D], aux)` where aux holds float32 `load_balance_loss` [],
`router_z_loss` [], `expert_fraction` [E] ([1] for DenseFFN), `dropped_fraction` [],
`router_entropy` [] and `aux_loss` [], the layer's weighted losses, which the model sums.

A `model.moe` config section maps onto MoE's fields key for key (`MoE(**section, ...)`), so a new
field is one field here plus its config key; `validate_config` names an unknown key.
"""
import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import dispatch as dispatch_lib
from moejax import expert_parallel
from moejax import experts as experts_lib
from moejax import routing as routing_lib


def dense_aux() -> dict[str, jax.Array]:
  """The aux dict of a layer without routing: no losses, one 'expert' that gets every token."""
  zero = jnp.zeros((), jnp.float32)
  return dict(load_balance_loss=zero, router_z_loss=zero, expert_fraction=jnp.ones((1,)),
              dropped_fraction=zero, router_entropy=zero, aux_loss=zero)


class DenseFFN(nn.Module):
  """Dense gated FFN with the MoE interface, for dense layers and dense baselines."""
  d_ff: int
  activation: str = 'swiglu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, S, D] -> (y [B, S, D], aux)."""
    del train
    chex.assert_rank(x, 3)
    y = experts_lib.GatedFFN(self.d_ff, self.activation, self.dtype, self.param_dtype,
                             name='mlp')(x)
    return y, dense_aux()


ROUTER_DTYPES = ('float32', 'bfloat16')  # bfloat16: the ablation of the float32 router
# MoE fields the routers declare under another name (MoE's names are the config keys).
_ROUTER_FIELD_NAMES = {'aux_free_bias_rate': 'bias_rate', 'router_dtype': 'dtype'}
# MoE fields that are not config keys: they come from the model (mesh, quantization, policy) or
# from Flax.
_NON_CONFIG_FIELDS = ('expert_axis', 'expert_quantization', 'e3_copies', 'dtype', 'param_dtype',
                      'parent', 'name')


def config_fields() -> tuple[str, ...]:
  """The MoE fields a `model.moe` config section sets: each key is the field of the same name."""
  return tuple(f.name for f in dataclasses.fields(MoE) if f.name not in _NON_CONFIG_FIELDS)


def validate_config(section, prefix: str = 'model.moe.') -> None:
  """Raises ValueError naming the field for an unknown key or a bad value of a `model.moe`
  section (MoE's own checks, whose messages start with the field name)."""
  fields = config_fields()
  unknown = sorted(set(section) - set(fields))
  if unknown:
    raise ValueError(f'{prefix}{unknown[0]} is not a field of moejax.moe.MoE; the fields are '
                     f'{fields}')
  try:
    MoE(**section)._validate()
  except ValueError as e:
    raise ValueError(f'{prefix}{e}') from None


class MoE(nn.Module):
  """Mixture-of-Experts FFN.

  Attributes:
    num_experts: E routed experts.
    top_k: experts per token (token choice) or the k in expert choice's capacity.
    d_ff: width F of each expert (and of each shared expert).
    dispatch: 'dense' (reference), 'capacity' (token dropping) or 'ragged' (dropless).
    capacity_factor: slack of the capacity dispatch and of expert choice.
    group_size: tokens per capacity group; 0 = one group per sequence. Expert choice picks its
      tokens within the same groups, so the capacity dispatch keeps all it picked.
    capacity_priority: which slots the capacity dispatch keeps when an expert is full: 'position'
      (earlier tokens first; causal for top_k = 1) or 'score' (V-MoE batch-prioritized routing:
      highest gate first; not causal, later tokens decide which earlier ones drop). See
      dispatch.capacity_dispatch.
    num_shared_experts: DeepSeek-MoE shared experts that see every token (one FFN of width n·F).
    router: one of routing.ROUTERS.
    normalize_top_k: renormalise the top-k gates to sum to 1.
    num_expert_groups, top_groups: group-limited routing (DeepSeek-V2/V3): the experts form
      num_expert_groups groups of consecutive experts, and each token picks its top_k experts
      within its top_groups best groups (routing.group_limited_scores); 1 and 1 = off.
      Token-choice routers only.
    jitter_noise: Switch's multiplicative router-input noise (training only).
    activation: 'swiglu' or 'gelu' (GeGLU).
    gmm_impl: grouped-matmul implementation for the ragged dispatch.
    aux_free_bias_rate: bias step of the 'aux_free' router.
    load_balance_weight, z_loss_weight: weights of the load-balance and router z-losses in
      aux['aux_loss'].
    expert_axis: mesh axis the experts are split over (expert parallelism, see
      moejax/expert_parallel.py; needs `sharding.mesh_context`): the dispatch runs per device on
      its own tokens, with all experts local when the axis has one device (data parallelism);
      None = the dispatch in GSPMD's global view.
    expert_quantization: '' | 'int8' (int8 weights, inference) | 'int8_qat' (see moejax.int8).
    e3_copies: M > 1 in an E3 layer (moejax.ensemble.E3): the batch holds M copies of the tokens
      (copy m in rows [m·B/M, (m+1)·B/M)) and copy m routes only within expert group m, the
      experts [m·E/M, (m+1)·E/M) (routing.copy_expert_mask). Token-choice routers only.
    router_dtype: compute dtype of the router's matmul and softmax, one of ROUTER_DTYPES:
      'float32' (the default, ST-MoE's selective precision) whatever `dtype` is; 'bfloat16' only
      for the ablation that shows why.
    dtype: compute dtype of the experts; param_dtype: dtype of all params.
  """
  num_experts: int
  top_k: int
  d_ff: int
  dispatch: str = 'ragged'
  capacity_factor: float = 1.25
  group_size: int = 0
  capacity_priority: str = 'position'
  num_shared_experts: int = 0
  router: str = 'top_k'
  normalize_top_k: bool = True
  num_expert_groups: int = 1
  top_groups: int = 1
  jitter_noise: float = 0.0
  activation: str = 'swiglu'
  gmm_impl: str = 'auto'
  aux_free_bias_rate: float = 1e-3
  load_balance_weight: float = 1e-2
  z_loss_weight: float = 1e-3
  expert_axis: str | None = None
  expert_quantization: str = ''
  e3_copies: int = 1
  router_dtype: str = 'float32'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _validate(self):
    if self.num_experts < 1:
      raise ValueError(f'num_experts={self.num_experts}; must be >= 1')
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f'top_k={self.top_k}; allowed values: 1..num_experts={self.num_experts}')
    if self.d_ff < 1:
      raise ValueError(f'd_ff={self.d_ff}; must be >= 1')
    if self.capacity_factor <= 0:
      raise ValueError(f'capacity_factor={self.capacity_factor}; must be > 0')
    if self.group_size < 0:
      raise ValueError(f'group_size={self.group_size}; must be >= 0 (0 = one group per sequence)')
    if self.num_shared_experts < 0:
      raise ValueError(f'num_shared_experts={self.num_shared_experts}; must be >= 0')
    if self.jitter_noise < 0:
      raise ValueError(f'jitter_noise={self.jitter_noise}; must be >= 0')
    if self.dispatch not in dispatch_lib.DISPATCHES:
      raise ValueError(f'dispatch={self.dispatch!r}; allowed values: {dispatch_lib.DISPATCHES}')
    if self.router not in routing_lib.ROUTERS:
      raise ValueError(f'router={self.router!r}; allowed values: {routing_lib.ROUTERS}')
    dispatch_lib.check_capacity_priority(self.capacity_priority)
    routing_lib.check_expert_groups(self.num_experts, self.top_k, self.num_expert_groups,
                                    self.top_groups)
    experts_lib.check_activation(self.activation)
    if self.router_dtype not in ROUTER_DTYPES:
      raise ValueError(f'router_dtype={self.router_dtype!r}; expected one of {ROUTER_DTYPES}')
    self._validate_e3()

  def _validate_e3(self):
    copies = self.e3_copies
    if copies < 1 or self.num_experts % copies:
      raise ValueError(f'e3_copies={copies}; must be >= 1 and divide num_experts='
                       f'{self.num_experts}')
    if copies == 1:
      return
    if self.top_k > self.num_experts // copies:
      raise ValueError(f'top_k={self.top_k} exceeds the {self.num_experts // copies} experts of '
                       f'each of the e3_copies={copies} expert groups')
    if self.router not in routing_lib.TOKEN_CHOICE_ROUTERS:
      raise ValueError(f'router={self.router!r} with e3_copies={copies}: E3 masks the tokens\' '
                       f'choices; allowed routers: {routing_lib.TOKEN_CHOICE_ROUTERS}')
    if self.top_groups < self.num_expert_groups:
      raise ValueError(f'top_groups={self.top_groups} < num_expert_groups='
                       f'{self.num_expert_groups} with e3_copies={copies}: group-limited routing '
                       "could pick groups outside a copy's own")

  def _check_param_shapes(self, d_model: int):
    """Params made for another d_model/E/F fail here with a ValueError, not an XLA shape error."""
    e, f, fs = self.num_experts, self.d_ff, self.num_shared_experts * self.d_ff
    expected = {
        ('router', 'kernel'): (d_model, e),
        ('router', 'noise_kernel'): (d_model, e),
        ('experts', 'wi_0'): (e, d_model, f),
        ('experts', 'wi_1'): (e, d_model, f),
        ('experts', 'wo'): (e, f, d_model),
        ('shared_experts', 'wi_0'): (d_model, fs),
        ('shared_experts', 'wi_1'): (d_model, fs),
        ('shared_experts', 'wo'): (fs, d_model),
    }
    params = self.variables.get('params', {})
    for (module, name), shape in expected.items():
      if module in params and name in params[module]:
        got = jnp.shape(nn.unbox(params[module][name]))
        if got != shape:
          raise ValueError(
              f'param {module}/{name} has shape {got} but the input and fields need {shape} '
              f'(d_model={d_model}, num_experts={e}, d_ff={f}, '
              f'num_shared_experts={self.num_shared_experts})')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, S, D] -> (y [B, S, D] in `dtype`, aux dict of float32)."""
    self._validate()
    chex.assert_rank(x, 3)
    batch, seq, d_model = x.shape
    self._check_param_shapes(d_model)
    tokens = x.reshape(batch * seq, d_model)
    group_size = self.group_size or seq
    expert_mask, capacity_factor = None, self.capacity_factor
    if self.e3_copies > 1:
      if batch % self.e3_copies:
        raise ValueError(f'batch={batch} does not hold e3_copies={self.e3_copies} equal copies')
      expert_mask = routing_lib.copy_expert_mask(batch * seq, self.num_experts, self.e3_copies)
      # A capacity group of one copy reaches only that copy's E/M experts, which then get M times
      # the slots that E experts would: the capacity is that of an E/M-expert layer.
      capacity_factor = self.capacity_factor * self.e3_copies

    router_fields = {_ROUTER_FIELD_NAMES.get(key, key): getattr(self, key)
                     for key in config_fields()}
    routing = routing_lib.make_router(
        self.router, **{**router_fields, 'group_size': group_size,
                        'param_dtype': self.param_dtype})(tokens, train=train,
                                                          expert_mask=expert_mask)
    experts = experts_lib.Experts(self.num_experts, self.d_ff, self.activation, self.gmm_impl,
                                  quantization=self.expert_quantization, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name='experts')
    dispatch_args = dict(num_experts=self.num_experts, top_k=self.top_k,
                         capacity_factor=capacity_factor, group_size=group_size,
                         capacity_priority=self.capacity_priority)
    per_device = self.expert_axis is not None and not self.is_initializing()
    if per_device and self.expert_quantization:
      if expert_parallel.splits_experts(self.expert_axis):
        raise ValueError(f'expert_quantization={self.expert_quantization!r} is not implemented '
                         f'with expert parallelism (expert_axis={self.expert_axis!r})')
      per_device = False  # int8 experts under data parallelism: the global-view dispatch
    if not per_device:
      y, dropped = dispatch_lib.dispatch(self.dispatch, tokens.astype(self.dtype), routing,
                                         experts, **dispatch_args)
    else:
      y, dropped = expert_parallel.dispatch(
          self.dispatch, tokens.astype(self.dtype), routing, self.variables['params']['experts'],
          expert_axis=self.expert_axis, activation=self.activation, gmm_impl=self.gmm_impl,
          dtype=self.dtype, **dispatch_args)
    if self.num_shared_experts:
      y = y + experts_lib.GatedFFN(self.num_shared_experts * self.d_ff, self.activation,
                                   self.dtype, self.param_dtype, name='shared_experts')(tokens)
    aux = dict(routing.metrics, dropped_fraction=dropped,
               aux_loss=(self.load_balance_weight * routing.metrics['load_balance_loss']
                         + self.z_loss_weight * routing.metrics['router_z_loss']))
    return y.reshape(batch, seq, d_model).astype(self.dtype), aux
