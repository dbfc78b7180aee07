"""Decoder-only Transformer LM whose feed-forward blocks are dense FFNs or MoE layers.

Shapes: B batch, S sequence (query) length, R key/value length (S, or the cache length when
decoding), D d_model, H heads, N head_dim (D // H), V vocab, E experts, L layers, L_moe MoE layers.

Pre-norm blocks `x += attn(norm(x)); x += ffn(norm(x))` with rotary positions (Su et al. 2021,
RoFormer) and RMSNorm (Zhang & Sennrich 2019). Layer `i` is an MoE layer when `ffn == 'moe'`,
`i >= first_dense_layers` and `(i - first_dense_layers) % moe_every == 0`; otherwise a dense FFN.
Decoding (`decode=True`) keeps post-RoPE keys and values in the 'cache' collection.

E3 (`e3_copies` M > 1, see moejax.ensemble.E3): the last `e3_layers` MoE layers split their
experts into M groups; the first of them tiles its FFN input M times, and from there on every
layer runs on the M copies of the batch, copy-major ([M·B, S, D]: copy m is rows [m·B, (m+1)·B)),
each copy routing within its own expert group.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import expert_parallel
from moejax import moe as moe_lib

AUX_MEAN_KEYS = ('load_balance_loss', 'router_z_loss', 'dropped_fraction', 'router_entropy')
FFN_KINDS = ('dense', 'moe')
ATTENTION_IMPLS = ('xla', 'cudnn')
_FFN_MATMULS = 3  # both activations are gated (SwiGLU, GeGLU): wi_0, wi_1, wo


def _partitioned(init_fn, names):
  return nn.with_logical_partitioning(init_fn, names)


def _fan_in_init(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                          in_axis=in_axis, out_axis=out_axis)


def is_moe_layer(model_config, layer):
  """Whether layer `layer` (0-based) uses the MoE FFN under `model_config`."""
  if model_config.ffn != 'moe' or layer < model_config.first_dense_layers:
    return False
  return (layer - model_config.first_dense_layers) % model_config.moe_every == 0


def moe_layers(model_config) -> list[int]:
  """The MoE layers' indices under `model_config`, in order."""
  return [layer for layer in range(model_config.num_layers) if is_moe_layer(model_config, layer)]


def e3_layer_indices(model_config, e3_layers: int) -> list[int]:
  """The last `e3_layers` MoE layers' indices (E3's layers); ValueError unless 1..L_moe of them."""
  layers = moe_layers(model_config)
  if not 1 <= e3_layers <= len(layers):
    raise ValueError(f'e3_layers={e3_layers}; expected 1..{len(layers)}, the number of MoE layers '
                     f'(model.num_layers={model_config.num_layers}, model.ffn='
                     f'{model_config.ffn!r}, model.first_dense_layers='
                     f'{model_config.first_dense_layers}, model.moe_every={model_config.moe_every})')
  return layers[-e3_layers:]


def validate_config(model_config):
  """Raises ValueError naming the offending `model.*` field."""
  for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_ff', 'max_seq_len'):
    if model_config[key] < 1:
      raise ValueError(f'model.{key}={model_config[key]}; expected an integer >= 1')
  if model_config.ffn not in FFN_KINDS:
    raise ValueError(f'model.ffn={model_config.ffn!r}; expected one of {FFN_KINDS}')
  if model_config.d_model % model_config.num_heads:
    raise ValueError(f'model.d_model={model_config.d_model} is not divisible by '
                     f'model.num_heads={model_config.num_heads}')
  if (model_config.d_model // model_config.num_heads) % 2:
    raise ValueError(f'model.d_model // model.num_heads = '
                     f'{model_config.d_model // model_config.num_heads} must be even for '
                     'rotary embeddings')
  if model_config.moe_every < 1:
    raise ValueError(f'model.moe_every={model_config.moe_every}; expected an integer >= 1')
  if model_config.first_dense_layers < 0:
    raise ValueError(f'model.first_dense_layers={model_config.first_dense_layers}; '
                     'expected an integer >= 0')
  check_attention_impl(model_config.attention_impl)
  moe_lib.validate_config(model_config.moe)


def check_attention_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}')


class RMSNorm(nn.Module):
  """RMSNorm with float32 statistics whatever the compute dtype. [..., D] -> [..., D]."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', _partitioned(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x, positions, base):
  """Rotates channel pairs (i, i + N/2) of x [..., S, N] by angle position * base^(-2i/N).

  positions: [S] int. Computed in float32 (bf16 angles lose whole radians at long positions).
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [S, N/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def _attention(q, k, v, impl='xla', mask=None):
  """Softmax attention of q [B, H, T, N] over k, v [B, H, S, N] -> [B, H, T, N].

  mask [.., T, S] bool (True: attend); None is causal (T == S). Scores q·k / sqrt(N).
  'xla' materialises the [B, H, T, S] probabilities (and keeps them for the backward pass) in the
  heads-major layout that the projections write directly: on CPU that runs moe_tiny's attention
  fwd+bwd in about 0.7 of the time of `jax.nn.dot_product_attention`, whose [B, S, H, N] layout
  costs a transpose per operand (docs/benchmarks.md). As there, the scores and the softmax are
  float32 and the probabilities are cast to v's dtype. XLA's CPU backend has no fp16 x fp16 ->
  fp32 dot, so fp16 attention on CPU runs in float32 (CPU runs are for testing).
  'cudnn' is cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16), which never materialises
  them; it takes [B, S, H, N] operands.
  """
  check_attention_impl(impl)
  if impl == 'cudnn':
    if jax.default_backend() != 'gpu':
      raise ValueError(f"model.attention_impl='cudnn' needs an NVIDIA GPU; the default backend "
                       f"is {jax.default_backend()} (use 'xla')")
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
                                        implementation='cudnn').swapaxes(1, 2)
  dtype = q.dtype
  if dtype == jnp.float16 and jax.default_backend() == 'cpu':
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  scores = jnp.einsum('BHTN,BHSN->BHTS', q, k, preferred_element_type=jnp.float32)
  scores *= q.shape[-1] ** -0.5
  if mask is None:
    mask = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('BHTS,BHSN->BHTN', probs, v).astype(dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with RoPE and an optional KV cache. [B, S, D] -> [B, S, D].

  `attention_impl` ('xla' | 'cudnn', see `_attention`) serves the full-sequence pass; decoding
  from the cache attends one step at a time with an explicit mask and always uses 'xla'.
  """
  num_heads: int
  rope_base: float
  attention_impl: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, decode=False):
    d_model = x.shape[-1]
    head_dim = d_model // self.num_heads
    qkv_shape = (d_model, self.num_heads, head_dim)
    qkv_init = _partitioned(_fan_in_init(0, (1, 2)), ('embed', 'heads', 'kv'))
    x = x.astype(self.dtype)
    q, k, v = (
        jnp.einsum('BSD,DHN->BHSN', x,
                   self.param(name, qkv_init, qkv_shape, self.param_dtype).astype(self.dtype))
        for name in ('query', 'key', 'value'))

    if decode and self.has_variable('cache', 'cached_key'):
      out = self._attend_cached(q, k, v)
    else:
      # Under `init(..., decode=True)` this branch creates the cache, sized by the init input.
      if decode:
        self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
        self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
        self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
      positions = jnp.arange(x.shape[1])
      q = apply_rope(q, positions, self.rope_base)
      k = apply_rope(k, positions, self.rope_base)
      out = _attention(q, k, v, self.attention_impl)

    out_kernel = self.param('out', _partitioned(_fan_in_init((0, 1), 2), ('heads', 'kv', 'embed')),
                            (self.num_heads, head_dim, d_model), self.param_dtype)
    return jnp.einsum('BHSN,HND->BSD', out, out_kernel.astype(self.dtype))

  def _attend_cached(self, q, k, v):
    """Writes the S new keys/values into the cache and attends over the last R positions.

    The cache is a ring buffer of R slots: position p lives in slot p mod R, so decoding past R
    (model.max_seq_len) attends over a sliding window of the last R positions. Keys carry their
    absolute positions' rotation, and RoPE scores depend only on position differences (< R, as in
    training). One call writes S <= R positions.
    """
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    window = cached_key.value.shape[2]  # R
    if q.shape[2] > window:
      raise ValueError(f'a decode call of {q.shape[2]} tokens exceeds the cache of {window}')
    index = cache_index.value
    positions = index + jnp.arange(q.shape[2])  # [S]
    q = apply_rope(q, positions, self.rope_base)
    k = apply_rope(k, positions, self.rope_base)
    slots = positions % window
    cached_key.value = cached_key.value.at[:, :, slots].set(k)
    cached_value.value = cached_value.value.at[:, :, slots].set(v)
    end = index + q.shape[2]
    cache_index.value = end
    # Slot j holds the latest position p < end with p mod R = j (negative: never written).
    kv_positions = end - 1 - (end - 1 - jnp.arange(window)) % window  # [R]
    # Causal, written, and within the last R positions.
    mask = ((kv_positions[None, :] >= 0) & (kv_positions[None, :] <= positions[:, None])
            & (kv_positions[None, :] > positions[:, None] - window))  # [S, R]
    return _attention(q, cached_key.value, cached_value.value, mask=mask)


class Block(nn.Module):
  """Pre-norm block: attention, then a dense or MoE FFN. [B, S, D] -> ([B, S, D], aux).

  E3: `tile_copies` (the first E3 layer) tiles the attention's output e3_copies = M times before
  the FFN, so the block returns [M·B, S, D] and its attention ran once for the M identical copies;
  in every E3 layer the MoE routes copy m within expert group m (`e3_copies`).
  """
  config: ml_collections.FrozenConfigDict
  use_moe: bool
  expert_quantization: str = ''
  e3_copies: int = 1
  tile_copies: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False, decode=False):
    cfg = self.config
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(name='attn_norm', **dtypes)(x)
    attention = CausalSelfAttention(cfg.num_heads, cfg.rope_base, cfg.attention_impl, name='attn',
                                    **dtypes)
    x = x + attention(h, decode)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    if self.tile_copies:
      x = jnp.tile(x, (self.e3_copies, 1, 1))
    h = RMSNorm(name='ffn_norm', **dtypes)(x)
    if self.use_moe:
      # The `moe` section is MoE's fields, key for key. Dispatched per device (expert parallel
      # when the mesh splits the 'expert' axis, else data parallel) when traced under a mesh
      # that splits the tokens.
      ffn = moe_lib.MoE(**cfg.moe, expert_quantization=self.expert_quantization,
                        e3_copies=self.e3_copies,
                        expert_axis=expert_parallel.context_expert_axis(), name='ffn', **dtypes)
      y, aux = ffn(h, train=train)
    else:
      # Dense layers share the MoE activation so dense baselines differ from MoE only in routing.
      y, aux = moe_lib.DenseFFN(cfg.d_ff, activation=cfg.moe.activation, name='ffn', **dtypes)(h)
    x = x + y.astype(self.dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), aux


class TransformerLM(nn.Module):
  """Decoder-only LM. tokens [B, S] int32 -> (logits [B, S, V] float32, aux dict).

  aux: `aux_loss` () = Σ_moe-layers (load_balance_weight · lb + z_loss_weight · z), the sum of
  the layers' own `aux_loss`; means over
  MoE layers of `load_balance_loss`, `router_z_loss`, `dropped_fraction`, `router_entropy` (0.0
  without MoE layers); `expert_fraction` [L_moe, E] (shape [0, 1] without MoE layers).

  With `e3_copies` M > 1 the logits are [M·B, S, V], copy-major, and the final hidden state
  sown is [M·B, S, D] (moejax.ensemble.E3 presents both per copy); an E3 layer's aux values are
  those of the copies' joint routing, i.e. means over the copies.
  """
  config: ml_collections.FrozenConfigDict  # the `model` section of an experiment config
  expert_quantization: str = ''  # of the routed experts: '' | 'int8' | 'int8_qat' (moejax.int8)
  e3_copies: int = 1  # E3's M; 1 = the plain model
  e3_layers: int = 0  # E3: how many of the last MoE layers split their experts (1..L_moe)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, train=False, decode=False):
    cfg = self.config
    if tokens.shape[1] > cfg.max_seq_len:
      raise ValueError(f'input length {tokens.shape[1]} exceeds '
                       f'model.max_seq_len={cfg.max_seq_len}')
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # N(0, 1) embeddings with tied logits scaled by 1/sqrt(D), as in PaLM (Chowdhery et al. 2022).
    embedding_init = _partitioned(nn.initializers.normal(1.0), ('vocab', 'embed'))
    embedding = self.param('embedding', embedding_init, (cfg.vocab_size, cfg.d_model),
                           self.param_dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

    # Rematerialisation keeps only each block's input for the backward pass and recomputes the
    # rest: about a third more compute for activations that no longer grow with depth.
    # static_argnums count `self`: (train, decode) are arguments 2 and 3.
    block_cls = nn.remat(Block, static_argnums=(2, 3)) if cfg.remat and not decode else Block
    e3 = e3_layer_indices(cfg, self.e3_layers) if self.e3_copies > 1 else []
    moe_aux = []
    for layer in range(cfg.num_layers):
      use_moe = is_moe_layer(cfg, layer)
      block = block_cls(cfg, use_moe, self.expert_quantization,
                        e3_copies=self.e3_copies if layer in e3 else 1,
                        tile_copies=bool(e3) and layer == e3[0], name=f'layer_{layer}', **dtypes)
      x, aux = block(x, train, decode)
      if use_moe:
        moe_aux.append(aux)

    # The output projection runs in float32 whatever the policy: the byte vocabulary is tiny, so it
    # costs little, keeps the softmax inputs exact, and fp16 x fp16 -> fp32 dots do not exist on CPU.
    x = RMSNorm(name='final_norm', **dtypes)(x).astype(jnp.float32)
    # Kept only when the caller asks for 'intermediates' (an ensemble's gate reads it).
    self.sow('intermediates', 'final_hidden', x)
    if cfg.tie_embeddings:
      logits = jnp.einsum('BSD,VD->BSV', x, embedding.astype(jnp.float32)) * cfg.d_model**-0.5
    else:
      kernel = self.param('logits', _partitioned(_fan_in_init(0, 1), ('embed', 'vocab')),
                          (cfg.d_model, cfg.vocab_size), self.param_dtype)
      logits = jnp.einsum('BSD,DV->BSV', x, kernel.astype(jnp.float32))
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))
    return logits, _combine_aux(moe_aux)


def _combine_aux(moe_aux):
  """The layers' weighted aux losses summed, and their metrics averaged over MoE layers."""
  if not moe_aux:
    zero = jnp.zeros((), jnp.float32)
    return dict(aux_loss=zero, expert_fraction=jnp.zeros((0, 1), jnp.float32),
                **{key: zero for key in AUX_MEAN_KEYS})
  stacked = {key: jnp.stack([a[key].astype(jnp.float32) for a in moe_aux])
             for key in AUX_MEAN_KEYS + ('expert_fraction', 'aux_loss')}
  return dict(aux_loss=jnp.sum(stacked['aux_loss']), expert_fraction=stacked['expert_fraction'],
              **{key: jnp.mean(stacked[key]) for key in AUX_MEAN_KEYS})


def build_model(model_config, policy, expert_quantization=''):
  """TransformerLM from the `config.model` ConfigDict and a precision `Policy`.

  `expert_quantization`: '' float experts; 'int8' int8 expert weights (inference, params from
  `int8.quantize_expert_params`); 'int8_qat' quantisation-aware training (`precision.int8_training`).

  MoE layers run expert parallel when traced inside `sharding.mesh_context` with a mesh whose
  'expert' axis has more than one device (see moejax.expert_parallel).
  """
  validate_config(model_config)
  return TransformerLM(ml_collections.FrozenConfigDict(model_config),
                       expert_quantization=expert_quantization,
                       dtype=policy.compute_dtype, param_dtype=policy.param_dtype)


def _moe_matmul_params_per_token(model_config):
  """Active matmul params of one MoE FFN for one token: top_k + shared experts, plus the router."""
  m = model_config.moe
  expert = _FFN_MATMULS * model_config.d_model * m.d_ff
  return (m.top_k + m.num_shared_experts) * expert + model_config.d_model * m.num_experts


def flops_per_token(model_config, seq_len, e3_copies=1, e3_layers=0):
  """Training FLOPs per token: 6 · (active matmul params) + 12 · L · D · S (attention).

  Counts the q, k, v, out projections (4 D²), each gated FFN (dense: 3 D F; MoE: 3 D moe.d_ff for
  each of top_k routed + num_shared_experts experts, plus the D·E router) and the D·V output
  projection (tied or not); the embedding lookup is not a matmul. Attention scores and values
  cost 2 · 2 · S · D forward per token and layer, ×3 for training, counted over the full S×S
  square although causal masking skips half of it (the PaLM / MaxText convention). Expert-choice
  routing is counted as top_k experts per token, its average.

  E3 (e3_copies M > 1 over the last e3_layers MoE layers): one input token's FLOPs for all M
  copies, so the first E3 layer's FFN and every layer, norm and projection after it count M times.
  """
  validate_config(model_config)
  d = model_config.d_model
  first_tiled = (e3_layer_indices(model_config, e3_layers)[0] if e3_copies > 1
                 else model_config.num_layers)
  copies = lambda tiled: e3_copies if tiled else 1
  dense_ffn = _FFN_MATMULS * d * model_config.d_ff
  matmul_params = d * model_config.vocab_size * copies(e3_copies > 1)
  attention_layers = 0
  for layer in range(model_config.num_layers):
    attention_layers += copies(layer > first_tiled)
    matmul_params += 4 * d * d * copies(layer > first_tiled)
    if is_moe_layer(model_config, layer):
      matmul_params += _moe_matmul_params_per_token(model_config) * copies(layer >= first_tiled)
    else:
      matmul_params += dense_ffn * copies(layer >= first_tiled)
  return 6 * matmul_params + 12 * attention_layers * d * seq_len


def param_counts(params, model_config):
  """dict(total=, active=): all parameters, and those one token uses (top_k of E routed experts).

  params: the 'params' collection, boxed or not. Routed expert weights live under a module named
  'experts' (see moejax.moe); shared experts, router, attention and embeddings are always active.
  """
  m = model_config.moe
  total = active = 0
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  for path, leaf in flat:
    total += leaf.size
    if 'experts' in [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]:
      active += leaf.size * m.top_k // m.num_experts
    else:
      active += leaf.size
  return dict(total=total, active=active)
