"""Training: TrainState, AdamW with per-moment dtypes, train/eval steps, the train_and_evaluate loop.

Shapes: B batch (global), S seq, V vocab, E experts, L_moe MoE layers.

The train step is a pure, jitted function `(state, batch [B, S+1] int32) -> (state, metrics)` with
the state donated. It minimises cross-entropy (float32, mean over the B·S tokens) plus the model's
weighted aux losses. A step whose loss or grads are not finite leaves params, optimizer state and
router state unchanged (the step counter still advances) and counts itself in `nonfinite_count`;
`train.max_nonfinite_steps` such steps in a row stop the run. Under fp16 the loss is scaled by the
state's `DynamicLossScale` (see moejax.precision).

The loop (`train_and_evaluate`) resumes from the latest checkpoint in `workdir/checkpoints`; the
data are a pure function of (seed, step), so a resumed run sees the same batches as an
uninterrupted one and, on the same devices, reproduces it bit for bit.
"""
import json
import math
import os
import signal
import threading
import time
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
from moejax import metrics as metrics_lib
from moejax import model as model_lib
from moejax import precision
from moejax import sharding

PyTree = Any

# model.* keys that change parameter shapes or names: a workdir trained with other values cannot
# be resumed (the checkpoint would not fit the model).
SHAPE_KEYS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_ff', 'ffn', 'moe_every',
              'first_dense_layers', 'tie_embeddings', 'moe.num_experts', 'moe.d_ff',
              'moe.num_shared_experts', 'moe.router', 'moe.activation')


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays, checkpointed as a whole.

  step: int32 [] completed steps. params: the 'params' collection (unboxed). opt_state: optax
  state. model_state: the 'router_state' collection ({} when the model has none). rng: uint32 [2]
  base key (each step folds in its step number). loss_scale: precision.DynamicLossScale (fp16) or
  NoOpLossScale. nonfinite_count: int32 [] consecutive skipped (non-finite) steps.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  rng: jax.Array
  loss_scale: Any
  nonfinite_count: jax.Array


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
    _require(data[key] % jax.process_count() == 0, f'data.{key}', data[key],
             f'a multiple of the process count ({jax.process_count()})')
  precision.get_policy(prec.policy)
  precision.optimizer_state_dtypes(prec.policy, prec.mu_dtype, prec.nu_dtype)
  precision.loss_scale_for(prec.policy, prec.loss_scale_init, prec.loss_scale_period)
  model_lib.validate_config(config.model)


# ---------------------------------------------------------------------------------------------
# Optimizer.


def scale_by_adam(b1: float, b2: float, eps: float, mu_dtype, nu_dtype
                  ) -> optax.GradientTransformation:
  """Adam's moment scaling (Kingma & Ba 2015) storing each moment in its own dtype.

  optax.scale_by_adam exposes only `mu_dtype`; pure bf16 training keeps nu in bf16 too. The
  moments are updated and bias-corrected in float32 and only stored in `mu_dtype`/`nu_dtype`;
  updates come out in the gradient's dtype. With float32 moments this matches optax.scale_by_adam.
  """
  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params),
        nu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=nu_dtype), params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda g, m: (1 - b1) * g.astype(jnp.float32) + b1 * m.astype(jnp.float32),
                      updates, state.mu)
    nu = jax.tree.map(
        lambda g, v: (1 - b2) * jnp.square(g.astype(jnp.float32)) + b2 * v.astype(jnp.float32),
        updates, state.nu)
    mu_correction = (1 - b1**count).astype(jnp.float32)
    nu_correction = (1 - b2**count).astype(jnp.float32)
    new_updates = jax.tree.map(
        lambda g, m, v: ((m / mu_correction) / (jnp.sqrt(v / nu_correction) + eps)).astype(g.dtype),
        updates, mu, nu)
    return new_updates, optax.ScaleByAdamState(
        count=count, mu=optax.tree_utils.tree_cast(mu, mu_dtype),
        nu=optax.tree_utils.tree_cast(nu, nu_dtype))

  return optax.GradientTransformation(init_fn, update_fn)


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for the leaves AdamW decays: matrices and expert stacks (ndim >= 2) except the token
  embedding, a lookup table whose rare rows get few gradient updates and would mostly shrink;
  norm scales and biases (ndim 1) are not decayed either. Works on boxed and plain params."""
  def decay(path, leaf):
    return nn.unbox(leaf).ndim >= 2 and 'embedding' not in jax.tree_util.keystr(path)
  return jax.tree_util.tree_map_with_path(
      decay, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 over `optim.warmup_steps`, then cosine decay to end_lr_ratio · lr at
  `train.num_steps`."""
  optim = config.optim
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
      decay_steps=config.train.num_steps, end_value=optim.learning_rate * optim.end_lr_ratio)


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
        model_state=dict(variables.get('router_state', {})), rng=state_rng,
        loss_scale=precision.loss_scale_for(prec.policy, prec.loss_scale_init,
                                            prec.loss_scale_period),
        nonfinite_count=jnp.zeros([], jnp.int32))
  return init


def _variables(params, model_state):
  return {'params': params, 'router_state': model_state} if model_state else {'params': params}


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in float32. logits [B, S, V], targets [B, S] -> ()."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """The pure train step `(state, batch [B, S+1] int32) -> (state, metrics)`; jit it yourself.

  metrics: `loss` (cross-entropy), the model's aux values (`aux_loss`, `load_balance_loss`,
  `router_z_loss`, `dropped_fraction`, `router_entropy`, `expert_fraction` [L_moe, E]),
  `learning_rate`, `grad_norm`, `loss_scale`, `skipped` (1 when this step's update was skipped)
  and `nonfinite_count`.
  """
  def train_step(state: TrainState, batch: jax.Array):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    # Folding in the step keeps the rng out of the updated state and makes step t's noise the same
    # whether or not the run was resumed.
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      (logits, aux), new_vars = model.apply(
          _variables(params, state.model_state), inputs, train=True, rngs={'router': step_rng},
          mutable=['router_state'])
      ce = cross_entropy(logits, targets)
      loss = ce + aux['aux_loss']
      return state.loss_scale.scale_loss(loss), (ce, aux, dict(new_vars.get('router_state', {})))

    grads, (ce, aux, model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = state.loss_scale.unscale(grads)
    finite = precision.all_finite(grads) & jnp.isfinite(ce + aux['aux_loss'])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=precision.select_tree(finite, params, state.params),
        opt_state=precision.select_tree(finite, opt_state, state.opt_state),
        model_state=precision.select_tree(finite, model_state, state.model_state),
        loss_scale=state.loss_scale.adjust(finite),
        nonfinite_count=jnp.where(finite, 0, state.nonfinite_count + 1).astype(jnp.int32))
    # The rate this update used: the schedule's own count (the chain's last state) does not
    # advance on skipped steps, unlike state.step.
    learning_rate = schedule(state.opt_state[-1].count)
    metrics = dict(
        loss=ce, **aux, learning_rate=learning_rate, grad_norm=optax.tree.norm(grads),
        loss_scale=state.loss_scale.scale, skipped=(~finite).astype(jnp.int32),
        nonfinite_count=new_state.nonfinite_count)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable[[TrainState, jax.Array], jax.Array]:
  """`(state, batch [B, S+1]) -> mean cross-entropy ()` of the model without training noise."""
  def eval_step(state: TrainState, batch: jax.Array):
    logits, _ = model.apply(_variables(state.params, state.model_state), batch[:, :-1],
                            train=False)
    return cross_entropy(logits, batch[:, 1:])
  return eval_step


def run_eval(eval_step, state: TrainState, batches: list[jax.Array], bytes_per_token: float
             ) -> dict[str, float]:
  """eval_loss (mean over equal-sized batches), bits per byte and perplexity."""
  losses = jax.device_get([eval_step(state, batch) for batch in batches])
  eval_loss = float(np.mean(np.asarray(losses, np.float64)))
  return dict(eval_loss=eval_loss,
              eval_bits_per_byte=eval_loss / math.log(2) / bytes_per_token,
              eval_perplexity=math.exp(min(eval_loss, 700.0)))


# ---------------------------------------------------------------------------------------------
# Workdir config.


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run wrote to `workdir/config.json` (JSON lists of mesh rules back to tuples)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{path} does not exist: --workdir must be a training workdir')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.rules = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)
  return config


def _nested_get(tree: dict, dotted: str):
  for key in dotted.split('.'):
    tree = tree[key]
  return tree


def _write_or_check_config(config: ml_collections.ConfigDict, workdir: str, is_main: bool):
  """Refuses to resume a workdir trained with other model shapes; then records `config`."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diffs = [f'model.{key}: {_nested_get(old["model"], key)!r} -> {_nested_get(new["model"], key)!r}'
             for key in SHAPE_KEYS
             if _nested_get(old['model'], key) != _nested_get(new['model'], key)]
    if diffs:
      raise ValueError(f'{workdir} holds a run with a different model ({"; ".join(diffs)}); '
                       'use a new --workdir or the old model config')
  if is_main:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(new, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Building an experiment (shared by training, evaluation and restore_params).


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


def _build_experiment(config: ml_collections.ConfigDict) -> _Experiment:
  """The mesh (checked against the config), dataset, eval batches, model, optimizer and abstract
  state of a validated `config`."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.validate_mesh(config, mesh)
  rules = sharding.logical_rules(config.mesh)
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  eval_batches = _eval_batches(ds, config, mesh, rules)
  model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
  tx, schedule = make_optimizer(config)
  init_fn = make_init_fn(config, model, tx)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state, state_shardings = _abstract_state(init_fn, rng, mesh, rules)
  return _Experiment(mesh, rules, ds, eval_batches, model, tx, schedule, init_fn, rng,
                     abstract_state, state_shardings)


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


def _restore_sigterm_handler(previous):
  if previous is not None:
    signal.signal(signal.SIGTERM, previous)


def _host(metrics: dict) -> dict:
  """Device metrics -> floats (scalars) and nested lists (arrays) for the writers."""
  out = {}
  for key, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    out[key] = float(value) if value.ndim == 0 else value.astype(np.float64).tolist()
  return out


def _count_skipped(step: int, metrics: dict, max_nonfinite_steps: int) -> int:
  """1 if `step` skipped its update, else 0; raises once too many steps in a row were skipped."""
  count = int(metrics['nonfinite_count'])
  if count >= max_nonfinite_steps:
    raise FloatingPointError(
        f'{count} non-finite steps in a row, the last at step {step} '
        f'(train.max_nonfinite_steps={max_nonfinite_steps}); lower optim.learning_rate or check '
        'the data; the latest checkpoint holds the last finite parameters')
  return int(metrics['skipped'])


def _throughput(seconds_per_step: float, tokens_per_step: int, flops_per_step: float,
                peak_flops: float | None) -> dict[str, float]:
  """step_time, tokens_per_s, flops_per_step and, when the device peak is known, mfu."""
  out = dict(step_time=seconds_per_step, tokens_per_s=tokens_per_step / seconds_per_step,
             flops_per_step=float(flops_per_step))
  if peak_flops:
    out['mfu'] = flops_per_step / seconds_per_step / (peak_flops * jax.device_count())
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns final metrics.

  The returned dict holds the last train metrics plus `step`, `eval_loss`, `eval_bits_per_byte`
  and `eval_perplexity` of the final parameters. SIGTERM saves a checkpoint at the step reached
  and returns normally.
  """
  # --- Setup -----------------------------------------------------------------------------------
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  _write_or_check_config(config, workdir, is_main)
  train_cfg = config.train
  num_steps = train_cfg.num_steps
  tokens_per_step = config.data.batch_size * config.data.seq_len

  # --- Mesh, data, model and optimizer ----------------------------------------------------------
  (mesh, rules, ds, eval_batches, model, tx, schedule, init_fn, rng, abstract_state,
   state_shardings) = _build_experiment(config)
  flops_per_step = model_lib.flops_per_token(config.model, config.data.seq_len) * tokens_per_step
  peak_flops = train_cfg.peak_flops or metrics_lib.peak_flops_per_device()

  # --- Restore or initialise -------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     keep=train_cfg.keep_checkpoints)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  # Preemption: a single process catches SIGTERM itself (from the main thread, the only one
  # allowed to; the previous handler comes back when the run ends). Several processes rely on
  # jax's preemption sync through `ckpt.reached_preemption`, so that all stop at the same step.
  catch_sigterm = (threading.current_thread() is threading.main_thread()
                   and jax.process_count() == 1)
  previous_handler = signal.getsignal(signal.SIGTERM) if catch_sigterm else None
  try:
    step, state = ckpt.restore_latest(abstract_state)
    with sharding.mesh_context(mesh, rules):
      if state is None:
        step = 0
        state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=state_shardings)(rng)
      else:
        logging.info('Resumed from the checkpoint at step %d', step)
      # A killed run may have logged steps past its last checkpoint; they are redone.
      writer.truncate_after(step)

      # --- Step functions ------------------------------------------------------------------------
      train_batch_sharding = sharding.batch_sharding(
          mesh, rules, (config.data.batch_size, config.data.seq_len + 1))
      train_step = jax.jit(make_train_step(model, tx, schedule),
                           in_shardings=(state_shardings, train_batch_sharding),
                           out_shardings=(state_shardings, None), donate_argnums=0)
      eval_step = jax.jit(make_eval_step(model),
                          in_shardings=(state_shardings, eval_batches[0].sharding))

      # --- Loop ----------------------------------------------------------------------------------
      sigterm_received = (checkpoint_lib.install_sigterm_flag() if catch_sigterm
                          else lambda: False)
      max_nonfinite = train_cfg.max_nonfinite_steps
      skipped_total = 0
      train_metrics, eval_metrics = {}, {}
      pending = None  # (step, device metrics): read one step late so the host never waits idle.
      start_step = step
      timer, timer_step = time.perf_counter(), step
      while step < num_steps:
        local = ds.train_batch(step, jax.process_index(), jax.process_count())
        state, metrics = train_step(state, sharding.global_batch(local, mesh, rules))
        step += 1
        if pending is not None:
          skipped_total += _count_skipped(*pending, max_nonfinite)
        pending = (step, metrics)
        if step == start_step + 1:
          # Start timing after the first step of this run so that compilation is not counted.
          jax.block_until_ready(metrics)
          timer, timer_step = time.perf_counter(), step

        if step % train_cfg.log_every == 0 or step == num_steps:
          skipped_total += _count_skipped(*pending, max_nonfinite)
          pending = None
          train_metrics = _host(metrics)
          del train_metrics['nonfinite_count']
          train_metrics['skipped_steps'] = float(skipped_total)
          steps_timed = step - timer_step
          if steps_timed:
            train_metrics.update(_throughput((time.perf_counter() - timer) / steps_timed,
                                             tokens_per_step, flops_per_step, peak_flops))
          writer.write(step, train_metrics)
          writer.flush()  # so a killed run keeps its lines up to the last checkpoint
          if is_main:
            eta = (num_steps - step) * train_metrics['step_time'] if steps_timed else None
            extra = {'mfu': train_metrics['mfu']} if 'mfu' in train_metrics else {}
            print(metrics_lib.format_progress(
                step, num_steps, train_metrics['loss'], train_metrics.get('tokens_per_s', 0.0),
                eta, extra), flush=True)
          timer, timer_step = time.perf_counter(), step

        evaluated = step % train_cfg.eval_every == 0 or step == num_steps
        if evaluated:
          eval_metrics = run_eval(eval_step, state, eval_batches, ds.bytes_per_token)
          writer.write(step, eval_metrics)
          writer.flush()
          if is_main:
            print(f'eval step {step}: loss {eval_metrics["eval_loss"]:.4f} bits/byte '
                  f'{eval_metrics["eval_bits_per_byte"]:.3f}', flush=True)
        stop = sigterm_received() or ckpt.reached_preemption(step)
        save = step % train_cfg.checkpoint_every == 0 or step == num_steps or stop
        if save:
          ckpt.save(step, state, metrics={'eval_loss': eval_metrics['eval_loss']}
                    if evaluated else None, force=True)
        if evaluated or save:  # keep eval and checkpoint time out of the next step_time
          timer, timer_step = time.perf_counter(), step
        if stop:
          logging.info('Preempted: saved a checkpoint at step %d', step)
          break
      if pending is not None:
        skipped_total += _count_skipped(*pending, max_nonfinite)

      # --- Final eval (when this call trained nothing) and wait for the last save ----------------
      if not eval_metrics:  # already at num_steps: report the restored parameters anyway
        eval_metrics = run_eval(eval_step, state, eval_batches, ds.bytes_per_token)
    ckpt.wait()
    writer.flush()
    if is_main:
      try:
        metrics_lib.plot_metrics(workdir)
      except ImportError:  # matplotlib is optional at run time: the GPU machines lack it
        logging.warning('matplotlib is not installed: no %s', metrics_lib.PLOT_FILE)
  finally:
    _restore_sigterm_handler(previous_handler)
    writer.close()
    ckpt.close()
  return {**train_metrics, **eval_metrics, 'step': step}


# ---------------------------------------------------------------------------------------------
# Evaluation and parameter restore for other scripts.


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint of `workdir` on the validation batches training used.

  Returns step, eval_loss, eval_bits_per_byte, eval_perplexity; on the same mesh this reproduces
  the eval line training logged at that step.
  """
  validate_config(config)
  exp = _build_experiment(config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    step, state = ckpt.restore_latest(exp.abstract_state)
  finally:
    ckpt.close()
  if state is None:
    raise ValueError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}')
  with sharding.mesh_context(exp.mesh, exp.rules):
    eval_step = jax.jit(make_eval_step(exp.model),
                        in_shardings=(exp.state_shardings, exp.eval_batches[0].sharding))
    return {'step': step,
            **run_eval(eval_step, state, exp.eval_batches, exp.ds.bytes_per_token)}


def restore_params(workdir: str) -> tuple[ml_collections.ConfigDict, PyTree, PyTree]:
  """(config, params, model_state) of the latest checkpoint in `workdir`, on the first device.

  For sampling and analysis; `build_model(config.model, get_policy(config.precision.policy))`
  gives the matching model.
  """
  config = load_config(workdir)
  model = model_lib.build_model(config.model, precision.get_policy(config.precision.policy))
  tx, _ = make_optimizer(config)
  boxed = jax.eval_shape(make_init_fn(config, model, tx), jax.random.PRNGKey(config.seed))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nn.unbox(boxed))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}')
    # Not the optimizer state: on one device it would take twice the parameters' memory again.
    fields = ckpt.restore_fields(step, {'params': abstract.params,
                                        'model_state': abstract.model_state})
  finally:
    ckpt.close()
  return config, fields['params'], fields['model_state']
