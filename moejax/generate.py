"""Autoregressive sampling from a TransformerLM, or an ensemble's fused distribution, with a KV cache.

Shapes: B batch, P prompt length, N new tokens, V vocab, M ensemble members, R cache length
(P + N, at most model.max_seq_len).

The prompt is prefilled in one decode call (the cache attends causally within it), then one token
per step inside `jax.lax.scan`; the whole loop is one jitted function per (model, shapes), with
temperature and top_k traced. Past model.max_seq_len the cache is a sliding window over the last
max_seq_len positions (see CausalSelfAttention._attend_cached); a longer prompt is prefilled from
its last max_seq_len tokens. An `ensemble.Ensemble` decodes all members at once, each with its own
KV cache (a leading member axis), and samples from their fused distribution (`fusion`, see
moejax.ensemble); an `ensemble.E3` likewise, its layers after the tiling caching all M copies.
Routing that looks across tokens (expert choice, or a capacity dispatch that drops) sees one
token at a time here, so it can differ from a full forward pass.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax import data
from moejax import ensemble


def sample_logits(logits, rng, temperature=1.0, top_k=0):
  """Draws tokens [B] int32 from logits [B, V].

  temperature 0 is greedy; top_k > 0 keeps the k largest logits (and ties with the k-th), 0 keeps
  all V. Both may be traced scalars, so changing them does not recompile a jitted sampler.
  """
  logits = logits.astype(jnp.float32)
  kth_largest = jnp.take(jnp.sort(logits, axis=-1), logits.shape[-1] - jnp.maximum(top_k, 1),
                         axis=-1)[:, None]
  threshold = jnp.where(top_k > 0, kth_largest, -jnp.inf)
  kept = jnp.where(logits >= threshold, logits, -jnp.inf)
  scaled = kept / jnp.where(temperature > 0, temperature, 1.0)
  sampled = jax.random.categorical(rng, scaled, axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def init_cache(model, batch_size, max_len):
  """An empty 'cache' collection for `max_len` positions (only shapes are traced, no params)."""
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0),
                          jnp.zeros((batch_size, max_len), jnp.int32))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(model, params, prompt_tokens, num_new_tokens, rng, temperature=1.0, top_k=0,
             router_state=None, fusion='mean_prob', weights=(), fusion_params=None):
  """Continues prompt_tokens [B, P] by num_new_tokens; returns tokens [B, P + N] int32.

  params: the 'params' collection (boxed or not); router_state: the 'router_state' collection
  (`TrainState.router_state`), needed by routers that keep state (aux-free bias); None or {} when
  there is none. temperature 0 samples greedily; top_k > 0 samples among the k most likely tokens
  only. fusion, weights, fusion_params: how an Ensemble's members are fused at every step (see
  `ensemble.fuse`; 'stacked' and 'gated' need `ensemble.fit_fusion`'s fusion_params); a
  TransformerLM ignores them.
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
    raise ValueError(f'prompt_tokens must be [batch, length>=1], got shape {prompt_tokens.shape}')
  if num_new_tokens < 0:
    raise ValueError(f'num_new_tokens={num_new_tokens}; expected >= 0')
  if temperature < 0:
    raise ValueError(f'temperature={temperature}; expected >= 0 (0 = greedy)')
  if not 0 <= top_k <= model.config.vocab_size:
    raise ValueError(f'top_k={top_k}; expected 0 (no truncation) to vocab_size='
                     f'{model.config.vocab_size}')
  if num_new_tokens == 0:
    return prompt_tokens
  variables = {'params': params}
  if router_state:
    variables['router_state'] = router_state
  fusion = (fusion, tuple(weights)) if ensemble.is_ensemble(model) else None
  # The window: the prompt's last max_seq_len tokens are all the model can attend to.
  window = model.config.max_seq_len
  context = prompt_tokens[:, -window:]
  cache_len = min(context.shape[1] + num_new_tokens, window)
  new = _generate(model, variables, context, rng, jnp.float32(temperature), jnp.int32(top_k),
                  fusion_params, fusion=fusion, num_new_tokens=num_new_tokens, cache_len=cache_len)
  return jnp.concatenate([prompt_tokens, new], axis=1)


@functools.partial(jax.jit, static_argnames=('model', 'fusion', 'num_new_tokens', 'cache_len'))
def _generate(model, variables, prompt_tokens, rng, temperature, top_k, fusion_params, *, fusion,
              num_new_tokens, cache_len):
  """The N new tokens [B, N] after prompt_tokens [B, P <= cache_len]; fusion: None (one model) or
  an ensemble's (fusion rule, weights)."""
  batch = prompt_tokens.shape[0]
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)

  def decode(tokens, cache):
    if fusion is None:
      (logits, _), state = model.apply({**variables, 'cache': cache}, tokens, decode=True,
                                       mutable=['cache'])
      return logits[:, -1], state['cache']
    (logits, _), state = model.apply({**variables, 'cache': cache}, tokens, decode=True,
                                     mutable=['cache', 'intermediates'])
    hidden = ensemble.final_hidden(model, state['intermediates'])
    rule, weights = fusion
    fused = ensemble.fuse(ensemble.log_probs(logits[:, :, -1]), rule, weights, fusion_params,
                          hidden[:, :, -1])
    return fused, state['cache']

  logits, cache = decode(prompt_tokens, init_cache(model, batch, cache_len))
  rngs = jax.random.split(rng, num_new_tokens)
  first = sample(logits, rngs[0])

  def step(carry, step_rng):
    token, cache = carry
    logits, cache = decode(token[:, None], cache)
    next_token = sample(logits, step_rng)
    return (next_token, cache), next_token

  _, rest = jax.lax.scan(step, (first, cache), rngs[1:])  # rest: [N - 1, B]
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def sample_text(model, params, prompt, num_new_tokens, seed=0, temperature=1.0, top_k=0,
                router_state=None, **fusion):
  """Byte-tokenizes `prompt`, samples num_new_tokens tokens, returns prompt + continuation text.

  The prompt is preceded by the end-of-document token, as documents are in the training stream,
  so an empty prompt starts a fresh document; EOD tokens are dropped from the text. fusion:
  `generate`'s fusion, weights and fusion_params, for an Ensemble.
  """
  prompt_tokens = np.concatenate([[data.EOD_ID], data.encode(prompt)])[None, :]
  tokens = generate(model, params, prompt_tokens, num_new_tokens, jax.random.key(seed),
                    temperature, top_k, router_state, **fusion)
  return data.decode(tokens[0])
