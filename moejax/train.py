"""Training: TrainState, AdamW with per-moment dtypes, train/eval steps, the train_and_evaluate loop.

Shapes: B batch (global), S seq, V vocab, E experts, L_moe MoE layers.

The train step is a pure, jitted function `(state, batch [..., B, S+1] int32) -> (state, metrics)`
with the state donated. It minimises an objective `(model output, batch) -> (loss, metrics)`
(moejax.objective), by default cross-entropy (float32, mean over the B·S tokens) plus the model's
weighted aux losses. A step whose loss or grads are not finite, or whose update would make any
parameter, optimizer moment or router state non-finite, leaves them unchanged (the step counter
still advances) and counts itself in `nonfinite_count` (in a row) and `skipped_steps` (in all);
`train.max_nonfinite_steps` such steps in a row stop the run, except while an fp16 loss scale is
still falling (each overflow halves it, down to precision.LOSS_SCALE_FLOOR). Under fp16 the loss
is scaled by the state's `DynamicLossScale` (see moejax.precision).

A checkpoint is never saved during a run of skipped steps (its parameters would be those whose
gradients were not finite): the save waits for the next finite step. So every checkpoint holds a
zero count in a row, and a halted run resumed with a lower learning rate or loss scale starts it
at zero; `skipped_steps` is part of the state and survives resume.

The loop (`train_and_evaluate`) steps and runs the periodic actions built before it (progress
line, eval, checkpoint; moejax.periodic). It resumes from the latest checkpoint in
`workdir/checkpoints`; the data are a pure function of (seed, step), so a resumed run sees the
same batches as an uninterrupted one and, on the same devices, reproduces it bit for bit.
"""
import math
import os
import signal
import threading
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moejax import checkpoint as checkpoint_lib
from moejax import data as data_lib
from moejax import ensemble as ensemble_lib
from moejax import expert_parallel
from moejax import int8
from moejax import memory
from moejax import metrics as metrics_lib
from moejax import model as model_lib
from moejax import objective as objective_lib
from moejax import periodic
from moejax import precision
from moejax import sharding
from moejax import workdir as workdir_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays, checkpointed as a whole.

  Checkpoints key the fields by name: one written before a field's rename does not restore (no
  migration).

  step: int32 [] completed steps. params: the 'params' collection (unboxed). opt_state: optax
  state. router_state: the 'router_state' collection ({} when the model has none). rng: uint32 [2]
  base key (each step folds in its step number). loss_scale: precision.DynamicLossScale (fp16) or
  NoOpLossScale. nonfinite_count: int32 [] consecutive skipped (non-finite) steps.
  skipped_steps: int32 [] all skipped steps of the run, across resumes.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  router_state: PyTree
  rng: jax.Array
  loss_scale: Any
  nonfinite_count: jax.Array
  skipped_steps: jax.Array


# ---------------------------------------------------------------------------------------------
# Config validation: fails before anything is built or compiled.


def _require(ok: bool, field: str, value, allowed: str):
  if not ok:
    raise ValueError(f'{field}={value!r}; allowed: {allowed}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for out-of-range values (types and key names are checked
  by the locked ConfigDict when flags override them)."""
  train, optim, data, prec = config.train, config.optim, config.data, config.precision
  for key in ('num_steps', 'log_every', 'eval_every', 'eval_steps', 'checkpoint_every',
              'keep_checkpoints', 'max_nonfinite_steps'):
    _require(train[key] >= 1, f'train.{key}', train[key], 'an integer >= 1')
  _require(train.peak_flops >= 0, 'train.peak_flops', train.peak_flops, '>= 0 (0 = look up)')
  _require(0 <= train.distill_weight <= 1, 'train.distill_weight', train.distill_weight, '[0, 1]')
  _require(optim.learning_rate > 0, 'optim.learning_rate', optim.learning_rate, '> 0')
  _require(0 <= optim.warmup_steps < train.num_steps, 'optim.warmup_steps', optim.warmup_steps,
           f'0 <= warmup_steps < train.num_steps ({train.num_steps})')
  _require(0 <= optim.end_lr_ratio <= 1, 'optim.end_lr_ratio', optim.end_lr_ratio, '[0, 1]')
  _require(optim.weight_decay >= 0, 'optim.weight_decay', optim.weight_decay, '>= 0')
  for key in ('b1', 'b2'):
    _require(0 <= optim[key] < 1, f'optim.{key}', optim[key], '[0, 1)')
  _require(optim.eps > 0, 'optim.eps', optim.eps, '> 0')
  _require(optim.grad_clip >= 0, 'optim.grad_clip', optim.grad_clip, '>= 0 (0 = no clipping)')
  for key in ('seq_len', 'batch_size', 'eval_batch_size'):
    _require(data[key] >= 1, f'data.{key}', data[key], 'an integer >= 1')
  _require(data.seq_len <= config.model.max_seq_len, 'data.seq_len', data.seq_len,
           f'<= model.max_seq_len ({config.model.max_seq_len})')
  for key in ('batch_size', 'eval_batch_size'):
    data_lib.check_process_split(data[key], jax.process_count(), f'data.{key}')
  precision.get_policy(prec.policy)
  precision.optimizer_state_dtypes(prec.policy, prec.mu_dtype, prec.nu_dtype)
  precision.loss_scale_for(prec.policy, prec.loss_scale_init, prec.loss_scale_period)
  _require(not (prec.int8_training and config.model.ffn != 'moe'), 'precision.int8_training',
           prec.int8_training, "False for dense models (it quantises the experts' matmuls)")
  model_lib.validate_config(config.model)
  ensemble_lib.validate_config(config)


# ---------------------------------------------------------------------------------------------
# Optimizer.


def scale_by_adam(b1: float, b2: float, eps: float, mu_dtype, nu_dtype
                  ) -> optax.GradientTransformation:
  """Adam's moment scaling (Kingma & Ba 2015) storing each moment in its own dtype.

  optax.scale_by_adam (0.2.8) takes only `mu_dtype`; a bf16-initialised nu would stay bf16 there
  (it casts nu like its state), but the moments would then be updated in bf16 arithmetic, with a
  rounding at every operation. Here they are updated and bias-corrected in float32, with optax's
  own tree functions, and rounded once to `mu_dtype`/`nu_dtype` to be stored; updates come out in
  the gradient's dtype. With float32 moments this is optax.scale_by_adam bit for bit.
  """
  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params),
        nu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=nu_dtype), params))

  def update_fn(updates, state, params=None):
    del params
    grads = optax.tree.cast(updates, jnp.float32)
    mu = optax.tree.update_moment(grads, optax.tree.cast(state.mu, jnp.float32), b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(grads, optax.tree.cast(state.nu, jnp.float32),
                                                b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    new_updates = jax.tree.map(lambda g, m, v: (m / (jnp.sqrt(v) + eps)).astype(g.dtype),
                               updates, mu_hat, nu_hat)
    return new_updates, optax.ScaleByAdamState(
        count=count, mu=optax.tree.cast(mu, mu_dtype), nu=optax.tree.cast(nu, nu_dtype))

  return optax.GradientTransformation(init_fn, update_fn)


# Parameter names AdamW does not decay: the token embedding, a lookup table whose rare rows get
# few gradient updates and would mostly shrink, and norm scales and biases, which set a scale
# rather than a feature.
NO_DECAY_NAMES = ('embedding', 'scale', 'bias')


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for the leaves AdamW decays: every parameter whose name (its last path key) is not in
  NO_DECAY_NAMES. Decided by the path, not the rank, so that a leading axis (ensemble members:
  a norm scale [M, D]) changes nothing. Works on boxed and plain params."""
  def decay(path, leaf):
    del leaf
    return _leaf_name(path) not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(
      decay, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 over `optim.warmup_steps`, then cosine decay to end_lr_ratio · lr at
  `train.num_steps` (a boosted ensemble member: at the end of its own stage)."""
  optim = config.optim
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
      decay_steps=ensemble_lib.steps_per_member(config),
      end_value=optim.learning_rate * optim.end_lr_ratio)


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (Loshchilov & Hutter 2019) with global-norm clipping; moment dtypes from the precision
  config. Returns (tx, learning-rate schedule)."""
  optim, prec = config.optim, config.precision
  mu_dtype, nu_dtype = precision.optimizer_state_dtypes(prec.policy, prec.mu_dtype, prec.nu_dtype)
  schedule = learning_rate_schedule(config)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
      scale_by_adam(optim.b1, optim.b2, optim.eps, mu_dtype, nu_dtype),
      optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(schedule))
  if config.ensemble.size > 1:
    tx = ensemble_lib.optimizer(config, tx)
  return tx, schedule


# ---------------------------------------------------------------------------------------------
# State, loss and steps.


def make_init_fn(config: ml_collections.ConfigDict, model: nn.Module,
                 tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState with boxed (logically partitioned) params and optimizer moments.

  Boxed so that `sharding.tree_shardings` can place every array; unbox inside the jitted init.
  """
  prec = config.precision
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    variables = model.init({'params': params_rng}, tokens, train=False)
    params = variables['params']
    return TrainState(
        step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
        router_state=dict(variables.get('router_state', {})), rng=state_rng,
        loss_scale=precision.loss_scale_for(prec.policy, prec.loss_scale_init,
                                            prec.loss_scale_period),
        nonfinite_count=jnp.zeros([], jnp.int32), skipped_steps=jnp.zeros([], jnp.int32))
  return init


def model_variables(params, router_state) -> dict:
  """The variables `model.apply` takes: params, and the router state when the model has one."""
  return {'params': params, 'router_state': router_state} if router_state else {'params': params}


# fold_in tag of the step key that stochastic rounding uses, apart from the router's noise.
_ROUNDING_STREAM = 1


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    objective: objective_lib.Objective = objective_lib.lm_objective,
                    stochastic_rounding: bool = False
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """The pure train step `(state, batch [..., B, S+1] int32) -> (state, metrics)`; jit it yourself.

  The model sees `batch[..., :-1]`; `objective(output, batch) -> (loss, metrics)` (see
  moejax.objective) turns its output into the loss to minimise. `stochastic_rounding`
  (`precision.stochastic_rounding`) rounds the updated bf16/fp16 params stochastically
  (`precision.apply_updates`), keyed by (state.rng, step) so resume stays bitwise. metrics: the
  objective's (by default `loss`, the cross-entropy, and the model's aux values `aux_loss`,
  `load_balance_loss`, `router_z_loss`, `dropped_fraction`, `router_entropy`, `expert_fraction`
  [L_moe, E]), then
  `learning_rate`, `grad_norm`, `loss_scale` (the scale this step used), `skipped` (1 when this
  step's update was skipped), `nonfinite_grads` (1 when it was skipped for its loss or grads
  rather than its update), `nonfinite_count` and `skipped_steps`.
  """
  def train_step(state: TrainState, batch: jax.Array):
    # Folding in the step keeps the rng out of the updated state and makes step t's noise the same
    # whether or not the run was resumed.
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      output, new_vars = model.apply(
          model_variables(params, state.router_state), batch[..., :-1], train=True,
          rngs={'router': step_rng}, mutable=['router_state'])
      loss, metrics = objective(output, batch)
      return state.loss_scale.scale_loss(loss), (loss, metrics,
                                                 dict(new_vars.get('router_state', {})))

    grads, (loss, objective_metrics, router_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = state.loss_scale.unscale(grads)
    grads_finite = precision.all_finite(grads) & jnp.isfinite(loss)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    rounding_key = (jax.random.fold_in(step_rng, _ROUNDING_STREAM) if stochastic_rounding
                    else None)
    params = precision.apply_updates(state.params, updates, rounding_key)
    # Finite grads can still give a non-finite update (a huge learning rate): check what is kept.
    finite = grads_finite & precision.all_finite((params, opt_state, router_state))
    new_state = state.replace(
        step=state.step + 1,
        params=precision.select_tree(finite, params, state.params),
        opt_state=precision.select_tree(finite, opt_state, state.opt_state),
        router_state=precision.select_tree(finite, router_state, state.router_state),
        # Only an overflow in the grads says the loss scale is too high.
        loss_scale=state.loss_scale.adjust(grads_finite),
        nonfinite_count=jnp.where(finite, 0, state.nonfinite_count + 1).astype(jnp.int32),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    # The rate this update used: the schedule's own count (the chain's last state) does not
    # advance on skipped steps, unlike state.step.
    learning_rate = schedule(ensemble_lib.schedule_count(state.opt_state)
                             if ensemble_lib.has_member_axis(model) else state.opt_state[-1].count)
    metrics = dict(
        **objective_metrics, learning_rate=learning_rate, grad_norm=optax.tree.norm(grads),
        loss_scale=state.loss_scale.scale, skipped=(~finite).astype(jnp.int32),
        nonfinite_grads=(~grads_finite).astype(jnp.int32),
        nonfinite_count=new_state.nonfinite_count, skipped_steps=new_state.skipped_steps)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module,
                   objective: objective_lib.Objective = objective_lib.lm_objective
                   ) -> Callable[[TrainState, jax.Array], dict]:
  """`(state, batch [..., B, S+1]) -> the objective's metrics` of the model without training
  noise; `metrics['loss']` is the batch's eval loss."""
  def eval_step(state: TrainState, batch: jax.Array):
    output = model.apply(model_variables(state.params, state.router_state), batch[..., :-1],
                         train=False)
    return objective(output, batch)[1]
  return eval_step


def run_eval(eval_step, state: TrainState, batches: list[jax.Array], bytes_per_token: float
             ) -> dict[str, float]:
  """eval_loss (the mean of `metrics['loss']` over equal-sized batches), bits per byte and
  perplexity."""
  losses = jax.device_get([eval_step(state, batch)['loss'] for batch in batches])
  eval_loss = float(np.mean(np.asarray(losses, np.float64)))
  return dict(eval_loss=eval_loss,
              eval_bits_per_byte=eval_loss / math.log(2) / bytes_per_token,
              eval_perplexity=math.exp(min(eval_loss, 700.0)))


# ---------------------------------------------------------------------------------------------
# Building an experiment (shared by training and evaluation).


class _Experiment(NamedTuple):
  """What training and evaluation both build from a config, before any array exists."""
  mesh: jax.sharding.Mesh
  rules: Any
  ds: Any
  eval_batches: list[jax.Array]
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_fn: Callable
  rng: jax.Array
  abstract_state: TrainState
  state_shardings: PyTree
  objective: objective_lib.Objective
  eval_objective: objective_lib.Objective


def _build_experiment(config: ml_collections.ConfigDict) -> _Experiment:
  """The mesh (checked against the config), dataset, eval batches, model, optimizer and abstract
  state of a validated `config`."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.validate_mesh(config, mesh)
  expert_parallel.validate_mesh(config, mesh)
  rules = sharding.logical_rules(config.mesh)
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  objective = eval_objective = objective_lib.lm_objective
  if config.ensemble.size > 1:  # one batch per member (E3: one for all); eval batches are shared
    ds = ensemble_lib.make_data(config, ds)
    objective = ensemble_lib.train_objective(config)
    eval_objective = ensemble_lib.eval_objective(config)
  eval_batches = _eval_batches(ds, config, mesh, rules)
  model = ensemble_lib.build_model(config, precision.get_policy(config.precision.policy),
                                   'int8_qat' if config.precision.int8_training else '')
  tx, schedule = make_optimizer(config)
  init_fn = make_init_fn(config, model, tx)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state, state_shardings = _abstract_state(init_fn, rng, mesh, rules)
  return _Experiment(mesh, rules, ds, eval_batches, model, tx, schedule, init_fn, rng,
                     abstract_state, state_shardings, objective, eval_objective)


def _abstract_state(init_fn, rng, mesh, rules):
  """(abstract TrainState with target shardings, sharding tree) without materialising anything."""
  with sharding.mesh_context(mesh, rules):
    boxed = jax.eval_shape(init_fn, rng)
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = nn.unbox(sharding.abstract_with_shardings(boxed, mesh, rules))
  return abstract, shardings


def _eval_batches(ds, config, mesh, rules) -> list[jax.Array]:
  local = ds.eval_batches(config.train.eval_steps, jax.process_index(), jax.process_count())
  return [sharding.global_batch(batch, mesh, rules) for batch in local]


def _host(metrics: dict) -> dict:
  """Device metrics -> floats (scalars) and nested lists (arrays) for the writers."""
  out = {}
  for key, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    out[key] = float(value) if value.ndim == 0 else value.astype(np.float64).tolist()
  return out


class _HaltCheck:
  """Stops the run once `train.max_nonfinite_steps` steps in a row were skipped, with a message
  that says why and what the checkpoints hold.

  Each step's flags are read one step late, so the host never waits idle on the device. It does
  not fire while an fp16 loss scale is still falling: those skips are the scale searching.
  """

  def __init__(self, config: ml_collections.ConfigDict, ckpt: checkpoint_lib.Checkpointer):
    self._config, self._ckpt = config, ckpt
    self._pending = None  # (step, device metrics) not yet read

  def observe(self, step: int, metrics: dict) -> None:
    self.check()
    self._pending = (step, metrics)

  def check(self) -> None:
    """Reads the last observed step's flags; raises FloatingPointError to halt."""
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    flags = jax.device_get({k: metrics[k] for k in ('nonfinite_count', 'nonfinite_grads',
                                                     'loss_scale')})
    count, limit = int(flags['nonfinite_count']), self._config.train.max_nonfinite_steps
    scale_falling = bool(flags['nonfinite_grads']) and flags['loss_scale'] > precision.LOSS_SCALE_FLOOR
    if count >= limit and not scale_falling:
      raise FloatingPointError(self._message(step, count, bool(flags['nonfinite_grads']),
                                             float(flags['loss_scale'])))

  def _message(self, step, count, nonfinite_grads, loss_scale):
    prec, first = self._config.precision, step - count + 1
    if not nonfinite_grads:
      cause = ('its gradients were finite but its update was not (parameters or optimizer '
               'state would have become non-finite): lower optim.learning_rate')
    elif prec.policy == 'fp16':
      cause = (f'its gradients were not finite with the fp16 loss scale at its floor '
               f'{precision.LOSS_SCALE_FLOOR:g} (down from precision.loss_scale_init='
               f'{prec.loss_scale_init:g}; it was {loss_scale:g}): lower optim.learning_rate or '
               'check the data')
    else:
      cause = 'its gradients were not finite: lower optim.learning_rate or check the data'
    self._ckpt.wait()
    newest = self._ckpt.latest_step()
    if newest is None:
      saved = ('no checkpoint was saved; running again (e.g. with the lower rate) starts again '
               'from step 0')
    elif newest >= first - 1 and nonfinite_grads:
      saved = (f'the newest checkpoint, step {newest}, holds the parameters whose gradients '
               f'were not finite at step {first}: resume from an earlier one (move '
               f'{self._ckpt.directory}/{newest} away) or use a new workdir')
    else:
      saved = (f'the newest checkpoint, step {newest}, predates these steps (none is saved '
               'while steps are skipped); resuming from it restarts the count at zero')
    return (f'{count} non-finite steps in a row, steps {first} to {step}, the last at step {step} '
            f'(train.max_nonfinite_steps={self._config.train.max_nonfinite_steps}); {cause}; '
            f'{saved}')


def _throughput(seconds_per_step: float, tokens_per_step: int, flops_per_step: float,
                peak_flops: float | None) -> dict[str, float]:
  """step_time, tokens_per_s, flops_per_step and, when the device peak is known, mfu."""
  out = dict(step_time=seconds_per_step, tokens_per_s=tokens_per_step / seconds_per_step,
             flops_per_step=float(flops_per_step))
  if peak_flops:
    out['mfu'] = flops_per_step / seconds_per_step / (peak_flops * jax.device_count())
  return out


# ---------------------------------------------------------------------------------------------
# The loop's periodic actions. Each records what it produced in `results` ('train', 'eval' and
# 'eval_step'), which later actions and the loop's return value read.


def _progress_action(config, writer, timer: periodic.StepTimer, results: dict, is_main: bool
                     ) -> periodic.PeriodicAction:
  """Writes the train metrics line (with throughput and skipped_steps) and prints progress."""
  num_steps = config.train.num_steps
  # Member tokens: each of the M members (or E3 copies) predicts every token of its batch.
  tokens_per_step = config.ensemble.size * config.data.batch_size * config.data.seq_len
  flops_per_step = (ensemble_lib.flops_per_token(config)
                    * config.data.batch_size * config.data.seq_len)
  peak_flops = config.train.peak_flops or metrics_lib.peak_flops_per_device()

  def log(step, state, metrics):
    del state
    line = _host(metrics)
    del line['nonfinite_count'], line['nonfinite_grads']
    seconds_per_step = timer.seconds_per_step(step)
    if seconds_per_step is not None:
      line.update(_throughput(seconds_per_step, tokens_per_step, flops_per_step, peak_flops))
    writer.write(step, line)
    writer.flush()  # so a killed run keeps its lines up to the last checkpoint
    results['train'] = line
    if is_main:
      eta = None if seconds_per_step is None else (num_steps - step) * seconds_per_step
      extra = {'mfu': line['mfu']} if 'mfu' in line else {}
      print(metrics_lib.format_progress(step, num_steps, line['loss'],
                                        line.get('tokens_per_s', 0.0), eta, extra), flush=True)
  return periodic.PeriodicAction('progress', config.train.log_every, log)


def _eval_action(config, eval_fn: Callable[[TrainState], dict], writer, results: dict,
                 is_main: bool) -> periodic.PeriodicAction:
  """Evaluates the current parameters and writes the eval line."""
  def evaluate_now(step, state, metrics):
    del metrics
    results['eval'], results['eval_step'] = eval_fn(state), step
    writer.write(step, results['eval'])
    writer.flush()
    if is_main:
      print(f'eval step {step}: loss {results["eval"]["eval_loss"]:.4f} bits/byte '
            f'{results["eval"]["eval_bits_per_byte"]:.3f}', flush=True)
  return periodic.PeriodicAction('eval', config.train.eval_every, evaluate_now)


def _checkpoint_action(config, ckpt: checkpoint_lib.Checkpointer, results: dict
                       ) -> periodic.PeriodicAction:
  """Saves the state (with this step's eval loss, when it was evaluated, to rank the best).

  Not while steps are being skipped: the parameters are then those whose gradients were not
  finite, so the save is overdue until the next finite step. Refuses non-finite parameters.
  """
  def save(step, state, metrics):
    results['save_overdue'] = bool(jax.device_get(metrics['nonfinite_count']))
    if results['save_overdue']:
      return
    if not bool(jax.jit(precision.all_finite)(state.params)):
      raise FloatingPointError(f'step {step}: the parameters are not finite; not saving them '
                               f'to {ckpt.directory}')
    evaluated = results['eval_step'] == step
    ckpt.save(step, state, metrics={'eval_loss': results['eval']['eval_loss']}
              if evaluated else None, force=True)
    results['saved_step'] = step
  return periodic.PeriodicAction('checkpoint', config.train.checkpoint_every, save, on_stop=True,
                                 overdue=lambda: results['save_overdue'])


def _plot(workdir: str) -> None:
  try:
    metrics_lib.plot_metrics(workdir)
  except ImportError:  # matplotlib is optional at run time: the GPU machines lack it
    logging.warning('matplotlib is not installed: no %s', metrics_lib.PLOT_FILE)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns final metrics.

  The returned dict holds the last train metrics plus `step`, `eval_loss`, `eval_bits_per_byte`
  and `eval_perplexity` of the final parameters. SIGTERM or SIGINT (Ctrl-C) saves a checkpoint
  at the step reached and returns normally; a second Ctrl-C ends the process at once.
  """
  # --- Setup: every check before anything is written ------------------------------------------
  validate_config(config)
  is_main = jax.process_index() == 0
  exp = _build_experiment(config)  # checks the mesh and the data paths
  mesh, rules = exp.mesh, exp.rules
  num_steps = config.train.num_steps

  # --- Lock, then restore (checks the config against the checkpoint), then write --------------
  # One process takes the lock: on a shared filesystem the others would contend with it.
  lock = workdir_lib.WorkdirLock(workdir) if is_main else None
  try:
    step, state = workdir_lib.restore_for_training(workdir, config, exp.abstract_state)
    if is_main:
      workdir_lib.record_config(workdir, config, step or 0)
      lock.record_holder()
    ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir),
                                       keep=config.train.keep_checkpoints)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  # Preemption: a single process catches SIGTERM and SIGINT itself (from the main thread, the
  # only one allowed to; the previous handlers come back when the run ends). Several processes
  # rely on jax's preemption sync through `ckpt.reached_preemption`, so that all stop at the same
  # step.
  catch_signals = (threading.current_thread() is threading.main_thread()
                   and jax.process_count() == 1)
  previous_handlers = ({sig: signal.getsignal(sig) for sig in checkpoint_lib.STOP_SIGNALS}
                       if catch_signals else {})
  try:
    # A fresh run may start from another workdir's parameters (read outside the mesh: they come
    # back on one device and are placed below).
    init_from = (workdir_lib.restore_params(config.train.init_from)[1:]
                 if state is None and config.train.init_from else None)
    train_objective = training_objective(config, mesh)
    with sharding.mesh_context(mesh, rules):
      if state is None:
        step = 0
        state = jax.jit(lambda r: nn.unbox(exp.init_fn(r)),
                        out_shardings=exp.state_shardings)(exp.rng)
        if init_from is not None:
          state = with_params(state, exp.state_shardings, *init_from,
                              source=f'train.init_from={config.train.init_from!r}')
          logging.info('Initialised the parameters from %s', config.train.init_from)
      else:
        logging.info('Resumed from the checkpoint at step %d', step)
      # A killed run may have logged steps past its last checkpoint; they are redone.
      writer.truncate_after(step - 1 if step == 0 else step)
      if step == 0:
        # The run's first metrics line: what its policy costs, from the real pytrees.
        accounting = ensemble_lib.state_accounting(config, state.params, state.opt_state)
        writer.write(0, accounting)
        if is_main:
          print(memory.format_accounting(accounting), flush=True)

      # --- Step functions and periodic actions --------------------------------------------------
      train_batch_sharding = sharding.batch_sharding(
          mesh, rules, ensemble_lib.train_batch_shape(config))
      step_fn = make_train_step(exp.model, exp.tx, exp.schedule, objective=train_objective,
                                stochastic_rounding=config.precision.stochastic_rounding)
      train_step = jax.jit(step_fn, in_shardings=(exp.state_shardings, train_batch_sharding),
                           out_shardings=(exp.state_shardings, None), donate_argnums=0)
      eval_step = jax.jit(make_eval_step(exp.model, exp.eval_objective),
                          in_shardings=(exp.state_shardings, exp.eval_batches[0].sharding))
      eval_fn = lambda s: run_eval(eval_step, s, exp.eval_batches, exp.ds.bytes_per_token)
      timer, halt = periodic.StepTimer(), _HaltCheck(config, ckpt)
      results = {'train': {}, 'eval': {}, 'eval_step': None, 'save_overdue': False,
                 'saved_step': None}
      actions = (_progress_action(config, writer, timer, results, is_main),
                 _eval_action(config, eval_fn, writer, results, is_main),
                 _checkpoint_action(config, ckpt, results))
      stop_requested = checkpoint_lib.install_stop_flag() if catch_signals else lambda: False

      # --- Loop ----------------------------------------------------------------------------------
      while step < num_steps:
        # Boosting by reweighting draws a member's data when its stage starts.
        if isinstance(exp.ds, ensemble_lib.EnsembleData):
          exp.ds.start_stage(step, lambda: ensemble_lib.members_fn(
              exp.model, model_variables(state.params, state.router_state)))
        local = exp.ds.train_batch(step, jax.process_index(), jax.process_count())
        state, metrics = train_step(state, sharding.global_batch(local, mesh, rules))
        step += 1
        halt.observe(step, metrics)
        ckpt.check()  # a background save that failed stops the run now, naming its step
        stop = stop_requested() or ckpt.reached_preemption(step)
        ran = periodic.run_due(actions, step, num_steps, stop, state, metrics)
        # Compilation (the first step) and the actions' own time stay out of step_time.
        if ran or not timer.started:
          timer.restart(step, metrics)
        if stop:
          logging.warning('Stopped at step %d: %s', step,
                          'saved a checkpoint' if results['saved_step'] == step else
                          'no checkpoint (steps were being skipped); the newest is the last one')
          break
      halt.check()

      # --- Final eval (when this call trained nothing) and wait for the last save ----------------
      if not results['eval']:  # already at num_steps: report the restored parameters anyway
        results['eval'] = eval_fn(state)
    ckpt.wait()
    writer.flush()
    if is_main:
      _plot(workdir)
  finally:
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
    writer.close()
    ckpt.close()
    if lock is not None:
      lock.release()
  return {**results['train'], **results['eval'], 'step': step}


# ---------------------------------------------------------------------------------------------
# Evaluation for other scripts (moejax.workdir restores parameters).


def evaluate(config: ml_collections.ConfigDict, workdir: str, precision_name: str = '',
             quantize: str = '') -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir` on the validation batches training used.

  Returns step, eval_loss, eval_bits_per_byte, eval_perplexity, `precision` (the compute dtype:
  `precision_name` 'fp32' | 'bf16' | 'fp16', or the run's own when empty), `quantize` ('none' or
  'int8': expert weights stored int8, see moejax.int8) and `expert_weight_bytes` (the routed
  experts' weights as evaluated, int8 scales included). Without overrides, on the same mesh, this
  reproduces the eval line training logged at that step.
  """
  validate_config(config)
  if quantize not in ('', 'none', 'int8'):
    raise ValueError(f"--quantize={quantize!r}; allowed values: 'none', 'int8'")
  quantize = 'int8' if quantize == 'int8' else ''
  name, policy = precision.inference_policy(config.precision.policy, precision_name)
  exp = _build_experiment(config)
  directory = workdir_lib.checkpoint_dir(workdir)
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    step, state = ckpt.restore_latest(exp.abstract_state)
  finally:
    ckpt.close()
  if state is None:
    raise ValueError(f'no checkpoint in {directory}')
  with sharding.mesh_context(exp.mesh, exp.rules):
    if precision_name or quantize:
      model = model_lib.build_model(config.model, policy, quantize)
      if quantize:
        state = state.replace(params=int8.quantize_expert_params(state.params))
      eval_step = jax.jit(make_eval_step(model))  # the arrays' own shardings
    else:
      eval_step = jax.jit(make_eval_step(exp.model, exp.eval_objective),
                          in_shardings=(exp.state_shardings, exp.eval_batches[0].sharding))
    return {'step': step,
            **run_eval(eval_step, state, exp.eval_batches, exp.ds.bytes_per_token),
            'precision': name, 'quantize': quantize or 'none',
            'expert_weight_bytes': memory.expert_weight_bytes(state.params)}



def teacher_log_probs_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                        ) -> Callable[[jax.Array], jax.Array]:
  """tokens [B, S] -> log-probabilities [B, S, V] of the teacher in `train.distill_from`, whose
  parameters are replicated over `mesh` (read once, outside it). An ensemble teacher gives its
  fused distribution, by its own `ensemble.fusion`; a stacked or gated fusion is fitted first on
  the teacher's selection split, as experiments/evaluate.py fits it."""
  teacher_config, params, router_state = workdir_lib.restore_params(config.train.distill_from)
  source = f'train.distill_from={config.train.distill_from!r}'
  if teacher_config.model.vocab_size != config.model.vocab_size:
    raise ValueError(f'{source}: the teacher\'s model.vocab_size={teacher_config.model.vocab_size}'
                     f', the student\'s {config.model.vocab_size}; they must share a vocabulary')
  if teacher_config.model.max_seq_len < config.data.seq_len:
    raise ValueError(f'{source}: the teacher\'s model.max_seq_len='
                     f'{teacher_config.model.max_seq_len} < data.seq_len={config.data.seq_len}')
  teacher = ensemble_lib.build_model(teacher_config,
                                     precision.get_policy(teacher_config.precision.policy))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(model_variables(params, router_state), replicated)
  members = ensemble_lib.members_fn(teacher, variables)
  ens = teacher_config.ensemble
  if ens.size == 1:
    return lambda tokens: members(tokens)[0][0]
  ds = data_lib.make_dataset(teacher_config.data, teacher_config.seed,
                             teacher_config.model.vocab_size)
  fusion_params = ensemble_lib.fit_on_selection(teacher_config, ds, members)

  def fused_log_probs(tokens):
    lp, hidden = members(tokens)
    return ensemble_lib.fuse(lp, ens.fusion, ens.weights, fusion_params, hidden)
  return fused_log_probs


def training_objective(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                       ) -> objective_lib.Objective:
  """What the train step minimises: the LM objective, or distillation from
  `train.distill_from` mixed by `train.distill_weight` (evaluation always scores the data), or
  an ensemble's (moejax.ensemble.train_objective)."""
  if config.ensemble.size > 1:
    if config.train.distill_from:
      raise ValueError(f'train.distill_from={config.train.distill_from!r} with ensemble.size='
                       f'{config.ensemble.size}: distilling into an ensemble is not supported')
    return ensemble_lib.train_objective(config)
  if not config.train.distill_from:
    return objective_lib.lm_objective
  return objective_lib.distillation_objective(teacher_log_probs_fn(config, mesh),
                                              config.train.distill_weight)


def with_params(state: TrainState, state_shardings: TrainState, params: PyTree,
                router_state: PyTree, source: str) -> TrainState:
  """`state` with `params` and `router_state` (placed like the state's own) in place of its own.

  Keeps the fresh optimizer moments, step and rng: a run started from another model's
  parameters (train.init_from, a merged workdir) trains with its own optimizer from step 0.
  Raises ValueError naming the first parameter whose path or shape differs.
  """
  def check(name, want, got):
    want_paths = dict(jax.tree_util.tree_leaves_with_path(want))
    got_paths = dict(jax.tree_util.tree_leaves_with_path(got))
    for path, leaf in want_paths.items():
      if path not in got_paths:
        raise ValueError(f'{source}: {name}{jax.tree_util.keystr(path)} is missing; the model '
                         'configs differ')
      if np.shape(got_paths[path]) != leaf.shape:
        raise ValueError(f'{source}: {name}{jax.tree_util.keystr(path)} has shape '
                         f'{np.shape(got_paths[path])}, this model needs {leaf.shape}')
    extra = sorted(jax.tree_util.keystr(p) for p in got_paths.keys() - want_paths.keys())
    if extra:
      raise ValueError(f'{source}: {name}{extra[0]} has no place in this model; the model configs '
                       'differ')

  check('params', state.params, params)
  check('router_state', state.router_state, router_state)
  place = lambda tree, like, shardings: jax.tree.map(
      lambda x, ref, s: jax.device_put(jnp.asarray(x, ref.dtype), s), tree, like, shardings)
  return state.replace(
      params=place(params, state.params, state_shardings.params),
      router_state=place(router_state, state.router_state, state_shardings.router_state))


def init_workdir(config: ml_collections.ConfigDict, workdir: str, params: PyTree,
                 router_state: PyTree | None = None) -> None:
  """Writes a new workdir: `config.json` and a step-0 checkpoint holding `params` (and
  `router_state`, else the fresh one) with a fresh optimizer state; `train.py --workdir` then
  trains it, evaluate.py scores it and generate.py samples it. Refuses a workdir that already
  holds a checkpoint; writes nothing before every check passed."""
  validate_config(config)
  directory = workdir_lib.checkpoint_dir(workdir)
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(f'{workdir} already holds checkpoints; merge into a new --workdir')
  exp = _build_experiment(config)
  with sharding.mesh_context(exp.mesh, exp.rules):
    state = jax.jit(lambda r: nn.unbox(exp.init_fn(r)),
                    out_shardings=exp.state_shardings)(exp.rng)
    state = with_params(state, exp.state_shardings, params,
                        state.router_state if router_state is None else router_state,
                        source=f'the merge into {workdir}')
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    workdir_lib.record_config(workdir, config, 0)
    ckpt = checkpoint_lib.Checkpointer(directory, keep=config.train.keep_checkpoints)
    try:
      ckpt.save(0, state, force=True)
    finally:
      ckpt.close()
  finally:
    lock.release()
