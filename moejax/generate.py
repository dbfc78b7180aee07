"""Autoregressive sampling from a TransformerLM with a KV cache.

Shapes: B batch, P prompt length, N new tokens, V vocab, R cache length (P + N).

The prompt is prefilled in one decode call (the cache attends causally within it), then one token
per step inside `jax.lax.scan`; the whole loop is one jitted function per (model, shapes), with
temperature and top_k traced. Routing that looks across tokens (expert choice, or a capacity
dispatch that drops) sees one token at a time here, so it can differ from a full forward pass.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax import data


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
             router_state=None):
  """Continues prompt_tokens [B, P] by num_new_tokens; returns tokens [B, P + N] int32.

  params: the 'params' collection (boxed or not); router_state: the 'router_state' collection
  (`TrainState.model_state`), needed by routers that keep state (aux-free bias); None or {} when
  there is none. temperature 0 samples greedily; top_k > 0 samples among the k most likely tokens
  only.
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
    raise ValueError(f'prompt_tokens must be [batch, length>=1], got shape {prompt_tokens.shape}')
  if num_new_tokens < 0:
    raise ValueError(f'num_new_tokens={num_new_tokens}; expected >= 0')
  total = prompt_tokens.shape[1] + num_new_tokens
  if total > model.config.max_seq_len:
    raise ValueError(f'prompt length {prompt_tokens.shape[1]} + num_new_tokens {num_new_tokens} = '
                     f'{total} exceeds model.max_seq_len={model.config.max_seq_len}')
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
  return _generate(model, variables, prompt_tokens, rng, jnp.float32(temperature),
                   jnp.int32(top_k), num_new_tokens=num_new_tokens)


@functools.partial(jax.jit, static_argnames=('model', 'num_new_tokens'))
def _generate(model, variables, prompt_tokens, rng, temperature, top_k, *, num_new_tokens):
  batch, prompt_len = prompt_tokens.shape
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)

  def decode(tokens, cache):
    (logits, _), state = model.apply({**variables, 'cache': cache}, tokens, decode=True,
                                     mutable=['cache'])
    return logits[:, -1], state['cache']

  logits, cache = decode(prompt_tokens, init_cache(model, batch, prompt_len + num_new_tokens))
  rngs = jax.random.split(rng, num_new_tokens)
  first = sample(logits, rngs[0])

  def step(carry, step_rng):
    token, cache = carry
    logits, cache = decode(token[:, None], cache)
    next_token = sample(logits, step_rng)
    return (next_token, cache), next_token

  _, rest = jax.lax.scan(step, (first, cache), rngs[1:])  # rest: [N - 1, B]
  return jnp.concatenate([prompt_tokens, first[:, None], rest.T], axis=1)


def sample_text(model, params, prompt, num_new_tokens, seed=0, temperature=1.0, top_k=0,
                router_state=None):
  """Byte-tokenizes `prompt`, samples num_new_tokens tokens, returns prompt + continuation text.

  The prompt is preceded by the end-of-document token, as documents are in the training stream,
  so an empty prompt starts a fresh document; EOD tokens are dropped from the text.
  """
  prompt_tokens = np.concatenate([[data.EOD_ID], data.encode(prompt)])[None, :]
  tokens = generate(model, params, prompt_tokens, num_new_tokens, jax.random.key(seed),
                    temperature, top_k, router_state)
  return data.decode(tokens[0])
