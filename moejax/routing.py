"""Routers: score tokens against experts and pick token slots; auxiliary losses and metrics.

Shapes: T tokens (B*S flattened), D d_model, E experts, K slots per token (top_k; E for expert
choice), G token groups of S tokens (expert choice), C tokens per expert per group (expert choice),
N expert groups (group-limited routing) of E / N experts, M top_groups.

Every router is a Linen module `router(x [T, D], train) -> Routing` whose kernel [D, E] is the
param 'kernel'. Routing runs in float32 whatever the policy (ST-MoE selective precision): x is cast
to float32 before the matmul, and the softmax, top-k and losses stay in float32. A router's `dtype`
(`model.moe.router_dtype`) moves its matmul and softmax to bf16 instead, only to measure what that
costs; the losses and metrics stay in float32.

A `Routing` describes K slots per token: `expert_index[t, j]` is the expert of slot j of token t,
or -1 when the slot is empty (expert choice leaves most slots empty), and `combine_weight[t, j]`
its gate (0 for empty slots). Every dispatch treats -1 as "no slot": it takes no capacity and no
compute. `priority[t]` is token t's highest router probability, the key by which the capacity
dispatch ranks tokens under capacity_priority='score' (V-MoE's batch-priority score).

Token-choice routers take an optional `expert_mask` [T, E] bool, the experts each token may use:
the others' logits are -inf before the softmax, so the gates are the softmax over the allowed
experts alone and no slot ever reaches another. E3's block-diagonal router (`copy_expert_mask`)
is made of it.
"""
import dataclasses
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


Initializer = Callable[..., jax.Array]
default_router_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


@flax.struct.dataclass
class Routing:
  """expert_index [T, K] int32 (-1 = empty slot), combine_weight [T, K] float32, metrics dict,
  priority [T] float32 (None where no router made it, e.g. hand-made routings)."""
  expert_index: jax.Array
  combine_weight: jax.Array
  metrics: dict[str, jax.Array]
  priority: jax.Array | None = None


# ----------------------------------------------------------------------------- aux losses


def expert_fraction(expert_index: jax.Array, num_experts: int) -> jax.Array:
  """[T, K] -> [E] float32: share of the filled slots sent to each expert (sums to 1)."""
  counts = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=(0, 1))
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def load_balance_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch Transformer (Fedus et al. 2021) eq. 4: E · Σ_e f_e · P_e; 1.0 when balanced.

  probs [T, E] router probabilities; expert_index [T, K]. f_e (slot share, no gradient) comes from
  `expert_fraction`, P_e is the mean router probability of e (carries the gradient).
  """
  num_experts = probs.shape[-1]
  f = jax.lax.stop_gradient(expert_fraction(expert_index, num_experts))
  p = jnp.mean(probs.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE (Zoph et al. 2022) eq. 5: mean over tokens of logsumexp(logits)²; logits [T, E]."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def router_entropy(probs: jax.Array) -> jax.Array:
  """Mean over tokens of the entropy (nats) of the router distribution; probs [T, E]."""
  return jnp.mean(jnp.sum(jax.scipy.special.entr(probs.astype(jnp.float32)), axis=-1))


def routing_metrics(logits: jax.Array, probs: jax.Array, expert_index: jax.Array
                    ) -> dict[str, jax.Array]:
  """The router's share of the MoE `aux` dict (dispatch adds `dropped_fraction`)."""
  return dict(
      load_balance_loss=load_balance_loss(probs, expert_index),
      router_z_loss=router_z_loss(logits),
      expert_fraction=expert_fraction(expert_index, probs.shape[-1]),
      router_entropy=router_entropy(probs),
  )


# ----------------------------------------------------------------------------- shared pieces


def _router_logits(module: nn.Module, x: jax.Array, num_experts: int, jitter_noise: float,
                   train: bool, param_dtype: Any, kernel_init: Initializer,
                   dtype: Any = jnp.float32) -> jax.Array:
  """Logits [T, E] in `dtype` (float32 by default) of x [T, D] against the module's 'kernel' [D, E].

  Jitter (Switch Transformer): in training, multiply the router input by U(1-eps, 1+eps) noise
  drawn from the 'router' rng stream, so routing does not lock onto tiny logit differences.
  """
  kernel = module.param('kernel', nn.with_logical_partitioning(kernel_init, ('embed', None)),
                        (x.shape[-1], num_experts), param_dtype)
  x = x.astype(jnp.float32)
  if train and jitter_noise > 0.0:
    x = x * jax.random.uniform(module.make_rng('router'), x.shape, jnp.float32,
                               1.0 - jitter_noise, 1.0 + jitter_noise)
  return jnp.einsum('td,de->te', x.astype(dtype), kernel.astype(dtype))


def check_expert_groups(num_experts: int, top_k: int, num_expert_groups: int,
                        top_groups: int) -> None:
  """Raises ValueError unless the experts split into num_expert_groups equal groups and top_k
  experts fit into top_groups of them."""
  if num_expert_groups < 1 or num_experts % num_expert_groups:
    raise ValueError(f'num_expert_groups={num_expert_groups}; must be >= 1 and divide '
                     f'num_experts={num_experts}')
  if not 1 <= top_groups <= num_expert_groups:
    raise ValueError(f'top_groups={top_groups}; allowed values: '
                     f'1..num_expert_groups={num_expert_groups}')
  if top_k > top_groups * (num_experts // num_expert_groups):
    raise ValueError(f'top_k={top_k} experts do not fit into top_groups={top_groups} groups of '
                     f'{num_experts // num_expert_groups} experts (num_experts={num_experts}, '
                     f'num_expert_groups={num_expert_groups})')


def group_limited_scores(scores: jax.Array, num_expert_groups: int, top_groups: int
                         ) -> jax.Array:
  """Group-limited routing (DeepSeek-V2 device-limited, DeepSeek-V3 node-limited): scores [T, E]
  with every expert outside the token's top_groups best groups set to -inf.

  The E experts form num_expert_groups groups of consecutive experts; a group's score is the sum
  of its two highest scores (DeepSeek-V3 eq. in sec. 2.1.2; the best one alone when a group has
  one expert). With the groups laid out one per device (or node), a token's slots reach at most
  top_groups devices. 1 group, or top_groups = num_expert_groups, leaves the scores unchanged.
  """
  num_tokens, num_experts = scores.shape
  if top_groups == num_expert_groups:
    return scores
  per_group = num_experts // num_expert_groups
  grouped = scores.reshape(num_tokens, num_expert_groups, per_group)  # [T, N, E/N]
  group_score = jnp.sum(jax.lax.top_k(grouped, min(2, per_group))[0], axis=-1)  # [T, N]
  best_groups = top_k_indices(group_score, top_groups)  # [T, M]
  keep = jnp.any(best_groups[:, :, None] == jnp.arange(num_expert_groups), axis=1)  # [T, N]
  return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(num_tokens, num_experts)


def copy_expert_mask(num_tokens: int, num_experts: int, copies: int) -> jax.Array:
  """E3's block-diagonal router (Allingham et al. 2022, sec. 4): [T, E] bool, True where token t
  may use expert e. The T tokens are `copies` equal consecutive blocks (the copies of one batch)
  and the E experts as many groups of consecutive experts; copy m may use group m only."""
  if num_tokens % copies or num_experts % copies:
    raise ValueError(f'E3 copies={copies} must divide the number of tokens T={num_tokens} and '
                     f'num_experts={num_experts}')
  token_copy = jnp.arange(num_tokens) // (num_tokens // copies)
  expert_group = jnp.arange(num_experts) // (num_experts // copies)
  return token_copy[:, None] == expert_group[None, :]


def top_k_indices(scores: jax.Array, k: int) -> jax.Array:
  """The indices of `jax.lax.top_k(scores, k)` over the last axis, int32, by k rounds of masked
  argmax: the same picks (ties to the lower index, NaN first, -inf last, k distinct).

  Elementwise ops and reductions stay split along the tokens, whereas XLA's TopK custom call is
  gathered whole onto every device (on 2 CPU devices, moe_tiny's routers cost 4 all-gathers and
  device rendezvous per step). k is a router's top_k, small, so the k passes over [T, E] are cheap.
  """
  taken = jnp.zeros(scores.shape, bool)
  positions = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  picks = []
  for _ in range(k):
    open_scores = jnp.where(taken, -jnp.inf, scores)
    best = jnp.max(open_scores, axis=-1, keepdims=True)
    is_best = ((open_scores == best) | jnp.isnan(open_scores)) & ~taken
    pick = jnp.argmax(is_best, axis=-1).astype(jnp.int32)
    picks.append(pick)
    taken |= positions == pick[..., None]
  return jnp.stack(picks, axis=-1)


def _restrict(scores: jax.Array, expert_mask: jax.Array | None) -> jax.Array:
  """scores [T, E] with the experts outside `expert_mask` at -inf (None: all allowed)."""
  return scores if expert_mask is None else jnp.where(expert_mask, scores, -jnp.inf)


def _top_k_routing(logits: jax.Array, probs: jax.Array, selection_scores: jax.Array, top_k: int,
                   normalize_top_k: bool, num_expert_groups: int = 1, top_groups: int = 1,
                   expert_mask: jax.Array | None = None) -> Routing:
  """Picks the top_k experts of each token by `selection_scores` [T, E], within its top_groups
  best expert groups (`group_limited_scores`) and its `expert_mask`; gates from `probs`."""
  check_expert_groups(probs.shape[-1], top_k, num_expert_groups, top_groups)
  # Masked again here: a bias (aux-free) lifts the masked experts' zero probabilities.
  selection_scores = _restrict(selection_scores, expert_mask)
  selection_scores = group_limited_scores(selection_scores, num_expert_groups, top_groups)
  expert_index = top_k_indices(selection_scores, top_k)
  gate = jnp.take_along_axis(probs, expert_index, axis=-1)
  if normalize_top_k:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  expert_index = expert_index.astype(jnp.int32)
  return Routing(expert_index=expert_index, combine_weight=gate.astype(jnp.float32),
                 metrics=routing_metrics(logits, probs, expert_index),
                 priority=jnp.max(probs, axis=-1).astype(jnp.float32))


# ----------------------------------------------------------------------------- routers


class TopKRouter(nn.Module):
  """Token choice: softmax over experts, keep the top_k, optionally renormalise their gates.

  Switch Transformer (Fedus et al. 2021) for top_k=1, GShard (Lepikhin et al. 2020) / Mixtral for
  top_k=2. With top_k=1 and normalize_top_k the gate is always 1, so the router learns only from
  the aux loss; Switch uses normalize_top_k=False. num_expert_groups > 1 with top_groups <
  num_expert_groups limits each token to its top_groups best groups (`group_limited_scores`).
  """
  num_experts: int
  top_k: int
  normalize_top_k: bool = True
  jitter_noise: float = 0.0
  num_expert_groups: int = 1
  top_groups: int = 1
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  kernel_init: Initializer = default_router_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               expert_mask: jax.Array | None = None) -> Routing:
    """x [T, D], expert_mask [T, E] bool or None -> Routing with K = top_k."""
    logits = _router_logits(self, x, self.num_experts, self.jitter_noise, train,
                            self.param_dtype, self.kernel_init, self.dtype)
    logits = _restrict(logits, expert_mask)
    probs = jax.nn.softmax(logits, axis=-1)
    return _top_k_routing(logits, probs, probs, self.top_k, self.normalize_top_k,
                          self.num_expert_groups, self.top_groups, expert_mask)


class NoisyTopKRouter(TopKRouter):
  """Noisy top-k gating (Shazeer et al. 2017): logits + N(0, 1) · softplus(x @ noise_kernel).

  The noise (rng stream 'router') is added only when train=True; at eval this is TopKRouter.
  The noise kernel starts at zero, as in the paper, i.e. with noise std softplus(0) ≈ 0.69.
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               expert_mask: jax.Array | None = None) -> Routing:
    """x [T, D], expert_mask [T, E] bool or None -> Routing with K = top_k."""
    logits = _router_logits(self, x, self.num_experts, self.jitter_noise, train,
                            self.param_dtype, self.kernel_init, self.dtype)
    noise_kernel = self.param(
        'noise_kernel', nn.with_logical_partitioning(nn.initializers.zeros, ('embed', None)),
        (x.shape[-1], self.num_experts), self.param_dtype)
    if train:
      noise_std = jax.nn.softplus(
          jnp.einsum('td,de->te', x.astype(jnp.float32), noise_kernel.astype(jnp.float32)))
      logits = logits + noise_std * jax.random.normal(self.make_rng('router'), logits.shape)
    logits = _restrict(logits, expert_mask)
    probs = jax.nn.softmax(logits, axis=-1)
    return _top_k_routing(logits, probs, probs, self.top_k, self.normalize_top_k,
                          self.num_expert_groups, self.top_groups, expert_mask)


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int,
                           capacity_factor: float) -> int:
  """Tokens per expert per group of num_tokens: ceil(capacity_factor · k · T / E), at least 1 and
  at most T; also the capacity dispatch's slots per expert per group (`dispatch.group_capacity`),
  so that the dispatch keeps every token expert choice picked."""
  return min(num_tokens, max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts)))


class ExpertChoiceRouter(nn.Module):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by router probability.

  Tokens are split into G groups of `group_size` consecutive tokens (0 = one group of all T
  tokens); in each group every expert takes C = ceil(capacity_factor · top_k · S / E) tokens,
  capped at S. Choosing per group, as V-MoE and flaxformer do, matches the capacity dispatch's
  groups (MoE passes the same group_size to both), so that dispatch never drops a chosen token.
  A token's routing depends on the other tokens of its group, later positions included (fine for
  encoders and for study, leaky for autoregressive decoding). The Routing has K = E slots per
  token: slot e holds expert e when e chose the token (gate = its probability, unnormalised), else
  -1 and gate 0. Every expert gets exactly C tokens per group; a token may get none or up to E.
  """
  num_experts: int
  top_k: int
  capacity_factor: float = 1.0
  group_size: int = 0
  jitter_noise: float = 0.0
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  kernel_init: Initializer = default_router_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               expert_mask: jax.Array | None = None) -> Routing:
    """x [T, D] -> Routing with K = E. An expert_mask is refused: experts pick the tokens here."""
    if expert_mask is not None:
      raise ValueError("router='expert_choice' takes no expert_mask (E3's block-diagonal "
                       'routing): its experts choose tokens; use a token-choice router')
    num_tokens = x.shape[0]
    group_size = self.group_size or num_tokens
    if group_size < 0 or num_tokens % group_size:
      raise ValueError(f'group_size={self.group_size} must be 0 (one group) or a positive divisor '
                       f'of the number of tokens T={num_tokens} (batch * seq)')
    logits = _router_logits(self, x, self.num_experts, self.jitter_noise, train,
                            self.param_dtype, self.kernel_init, self.dtype)
    probs = jax.nn.softmax(logits, axis=-1)
    num_groups = num_tokens // group_size
    capacity = expert_choice_capacity(group_size, self.num_experts, self.top_k,
                                      self.capacity_factor)
    grouped_probs = probs.reshape(num_groups, group_size, self.num_experts)
    _, token_index = jax.lax.top_k(grouped_probs.transpose(0, 2, 1), capacity)  # [G, E, C]
    experts = jnp.arange(self.num_experts, dtype=jnp.int32)
    chosen = jnp.zeros((num_groups, self.num_experts, group_size), bool).at[
        jnp.arange(num_groups)[:, None, None], experts[None, :, None], token_index].set(True)
    chosen = chosen.transpose(0, 2, 1).reshape(num_tokens, self.num_experts)  # [T, E]
    expert_index = jnp.where(chosen, experts, -1)
    combine_weight = jnp.where(chosen, probs, 0.0).astype(jnp.float32)
    return Routing(expert_index=expert_index, combine_weight=combine_weight,
                   metrics=routing_metrics(logits, probs, expert_index),
                   priority=jnp.max(probs, axis=-1).astype(jnp.float32))


class AuxFreeRouter(nn.Module):
  """Auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, sec. 2.1.2).

  A per-expert bias b is added to the router probabilities for top-k selection only; the gates come
  from the unbiased probabilities. After each training step b_e += rate · sign(mean_load - load_e)
  (outside the gradient), so overloaded experts become less likely to be picked. b lives in the
  non-trainable collection 'router_state' ('bias' [E], float32) and is updated only when train=True
  and that collection is mutable. DeepSeek-V3 scores with sigmoids; we keep the softmax so that the
  aux metrics mean the same for every router. Group-limited routing, as in DeepSeek-V3, ranks the
  groups by the biased scores too.
  """
  num_experts: int
  top_k: int
  normalize_top_k: bool = True
  jitter_noise: float = 0.0
  num_expert_groups: int = 1
  top_groups: int = 1
  bias_rate: float = 1e-3
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  kernel_init: Initializer = default_router_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               expert_mask: jax.Array | None = None) -> Routing:
    """x [T, D], expert_mask [T, E] bool or None -> Routing with K = top_k."""
    bias = self.variable('router_state', 'bias', jnp.zeros, (self.num_experts,), jnp.float32)
    logits = _router_logits(self, x, self.num_experts, self.jitter_noise, train,
                            self.param_dtype, self.kernel_init, self.dtype)
    logits = _restrict(logits, expert_mask)
    probs = jax.nn.softmax(logits, axis=-1)
    routing = _top_k_routing(logits, probs, probs + bias.value, self.top_k,
                             self.normalize_top_k, self.num_expert_groups, self.top_groups,
                             expert_mask)
    if train and self.is_mutable_collection('router_state') and not self.is_initializing():
      load = jnp.sum(jax.nn.one_hot(routing.expert_index, self.num_experts, dtype=jnp.float32),
                     axis=(0, 1))
      mean_load = routing.expert_index.size / self.num_experts
      bias.value = bias.value + self.bias_rate * jnp.sign(mean_load - load)
    return routing


_ROUTER_CLASSES = {'top_k': TopKRouter, 'noisy_top_k': NoisyTopKRouter,
                   'expert_choice': ExpertChoiceRouter, 'aux_free': AuxFreeRouter}
ROUTERS = tuple(_ROUTER_CLASSES)
# Routers where each token picks its experts: the ones group limits and expert masks apply to.
TOKEN_CHOICE_ROUTERS = tuple(name for name in ROUTERS if name != 'expert_choice')


def make_router(name: str, **fields) -> nn.Module:
  """The router called `name` (one of ROUTERS), as the Linen submodule 'router'.

  `fields` may hold more than the router declares: each router takes the fields it has by name
  (MoE passes all of its own), so a new router field needs no plumbing here. Expert choice
  refuses group-limited routing (num_expert_groups, top_groups other than 1).
  """
  if name not in _ROUTER_CLASSES:
    raise ValueError(f'router={name!r}; allowed values: {ROUTERS}')
  groups = (fields.get('num_expert_groups', 1), fields.get('top_groups', 1))
  if name not in TOKEN_CHOICE_ROUTERS and groups != (1, 1):
    raise ValueError(f'num_expert_groups={groups[0]}, top_groups={groups[1]}: group-limited '
                     f"routing is for token choice; router={name!r} needs 1 and 1")
  router_cls = _ROUTER_CLASSES[name]
  own = {field.name for field in dataclasses.fields(router_cls)} - {'parent', 'name'}
  return router_cls(**{key: value for key, value in fields.items() if key in own}, name='router')
