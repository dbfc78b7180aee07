"""Ensembles of language models: a member axis, fusion rules, member data, and what they score.

Shapes: M members, B batch, S seq, V vocab, D d_model, T tokens (flattened B·S), K calibration bins.

`Ensemble` is M copies of a `TransformerLM` (dense or MoE) under `nn.vmap`: parameters, router
state and KV cache carry a leading member axis whose logical name 'member' the config maps to the
'member' mesh axis (`mesh.member` devices), each member has its own initialisation and RNG streams,
and one jitted call runs them all. Its input is one batch per member, tokens [M, B, S], or one
batch [B, S] that every member reads; it returns (logits [M, B, S, V], aux with a leading M).

Fusion of member log-probabilities lp [M, ..., V] into one distribution (log-probs [..., V]):
  mean_prob     linear pool, log (1/M Σ_m p_m) = logsumexp_m(lp) - log M;
  mean_logprob  log-linear pool, softmax(1/M Σ_m lp_m) (a renormalised geometric mean);
  weighted      linear pool with the given `ensemble.weights` (normalised to sum 1);
  stacked       linear pool with softmax(θ) weights fitted by NLL on held-out training data
                (Wolpert 1992, stacked generalisation);
  gated         linear pool with per-token weights softmax(W · [h_1; ...; h_M] + b) from the
                members' final hidden states, fitted the same way: a model-level mixture of
                experts (Jacobs et al. 1991);
  sum_logits    softmax(Σ_m lp_m), the predictor of additive (logit) boosting.
Stacked and gated weights are fitted on `ensemble.fit_batches` batches of the selection split,
training data that `data.selection_fraction` holds out and the members never train on
(`fit_on_selection`); the validation split is only ever scored.

Building members (`ensemble.method`): 'deep' (own init, own data order; Lakshminarayanan et al.
2017), 'bagging' (own bootstrap resample of the training documents, a pure function of
(seed, member); Breiman 1996), 'boosting' (members trained one after another, earlier ones
frozen), of two kinds (`ensemble.boosting`): 'additive', where member m minimises the log loss of
the sum of the earlier members' logits plus its own (gradient boosting in function space,
Friedman 2001), and 'reweight', where member m trains on its own loss over the training documents
resampled with probability proportional to the earlier members' fused NLL on each (AdaBoost-style
reweighting, Freund & Schapire 1997), and 'e3'.

'e3' is an efficient ensemble of experts (`E3`; Allingham et al. 2022, "Sparse MoEs meet Efficient
Ensembles"): one MoE TransformerLM whose last `ensemble.e3_layers` MoE layers split their E
experts into M disjoint groups. The hidden state is tiled M times before the first of those
layers' FFN, copy m routes only within group m (a block-diagonal router), and every later layer
runs on all M copies with shared parameters. It returns what an Ensemble does (logits
[M, B, S, V]), so fusion, scoring and decoding are the same code; its parameters are the single
model's tree, it trains on one shared batch [B, S+1] with the mean of the copies' losses, and it
costs the layers before the tiling once.
"""
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moejax import data as data_lib
from moejax import expert_parallel
from moejax import memory
from moejax import model as model_lib
from moejax import routing
from moejax import sharding

PyTree = Any

METHODS = ('deep', 'bagging', 'boosting', 'e3')
BOOSTING = ('additive', 'reweight')
FUSIONS = ('mean_prob', 'mean_logprob', 'weighted', 'stacked', 'gated', 'sum_logits')
FITTED_FUSIONS = ('stacked', 'gated')
CALIBRATION_BINS = 15
_BAG_STREAM = 0x6261  # 'ba': keeps bootstrap draws apart from the batch-offset draws
_REWEIGHT_STREAM = 0x7277  # 'rw': the reweighted resamples' draws


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `ensemble.*` or `mesh.*` field that cannot work."""
  ens = config.ensemble
  if ens.size < 1:
    raise ValueError(f'ensemble.size={ens.size}; expected an integer >= 1 (1 = a single model)')
  if ens.method not in METHODS:
    raise ValueError(f'ensemble.method={ens.method!r}; expected one of {METHODS}')
  if ens.fusion not in FUSIONS:
    raise ValueError(f'ensemble.fusion={ens.fusion!r}; expected one of {FUSIONS}')
  if ens.weights and (len(ens.weights) != ens.size or min(ens.weights) < 0
                      or sum(ens.weights) <= 0):
    raise ValueError(f'ensemble.weights={tuple(ens.weights)}; expected ensemble.size={ens.size} '
                     'non-negative numbers with a positive sum (or () for equal weights)')
  if ens.fusion == 'weighted' and not ens.weights:
    raise ValueError("ensemble.fusion='weighted' needs ensemble.weights (one per member)")
  for key in ('fit_steps', 'fit_batches'):
    if ens[key] < 1:
      raise ValueError(f'ensemble.{key}={ens[key]}; expected an integer >= 1')
  if ens.fusion in FITTED_FUSIONS:  # checked now: the fit runs after training, in evaluate.py
    data_lib.check_selection_split([config.data.selection_fraction],
                                   f'ensemble.fusion={ens.fusion!r}', 'the members')
  if ens.fit_learning_rate <= 0:
    raise ValueError(f'ensemble.fit_learning_rate={ens.fit_learning_rate}; expected > 0')
  if config.mesh.member > 0 and ens.size % config.mesh.member:
    raise ValueError(f'mesh.member={config.mesh.member} does not divide ensemble.size={ens.size}')
  if ens.size > 1 and config.mesh.expert != 1:
    raise ValueError(f'mesh.expert={config.mesh.expert} with ensemble.size={ens.size}: expert '
                     'parallelism under the member axis is not supported; use mesh.expert=1')
  if ens.boosting not in BOOSTING:
    raise ValueError(f'ensemble.boosting={ens.boosting!r}; expected one of {BOOSTING}')
  additive = ens.method == 'boosting' and ens.boosting == 'additive'
  if additive != (ens.fusion == 'sum_logits'):
    raise ValueError(f"ensemble.fusion='sum_logits' goes with additive boosting, and only with it "
                     f"(ensemble.method={ens.method!r}, ensemble.boosting={ens.boosting!r}, "
                     f"ensemble.fusion={ens.fusion!r})")
  if ens.method == 'e3':
    _validate_e3(config)
  elif ens.e3_layers:
    raise ValueError(f"ensemble.e3_layers={ens.e3_layers} is read only by ensemble.method='e3' "
                     f'(ensemble.method={ens.method!r}); set it to 0')
  if ens.method == 'boosting' and ens.size > 1:
    stage_steps = config.train.num_steps // ens.size
    if config.train.num_steps % ens.size or config.optim.warmup_steps >= stage_steps:
      raise ValueError(
          f'ensemble.method=boosting trains members one after another in train.num_steps / '
          f'ensemble.size steps each: train.num_steps={config.train.num_steps} must be a multiple '
          f'of {ens.size} and optim.warmup_steps={config.optim.warmup_steps} below {stage_steps}')


def _validate_e3(config: ml_collections.ConfigDict) -> None:
  ens, moe = config.ensemble, config.model.moe
  if config.model.ffn != 'moe':
    raise ValueError(f"ensemble.method='e3' splits the experts of MoE layers; model.ffn="
                     f"{config.model.ffn!r} has none (use 'moe')")
  try:
    model_lib.e3_layer_indices(config.model, ens.e3_layers)
  except ValueError as e:
    raise ValueError(f'ensemble.{e}') from None
  if moe.num_experts % ens.size:
    raise ValueError(f'model.moe.num_experts={moe.num_experts} is not divisible by ensemble.size='
                     f"{ens.size}: ensemble.method='e3' splits the experts into ensemble.size "
                     'disjoint groups')
  if moe.top_k > moe.num_experts // ens.size:
    raise ValueError(f'model.moe.top_k={moe.top_k} exceeds the {moe.num_experts // ens.size} '
                     f'experts of each E3 group (model.moe.num_experts={moe.num_experts} / '
                     f'ensemble.size={ens.size})')
  if moe.router not in routing.TOKEN_CHOICE_ROUTERS:
    raise ValueError(f"model.moe.router={moe.router!r} with ensemble.method='e3': each copy's "
                     "tokens choose within their expert group, which needs a token-choice "
                     f'router, one of {routing.TOKEN_CHOICE_ROUTERS}')
  if moe.top_groups < moe.num_expert_groups:
    raise ValueError(f'model.moe.top_groups={moe.top_groups} < model.moe.num_expert_groups='
                     f"{moe.num_expert_groups} with ensemble.method='e3': group-limited routing "
                     "could leave a copy none of its own group's experts")
  if config.mesh.member != 1:
    raise ValueError(f"mesh.member={config.mesh.member} with ensemble.method='e3': the copies "
                     'share one parameter tree and travel in the batch (mesh.data shards them); '
                     'use mesh.member=1')


def is_e3(config: ml_collections.ConfigDict) -> bool:
  """Whether config's model is an E3 (an 'e3' ensemble of M > 1; M = 1 is the plain model)."""
  return config.ensemble.method == 'e3' and config.ensemble.size > 1


# ---------------------------------------------------------------------------------------------
# The member axis.


def _member_spmd_axes() -> tuple[str, ...] | None:
  """Mesh axes of the logical 'member' axis under the active logical rules, for `spmd_axis_name`.

  Without it, sharding constraints inside the vmapped model would leave the member dimension
  unconstrained-as-replicated and gather the members onto every device.
  """
  rules = nn.get_logical_axis_rules()
  axes = sharding.mesh_axes_for('member', rules) if rules else ()
  return axes or None


class Ensemble(nn.Module):
  """M TransformerLMs on a leading member axis.

  tokens [M, B, S] (one batch per member) or [B, S] (shared) -> (logits [M, B, S, V] float32,
  aux: each TransformerLM aux value with a leading M). Parameters live under 'members' with the
  single model's names and a leading M; `member_params(params, m)` gives member m's tree.
  Each member's final hidden state [M, B, S, D] is sown into 'intermediates' (for gating).
  """
  config: ml_collections.FrozenConfigDict  # the `model` section
  size: int
  expert_quantization: str = ''  # see TransformerLM
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, train=False, decode=False):
    if tokens.ndim not in (2, 3) or (tokens.ndim == 3 and tokens.shape[0] != self.size):
      raise ValueError(f'Ensemble of {self.size} members: tokens must be [M={self.size}, B, S] or '
                       f'[B, S], got shape {tokens.shape}')
    members = nn.vmap(
        model_lib.TransformerLM,
        variable_axes={'params': 0, 'router_state': 0, 'cache': 0, 'intermediates': 0},
        split_rngs={'params': True, 'router': True},
        in_axes=(0 if tokens.ndim == 3 else None, None, None), axis_size=self.size,
        metadata_params={nn.PARTITION_NAME: 'member'}, spmd_axis_name=_member_spmd_axes())
    with expert_parallel.global_view_dispatch():
      return members(self.config, expert_quantization=self.expert_quantization, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='members')(tokens, train, decode)


class E3(nn.Module):
  """An efficient ensemble of experts (Allingham et al. 2022): a TransformerLM whose last `layers`
  MoE layers split their E experts into `size` = M groups, copy m routing within group m.

  tokens [B, S] (every copy reads them) -> (logits [M, B, S, V] float32, aux: each TransformerLM
  aux value with a leading M). The copies share one routing per E3 layer, whose aux values are
  means over the copies, so each copy carries the same ones. Parameters are the single model's
  tree, no member axis: a plain MoE's parameters load as they are (`train.init_from`), and M = 1
  is exactly the plain model. The final hidden state is sown as [M·B, S, D] (`final_hidden`).
  """
  config: ml_collections.FrozenConfigDict  # the `model` section
  size: int
  layers: int
  expert_quantization: str = ''  # see TransformerLM
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.model = model_lib.TransformerLM(self.config, self.expert_quantization,
                                         e3_copies=self.size, e3_layers=self.layers,
                                         dtype=self.dtype, param_dtype=self.param_dtype)
    # One scope with the model: its parameters, cache and intermediates keep the plain names.
    nn.share_scope(self, self.model)

  def __call__(self, tokens, train=False, decode=False):
    if tokens.ndim != 2:
      raise ValueError(f'E3 of {self.size} copies: tokens must be [B, S] (the copies share the '
                       f'batch), got shape {tokens.shape}')
    logits, aux = self.model(tokens, train, decode)
    logits = logits.reshape((self.size, -1) + logits.shape[1:])
    aux = jax.tree.map(lambda value: jnp.broadcast_to(value, (self.size,) + value.shape), aux)
    return logits, aux


def build_model(config: ml_collections.ConfigDict, policy, expert_quantization: str = ''
                ) -> nn.Module:
  """The model of an experiment config: a TransformerLM, or when ensemble.size > 1 an Ensemble
  (an E3 for ensemble.method='e3'); expert_quantization: see model.build_model."""
  model = model_lib.build_model(config.model, policy, expert_quantization)
  if config.ensemble.size == 1:
    return model
  members = dict(expert_quantization=expert_quantization, dtype=model.dtype,
                 param_dtype=model.param_dtype)
  if is_e3(config):
    return E3(model.config, config.ensemble.size, config.ensemble.e3_layers, **members)
  return Ensemble(model.config, config.ensemble.size, **members)


def is_ensemble(model: nn.Module) -> bool:
  """Whether `model` returns M members' outputs (an Ensemble or an E3)."""
  return isinstance(model, (Ensemble, E3))


def has_member_axis(model: nn.Module) -> bool:
  """Whether `model`'s parameters carry a leading member axis (an Ensemble; E3's copies share
  one tree)."""
  return isinstance(model, Ensemble)


def final_hidden(model: nn.Module, intermediates: PyTree) -> jax.Array:
  """The members' final hidden states [M, B, S, D] (M = 1 for a TransformerLM) that `model`
  sowed into the 'intermediates' it returned."""
  if has_member_axis(model):
    hidden, = intermediates['members']['final_hidden']
    return hidden
  hidden, = intermediates['final_hidden']
  members = model.size if isinstance(model, E3) else 1
  return hidden.reshape((members, -1) + hidden.shape[1:])


def member_params(tree: PyTree, member: int) -> PyTree:
  """Member `member`'s slice of an Ensemble variable collection (unboxed), as a single model's."""
  return jax.tree.map(lambda x: x[member], tree['members'])


def stack_members(trees: list[PyTree]) -> PyTree:
  """Single models' variable collections -> an Ensemble's (leading member axis under 'members')."""
  return {'members': jax.tree.map(lambda *xs: jnp.stack(xs), *trees)}


# ---------------------------------------------------------------------------------------------
# Fusion rules. lp: member log-probabilities [M, ..., V] float32.


def log_probs(logits: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def linear_pool(lp: jax.Array, log_weights: jax.Array) -> jax.Array:
  """log Σ_m w_m p_m for log_weights [M] or [M, ...] (broadcast against lp [M, ..., V])."""
  log_weights = log_weights.reshape(log_weights.shape + (1,) * (lp.ndim - log_weights.ndim))
  return jax.nn.logsumexp(lp + log_weights, axis=0)


def mean_prob(lp: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(lp, axis=0) - math.log(lp.shape[0])


def mean_logprob(lp: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(jnp.mean(lp, axis=0), axis=-1)


def sum_logits(lp: jax.Array) -> jax.Array:
  # Σ_m logits_m and Σ_m lp_m differ by a per-position constant, which the softmax removes.
  return jax.nn.log_softmax(jnp.sum(lp, axis=0), axis=-1)


def normalized_log_weights(weights) -> jax.Array:
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.log(weights / jnp.sum(weights))


class Gate(nn.Module):
  """Per-token member weights from the members' final hidden states.

  hidden [M, ..., D] -> log-weights [M, ...]. A linear map of the concatenated states, initialised
  at zero so that an unfitted gate is the plain linear pool.
  """
  @nn.compact
  def __call__(self, hidden):
    members = hidden.shape[0]
    features = jnp.moveaxis(hidden.astype(jnp.float32), 0, -2)  # [..., M, D]
    features = features.reshape(features.shape[:-2] + (-1,))  # [..., M·D]
    gate_logits = nn.Dense(members, kernel_init=nn.initializers.zeros)(features)  # [..., M]
    return jnp.moveaxis(jax.nn.log_softmax(gate_logits, axis=-1), -1, 0)


def fuse(lp: jax.Array, fusion: str, weights=(), fusion_params: PyTree = None,
         hidden: jax.Array | None = None) -> jax.Array:
  """Fused log-probabilities [..., V] of member log-probabilities lp [M, ..., V].

  weights: `ensemble.weights` for 'weighted'. fusion_params: from `fit_fusion` for 'stacked' and
  'gated'. hidden: the members' final hidden states [M, ..., D], for 'gated'.
  """
  if fusion == 'mean_prob':
    return mean_prob(lp)
  if fusion == 'mean_logprob':
    return mean_logprob(lp)
  if fusion == 'sum_logits':
    return sum_logits(lp)
  if fusion == 'weighted':
    return linear_pool(lp, normalized_log_weights(weights))
  if fusion in FITTED_FUSIONS and fusion_params is None:
    raise ValueError(f'fusion {fusion!r} needs fusion_params (see ensemble.fit_fusion)')
  if fusion == 'stacked':
    return linear_pool(lp, jax.nn.log_softmax(fusion_params['logits']))
  if fusion == 'gated':
    if hidden is None:
      raise ValueError("fusion 'gated' needs the members' final hidden states")
    return linear_pool(lp, Gate().apply({'params': fusion_params}, hidden))
  raise ValueError(f'fusion={fusion!r}; expected one of {FUSIONS}')


def fusion_log_weights(fusion: str, fusion_params: PyTree, hidden: jax.Array | None):
  """log member weights [M] (stacked) or [M, ...] (gated) of a fitted fusion."""
  if fusion == 'stacked':
    return jax.nn.log_softmax(fusion_params['logits'])
  return Gate().apply({'params': fusion_params}, hidden)


def fit_fusion(fusion: str, target_lp: jax.Array, hidden: jax.Array | None, *, steps: int,
               learning_rate: float) -> PyTree:
  """Fits 'stacked' or 'gated' weights by minimising the fused NLL with Adam (optax).

  target_lp: [M, T] each member's log-probability of the target token at T held-out training
  positions (members frozen); hidden: [M, T, D] their final hidden states ('gated' only). Full
  batch, deterministic, from the uniform pool (zero logits / zero gate). Returns fusion_params.
  """
  members = target_lp.shape[0]
  if fusion == 'stacked':
    params = {'logits': jnp.zeros((members,), jnp.float32)}
  elif fusion == 'gated':
    params = Gate().init(jax.random.key(0), hidden[:, :1])['params']
  else:
    raise ValueError(f'fit_fusion: fusion={fusion!r}; only {FITTED_FUSIONS} are fitted')

  def nll(params):
    log_weights = fusion_log_weights(fusion, params, hidden)
    log_weights = jnp.broadcast_to(log_weights.reshape(members, -1), target_lp.shape)
    return -jnp.mean(jax.nn.logsumexp(target_lp + log_weights, axis=0))

  tx = optax.adam(learning_rate)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(nll)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  return fit(params)


MembersFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def members_fn(model: nn.Module, variables: PyTree) -> MembersFn:
  """A jitted tokens [B, S] -> (member log-probs [M, B, S, V], final hidden [M, B, S, D]) of a
  TransformerLM (M = 1) or an Ensemble and its variables (params, router_state)."""
  @jax.jit
  def apply(tokens):
    (logits, _), state = model.apply(variables, tokens, mutable=['intermediates'])
    lp = log_probs(logits)
    return (lp if is_ensemble(model) else lp[None]), final_hidden(model, state['intermediates'])
  return apply


def concat_members(fns: list[MembersFn]) -> MembersFn:
  """Several members functions (e.g. one per workdir) as one, members in the order given."""
  def apply(tokens):
    outputs = [fn(tokens) for fn in fns]
    return tuple(jnp.concatenate(parts) for parts in zip(*outputs))
  return apply


def fit_on_selection(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                     members: MembersFn) -> PyTree | None:
  """fusion_params of `config.ensemble.fusion` ('stacked'/'gated'; None for the others), fitted
  on `ensemble.fit_batches` batches of `ds`'s selection split; nothing else of `ds` is read."""
  ens = config.ensemble
  if ens.fusion not in FITTED_FUSIONS:
    return None
  target_lp, hidden = [], []
  for batch in ds.selection_batches(ens.fit_batches):
    lp, h = members(jnp.asarray(batch[:, :-1]))
    target = jnp.take_along_axis(lp, jnp.asarray(batch[None, :, 1:, None]), axis=-1)[..., 0]
    target_lp.append(target.reshape(lp.shape[0], -1))
    hidden.append(h.reshape(h.shape[0], -1, h.shape[-1]))
  return fit_fusion(ens.fusion, jnp.concatenate(target_lp, axis=1),
                    jnp.concatenate(hidden, axis=1) if ens.fusion == 'gated' else None,
                    steps=ens.fit_steps, learning_rate=ens.fit_learning_rate)


# ---------------------------------------------------------------------------------------------
# Scores: per member and fused, accumulated as sums over batches.


def _calibration_sums(lp: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """lp [..., V], targets [...] -> per-bin counts, confidence sums, correct sums [K] and totals."""
  confidence = jnp.exp(jnp.max(lp, axis=-1)).reshape(-1)
  correct = (jnp.argmax(lp, axis=-1) == targets).reshape(-1).astype(jnp.float32)
  bins = jnp.clip((confidence * CALIBRATION_BINS).astype(jnp.int32), 0, CALIBRATION_BINS - 1)
  one_hot = jax.nn.one_hot(bins, CALIBRATION_BINS, dtype=jnp.float32)  # [T, K]
  target_lp = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
  return dict(nll=-jnp.sum(target_lp), correct=jnp.sum(correct), count=jnp.float32(correct.size),
              bin_count=one_hot.sum(0), bin_confidence=confidence @ one_hot,
              bin_correct=correct @ one_hot)


def _entropy(lp: jax.Array) -> jax.Array:
  return -jnp.sum(jnp.exp(lp) * lp, axis=-1)


def batch_sums(lp: jax.Array, fused: jax.Array, targets: jax.Array) -> dict[str, Any]:
  """Sums of one batch: member lp [M, B, S, V], fused [B, S, V], targets [B, S].

  members: calibration sums with a leading M; fused: the same for the fused distribution;
  disagreement: Σ over positions of the share of members whose top-1 differs from the fused
  top-1; mutual_information: Σ over positions of H(linear pool) - mean_m H(p_m), the epistemic
  part of the uncertainty (always of the uniform linear pool, whatever the fusion, so that it is
  the mutual information between the prediction and the member index and never negative).
  """
  members = jax.vmap(_calibration_sums, in_axes=(0, None))(lp, targets)
  fused_top1 = jnp.argmax(fused, axis=-1)
  disagreement = jnp.mean((jnp.argmax(lp, axis=-1) != fused_top1).astype(jnp.float32), axis=0)
  information = _entropy(mean_prob(lp)) - jnp.mean(_entropy(lp), axis=0)
  return dict(members=members, fused=_calibration_sums(fused, targets),
              disagreement=jnp.sum(disagreement), mutual_information=jnp.sum(information))


def add_sums(a: PyTree | None, b: PyTree) -> PyTree:
  """Accumulates `batch_sums` (host numpy, float64) over batches."""
  b = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(b))
  return b if a is None else jax.tree.map(np.add, a, b)


def expected_calibration_error(sums: dict) -> float:
  """Σ_bins (n_b / N) |accuracy_b - confidence_b| over 15 equal-width bins of the top-1 prob
  (Naeini et al. 2015; Guo et al. 2017)."""
  count = np.asarray(sums['bin_count'])
  gap = np.abs(np.asarray(sums['bin_correct']) - np.asarray(sums['bin_confidence']))
  return float(gap.sum() / max(count.sum(), 1.0))


def scores(sums: dict, bytes_per_token: float) -> dict[str, float]:
  """eval_loss, eval_bits_per_byte, eval_perplexity, accuracy, ece of one distribution's sums."""
  eval_loss = float(sums['nll'] / sums['count'])
  return dict(eval_loss=eval_loss, eval_bits_per_byte=eval_loss / math.log(2) / bytes_per_token,
              eval_perplexity=math.exp(min(eval_loss, 700.0)),
              accuracy=float(sums['correct'] / sums['count']),
              ece=expected_calibration_error(sums))


def ensemble_scores(sums: dict, bytes_per_token: float, fusion: str) -> dict[str, Any]:
  """The ensemble JSON of DESIGN.md: members, fused (with fusion), disagreement, mutual_info."""
  num_members = len(np.asarray(sums['members']['nll']))
  members = [scores(jax.tree.map(lambda x, m=m: x[m], sums['members']), bytes_per_token)
             for m in range(num_members)]
  count = float(sums['fused']['count'])
  return dict(members=members, fused={**scores(sums['fused'], bytes_per_token), 'fusion': fusion},
              disagreement=float(sums['disagreement'] / count),
              mutual_information=float(sums['mutual_information'] / count))


def reliability_bins(sums: dict) -> dict[str, np.ndarray]:
  """Per-bin mean confidence, accuracy and count (NaN where a bin is empty) of one distribution."""
  count = np.asarray(sums['bin_count'])
  with np.errstate(invalid='ignore', divide='ignore'):
    return dict(confidence=np.asarray(sums['bin_confidence']) / count,
                accuracy=np.asarray(sums['bin_correct']) / count, count=count)


# ---------------------------------------------------------------------------------------------
# Member data: one batch per member, pure functions of (seed, member, step).


def documents(tokens: np.ndarray) -> list[np.ndarray]:
  """A token stream -> its documents, each with its trailing EOD (a tail without EOD is one)."""
  ends = np.flatnonzero(np.asarray(tokens) == data_lib.EOD_ID) + 1
  return [d for d in np.split(np.asarray(tokens), ends) if len(d)]


def bootstrap_stream(train_tokens: np.ndarray, seed: int, member: int) -> np.ndarray:
  """Member `member`'s bootstrap resample (Breiman 1996): as many documents as the stream holds,
  drawn with replacement by `np.random.default_rng([seed, member, tag])`, joined in draw order."""
  docs = documents(train_tokens)
  draws = np.random.default_rng([seed, member, _BAG_STREAM]).integers(0, len(docs), len(docs))
  return np.concatenate([docs[i] for i in draws])


@dataclasses.dataclass(frozen=True)
class EnsembleData:
  """Per-member training streams over a Dataset, with the Dataset's eval batches.

  `train_batch(step, ...)` is int32 [M, B / process_count, S+1]: member m's rows are windows at
  offsets drawn by `np.random.default_rng([seed, m, step])` from its own stream (the Dataset's
  training split, which leaves out the selection split; for bagging, the member's bootstrap
  resample of it). Resuming needs no data state.
  Boosting by reweighting replaces member m's stream when its stage starts (`start_stage`), by
  a resample drawn from the frozen earlier members' losses: again a pure function of the run.
  Additive boosting (`shared_windows`) gives every member the windows of member 0: member m fits the
  residual of the earlier members' summed logits, which only means something on the same tokens.
  """
  dataset: data_lib.Dataset
  streams: list[np.ndarray]
  stage_steps: int = 0  # > 0: boosting by reweighting, member m's stage starts at m·stage_steps
  shared_windows: bool = False
  reweighted: set[int] = dataclasses.field(default_factory=set)

  @property
  def bytes_per_token(self) -> float:
    return self.dataset.bytes_per_token

  def eval_batches(self, num_batches, process_index=0, process_count=1):
    return self.dataset.eval_batches(num_batches, process_index, process_count)

  def train_batch(self, step, process_index=0, process_count=1):
    if step < 0:
      raise ValueError(f'train_batch: step must be >= 0, got {step}')
    ds = self.dataset
    local = ds.batch_size // process_count
    lo = process_index * local
    rows = []
    for member, stream in enumerate(self.streams):
      rng = np.random.default_rng([ds.seed, 0 if self.shared_windows else member, step])
      starts = rng.integers(0, len(stream) - ds.seq_len, size=ds.batch_size)[lo:lo + local]
      rows.append(_windows(stream, starts, ds.seq_len))
    return np.stack(rows)

  def start_stage(self, step: int, members: Callable[[], MembersFn]) -> None:
    """Before training `step` under boosting by reweighting: draws the stream of the member whose
    stage holds `step` (once), with document probabilities proportional to the fused (linear
    pool) NLL of the members before it on each document's first window. members() gives the
    current state's `members_fn` (earlier members are final); it is only called when needed."""
    if not self.stage_steps:
      return
    member = min(step // self.stage_steps, len(self.streams) - 1)
    if member == 0 or member in self.reweighted:
      return
    ds = self.dataset
    docs = documents(self.streams[0])
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    starts = np.minimum(starts, len(self.streams[0]) - ds.seq_len - 1)
    losses, members = [], members()
    for lo in range(0, len(docs), ds.eval_batch_size):
      windows = _windows(self.streams[0], starts[lo:lo + ds.eval_batch_size], ds.seq_len)
      lp, _ = members(jnp.asarray(windows[:, :-1]))
      fused = mean_prob(lp[:member])
      target = jnp.take_along_axis(fused, jnp.asarray(windows[:, 1:, None]), axis=-1)
      losses.append(np.asarray(-jnp.mean(target[..., 0], axis=-1), np.float64))
    weights = np.concatenate(losses)
    draws = np.random.default_rng([ds.seed, member, _REWEIGHT_STREAM]).choice(
        len(docs), len(docs), p=weights / weights.sum())
    self.streams[member] = np.concatenate([docs[i] for i in draws])
    self.reweighted.add(member)


def _windows(tokens, starts, seq_len):
  index = np.asarray(starts, np.int64)[:, None] + np.arange(seq_len + 1)
  return np.asarray(tokens[index], dtype=np.int32)


def make_data(config: ml_collections.ConfigDict, ds: data_lib.Dataset
              ) -> EnsembleData | data_lib.Dataset:
  """The member streams of `config.ensemble` over the Dataset `ds` of `config.data`; for E3,
  whose copies read one batch, `ds` itself."""
  ens = config.ensemble
  if is_e3(config):
    return ds
  if ens.method == 'bagging':
    streams = [bootstrap_stream(ds.train_tokens, config.seed, m) for m in range(ens.size)]
  else:
    streams = [ds.train_tokens] * ens.size
  for member, stream in enumerate(streams):
    if len(stream) < ds.seq_len + 1:
      raise ValueError(f'member {member} trains on {len(stream)} tokens, fewer than a window of '
                       f'data.seq_len+1={ds.seq_len + 1}')
  reweight = ens.method == 'boosting' and ens.boosting == 'reweight'
  return EnsembleData(ds, list(streams),
                      stage_steps=steps_per_member(config) if reweight else 0,
                      shared_windows=is_additive(config))


# ---------------------------------------------------------------------------------------------
# Training: the ensemble objective and a per-member optimizer.


def member_losses(logits: jax.Array, targets: jax.Array, additive: bool = False) -> jax.Array:
  """Per-member mean cross-entropy [M] of logits [M, B, S, V] on targets [M, B, S].

  additive (additive boosting): member m's loss is that of Σ_{j<m} stop_gradient(logits_j) + logits_m:
  earlier members are fixed, and m fits the negative gradient of the log loss of their sum.
  """
  logits = logits.astype(jnp.float32)
  if additive:
    frozen = jax.lax.stop_gradient(logits)
    logits = jnp.cumsum(frozen, axis=0) - frozen + logits
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.mean(ce, axis=(1, 2))


def is_additive(config: ml_collections.ConfigDict) -> bool:
  return config.ensemble.method == 'boosting' and config.ensemble.boosting == 'additive'


def train_objective(config: ml_collections.ConfigDict):
  """The moejax.objective of an ensemble train step: output (logits [M, B, S, V], aux with a
  leading M) and batch [M, B, S+1] -> (Σ_m (CE_m + aux_loss_m), metrics). The sum gives each member
  exactly the gradient it would get trained alone. E3's copies share their parameters and read
  one batch [B, S+1]: their loss is the mean over copies, a single model's loss on the M copies.
  metrics: `loss` the mean member CE, `member_loss` [M], and the aux metrics averaged over
  members."""
  additive = is_additive(config)
  over_members = jnp.mean if is_e3(config) else jnp.sum

  def objective(output, batch):
    logits, aux = output
    targets = jnp.broadcast_to(batch[..., 1:], logits.shape[:-1])
    losses = member_losses(logits, targets, additive)
    loss = over_members(losses) + over_members(aux['aux_loss'])
    metrics = {key: jnp.mean(value, axis=0) for key, value in aux.items()}
    return loss, dict(metrics, loss=jnp.mean(losses), member_loss=losses)
  return objective


def eval_objective(config: ml_collections.ConfigDict):
  """The moejax.objective of an ensemble eval step on a shared batch [B, S+1]: `loss` is the fused
  NLL (the configured fusion; 'stacked' and 'gated', fitted only after training, report the
  linear pool here), `member_loss` [M] each member's."""
  fusion = config.ensemble.fusion
  fusion = 'mean_prob' if fusion in FITTED_FUSIONS else fusion
  weights = tuple(config.ensemble.weights)
  def objective(output, batch):
    lp = log_probs(output[0])
    targets = batch[..., 1:]
    nll = lambda x: -jnp.mean(jnp.take_along_axis(x, targets[..., None], axis=-1))
    loss = nll(fuse(lp, fusion, weights))
    return loss, dict(loss=loss, member_loss=jax.vmap(nll)(lp))
  return objective


def per_member(tx: optax.GradientTransformation, size: int,
               active: Callable[[jax.Array], jax.Array] | None = None
               ) -> optax.GradientTransformation:
  """`tx` applied to each member on its own (vmapped over the leading member axis): gradient
  clipping, moments, weight-decay masks and schedules are per member, as in a single run.

  active: step -> bool [M], the members that this update may change (boosting: the member of the
  current stage); the others get zero updates and keep their optimizer state.
  """
  def init(params):
    return dict(count=jnp.zeros([], jnp.int32), members=jax.vmap(tx.init)(params))

  def update(updates, state, params=None):
    new_updates, new_members = jax.vmap(tx.update)(updates, state['members'], params)
    if active is not None:
      mask = active(state['count'])
      def select(new, old):
        return jnp.where(mask.reshape((size,) + (1,) * (new.ndim - 1)), new, old)
      new_updates = jax.tree.map(lambda u: select(u, jnp.zeros_like(u)), new_updates)
      new_members = jax.tree.map(select, new_members, state['members'])
    return new_updates, dict(count=state['count'] + 1, members=new_members)

  return optax.GradientTransformation(init, update)


def steps_per_member(config: ml_collections.ConfigDict) -> int:
  """Training steps each member's learning-rate schedule spans: all of them, or under boosting
  its own stage of train.num_steps / ensemble.size steps."""
  if config.ensemble.method == 'boosting':
    return config.train.num_steps // config.ensemble.size
  return config.train.num_steps


def optimizer(config: ml_collections.ConfigDict, tx: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  """A single model's `tx` for the ensemble of `config`: per member; under boosting only the
  member of the current stage (step // steps_per_member) moves; E3's shared tree takes tx."""
  size = config.ensemble.size
  if is_e3(config):  # one parameter tree
    return tx
  if config.ensemble.method != 'boosting':
    return per_member(tx, size)
  stage_steps = steps_per_member(config)
  def active(step):
    return jnp.arange(size) == jnp.minimum(step // stage_steps, size - 1)
  return per_member(tx, size, active)


def schedule_count(opt_state) -> jax.Array:
  """The count a per-member optimizer's schedules read: [M], one per member."""
  return opt_state['members'][-1].count


def train_batch_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """[M, B, S+1] (or [B, S+1] for a single model or E3): what the train step receives."""
  shape = (config.data.batch_size, config.data.seq_len + 1)
  return shape if config.ensemble.size == 1 or is_e3(config) else (config.ensemble.size,) + shape


# ---------------------------------------------------------------------------------------------
# Cost: what E3 saves against a deep ensemble.


def flops_per_token(config: ml_collections.ConfigDict) -> int:
  """Training FLOPs of one token through all M members of config's model (model.flops_per_token):
  M times a single model's for an Ensemble; for E3 the layers before the tiling count once."""
  ens, seq_len = config.ensemble, config.data.seq_len
  if is_e3(config):
    return model_lib.flops_per_token(config.model, seq_len, ens.size, ens.e3_layers)
  return ens.size * model_lib.flops_per_token(config.model, seq_len)


def state_accounting(config: ml_collections.ConfigDict, params: PyTree, opt_state: PyTree
                     ) -> dict[str, int]:
  """memory.state_accounting of config's model plus `flops_per_token` (all members). Its
  num_active_params counts each E3 layer's M·top_k experts: one token's M copies use disjoint
  expert groups."""
  accounting = memory.state_accounting(params, opt_state, config.model)
  if is_e3(config):
    ens, moe = config.ensemble, config.model.moe
    for layer in model_lib.e3_layer_indices(config.model, ens.e3_layers):
      routed = memory.tree_size(params[f'layer_{layer}']['ffn'][memory.EXPERTS_MODULE])
      accounting['num_active_params'] += (ens.size - 1) * routed * moe.top_k // moe.num_experts
  return dict(accounting, flops_per_token=flops_per_token(config))
