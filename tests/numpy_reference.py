"""Independent references for the LM and its objective, written from the papers' formulas.

Shapes: B batch, S sequence, D d_model, H heads, N head_dim, F d_ff, E experts, K top_k, V vocab,
T tokens (B·S).

Nothing here imports moejax: these functions read a parameter tree laid out as the model's
(`embedding`, `layer_i/{attn_norm,attn,ffn_norm,ffn}`, `final_norm`, `logits`) and recompute the
model from the formulas. Every function takes the array module `xp`: `numpy` for float64 values,
`jax.numpy` (under `jax.enable_x64`) to differentiate the same code with `jax.grad`.
"""
import math


def softmax(xp, x):
  z = x - xp.max(x, axis=-1, keepdims=True)
  e = xp.exp(z)
  return e / xp.sum(e, axis=-1, keepdims=True)


def logsumexp(xp, x):
  m = xp.max(x, axis=-1, keepdims=True)
  return (m + xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def silu(xp, x):
  return x / (1.0 + xp.exp(-x))


def rms_norm(xp, x, scale, eps=1e-6):
  """Zhang & Sennrich 2019: x / sqrt(mean(x²) + eps) · scale over the last axis."""
  return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(xp, x, base):
  """RoFormer (Su et al. 2021) rotation of x [B, S, H, N], pairing channels (i, i + N/2).

  Pair i at position p turns by the angle p · base^(-2i/N).
  """
  s, n = x.shape[1], x.shape[-1]
  half = n // 2
  theta = base ** (-2.0 * xp.arange(half) / n)  # [N/2]
  angle = xp.arange(s)[:, None] * theta[None, :]  # [S, N/2]
  cos, sin = xp.cos(angle)[None, :, None, :], xp.sin(angle)[None, :, None, :]
  a, b = x[..., :half], x[..., half:]
  return xp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def causal_attention(xp, x, p, rope_base):
  """Multi-head causal self-attention (Vaswani et al. 2017) with RoPE. x [B, S, D] -> [B, S, D].

  p: query, key, value [D, H, N], out [H, N, D]. Scores q·k / sqrt(N); position t sees 0..t.
  """
  q = rope(xp, xp.einsum('bsd,dhn->bshn', x, p['query']), rope_base)
  k = rope(xp, xp.einsum('bsd,dhn->bshn', x, p['key']), rope_base)
  v = xp.einsum('bsd,dhn->bshn', x, p['value'])
  s, n = x.shape[1], q.shape[-1]
  scores = xp.einsum('bqhn,bkhn->bhqk', q, k) / math.sqrt(n)
  causal = xp.tril(xp.ones((s, s))) > 0
  scores = xp.where(causal[None, None], scores, -1e30)
  out = xp.einsum('bhqk,bkhn->bqhn', softmax(xp, scores), v)
  return xp.einsum('bshn,hnd->bsd', out, p['out'])


def swiglu(xp, x, wi_0, wi_1, wo):
  """Shazeer 2020: (silu(x wi_0) ⊙ x wi_1) wo. x [..., D]."""
  return (silu(xp, x @ wi_0) * (x @ wi_1)) @ wo


def moe_ffn(xp, x, p, top_k, normalize_top_k=True):
  """Token-choice top-k MoE with SwiGLU experts; x [T, D] -> (y [T, D], load balance, z loss).

  p: router/kernel [D, E], experts/{wi_0, wi_1 [E, D, F], wo [E, F, D]}.
  Switch (Fedus et al. 2021) load balance E · Σ_e f_e P_e, f_e the share of the T·K slots sent to
  e; ST-MoE (Zoph et al. 2022) z loss mean(logsumexp(logits)²).
  """
  logits = x @ p['router']['kernel']  # [T, E]
  probs = softmax(xp, logits)
  num_experts = probs.shape[-1]
  chosen = xp.argsort(-probs, axis=-1)[:, :top_k]  # [T, K]
  gates = xp.take_along_axis(probs, chosen, axis=-1)
  if normalize_top_k:
    gates = gates / xp.sum(gates, axis=-1, keepdims=True)
  e = p['experts']
  outs = xp.stack([swiglu(xp, x, e['wi_0'][i], e['wi_1'][i], e['wo'][i])
                   for i in range(num_experts)])  # [E, T, D]
  picked = (chosen[:, :, None] == xp.arange(num_experts)[None, None, :])  # [T, K, E]
  weight = xp.sum(gates[:, :, None] * picked, axis=1)  # [T, E]
  y = xp.einsum('te,etd->td', weight, outs)
  counts = xp.sum(picked.astype(probs.dtype), axis=(0, 1))
  fraction = counts / (x.shape[0] * top_k)
  load_balance = num_experts * xp.sum(fraction * xp.mean(probs, axis=0))
  z_loss = xp.mean(logsumexp(xp, logits) ** 2)
  return y, load_balance, z_loss


def block(xp, x, p, rope_base, top_k=None, normalize_top_k=True):
  """Pre-norm block: x + attn(norm(x)), then + ffn(norm(·)). -> (x, [(lb, z)] or [])."""
  x = x + causal_attention(xp, rms_norm(xp, x, p['attn_norm']['scale']), p['attn'], rope_base)
  h = rms_norm(xp, x, p['ffn_norm']['scale'])
  ffn = p['ffn']
  if 'mlp' in ffn:
    m = ffn['mlp']
    return x + swiglu(xp, h, m['wi_0'], m['wi_1'], m['wo']), []
  b, s, d = h.shape
  y, lb, z = moe_ffn(xp, h.reshape(b * s, d), ffn, top_k, normalize_top_k)
  return x + y.reshape(b, s, d), [(lb, z)]


def lm_logits(xp, params, tokens, num_layers, rope_base, top_k=None, normalize_top_k=True):
  """Decoder-only LM: embed, blocks, final RMSNorm, output projection.

  tokens [B, S] -> (logits [B, S, V], [(load balance, z loss)] per MoE layer). Tied embeddings
  (no `logits` kernel) project with embeddingᵀ / sqrt(D), as PaLM does.
  """
  emb = params['embedding']
  x = emb[tokens]
  aux = []
  for i in range(num_layers):
    x, layer_aux = block(xp, x, params[f'layer_{i}'], rope_base, top_k, normalize_top_k)
    aux += layer_aux
  x = rms_norm(xp, x, params['final_norm']['scale'])
  if 'logits' in params:
    return x @ params['logits'], aux
  return x @ emb.T / math.sqrt(emb.shape[1]), aux


def next_token_cross_entropy(xp, logits, targets):
  """Mean over B·S of -log softmax(logits)[target]. logits [B, S, V], targets [B, S] int."""
  log_probs = logits - logsumexp(xp, logits)[..., None]
  picked = xp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return -xp.mean(picked)


def lm_objective(xp, params, batch, num_layers, rope_base, top_k=None, normalize_top_k=True,
                 load_balance_weight=0.0, z_loss_weight=0.0):
  """The training objective on batch [B, S+1]: inputs batch[:, :-1] predict targets batch[:, 1:].

  -> (total, cross-entropy, aux): total = CE + Σ_moe-layers (w_lb · lb + w_z · z).
  """
  logits, aux = lm_logits(xp, params, batch[:, :-1], num_layers, rope_base, top_k,
                          normalize_top_k)
  ce = next_token_cross_entropy(xp, logits, batch[:, 1:])
  aux_loss = sum(load_balance_weight * lb + z_loss_weight * z for lb, z in aux)
  return ce + aux_loss, ce, aux_loss


def adamw_step(params, grads, mu, nu, count, *, lr, b1, b2, eps, weight_decay, decay, clip):
  """One AdamW step (Loshchilov & Hutter 2019) after global-norm clipping, on flat dicts.

  params, grads, mu, nu: {name: float64 array}; count: steps already taken; decay: {name: bool}.
  Returns (new params, mu, nu).
  """
  norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
  factor = clip / max(norm, clip) if clip > 0 else 1.0
  t = count + 1
  new_params, new_mu, new_nu = {}, {}, {}
  for name, p in params.items():
    g = grads[name] * factor
    new_mu[name] = b1 * mu[name] + (1 - b1) * g
    new_nu[name] = b2 * nu[name] + (1 - b2) * g * g
    m_hat = new_mu[name] / (1 - b1**t)
    v_hat = new_nu[name] / (1 - b2**t)
    update = m_hat / (v_hat ** 0.5 + eps)
    if decay[name]:
      update = update + weight_decay * p
    new_params[name] = p - lr * update
  return new_params, new_mu, new_nu
