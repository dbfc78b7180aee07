"""Training objectives: what a train step minimises and an eval step reports.

Shapes: `...` any leading axes (ensemble members, bootstrap bags), B batch, S seq, V vocab.

An objective is any function `objective(output, batch) -> (loss, metrics)`:
  output   what the model returns for `batch[..., :-1]` (TransformerLM: `(logits [..., B, S, V],
           aux dict)`); an ensemble's vmapped model returns the same with a member axis in front.
  batch    the int32 tokens [..., B, S+1] the step received (targets are `batch[..., 1:]`).
  loss     float32 [], the value the train step differentiates (scaled under fp16) and checks for
           finiteness; a step whose loss or gradients are not finite is skipped.
  metrics  dict of float32 arrays. `metrics['loss']` is the number logged as `loss` by training
           and averaged into `eval_loss` by evaluation; the train step logs every other key too.
Train and eval steps call the same objective (`make_train_step(..., objective=)`,
`make_eval_step(..., objective=)`), so a new objective (ensemble fusion, boosting weights,
distillation against a teacher's logits closed over by the function) is one function.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Objective = Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in float32. logits [..., V], targets [...] int -> ()."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def lm_objective(output: tuple[jax.Array, dict[str, jax.Array]], batch: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The default: next-token cross-entropy plus the model's weighted aux losses.

  output: (logits [..., S, V], aux) with aux['aux_loss'] [] the weighted sum of the MoE losses
  (see moejax.model.TransformerLM). Returns (ce + aux_loss, metrics) with metrics `loss` (the
  cross-entropy alone) and every aux value.
  """
  logits, aux = output
  ce = cross_entropy(logits, batch[..., 1:])
  return ce + aux['aux_loss'], dict(loss=ce, **aux)


def kl_to_teacher(teacher_log_probs: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean over tokens of KL(teacher || student) in float32.

  teacher_log_probs [..., V] (normalised), logits [..., V] the student's -> ()."""
  teacher_log_probs = teacher_log_probs.astype(jnp.float32)
  student_log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
  return kl.mean()


def distillation_objective(teacher_log_probs_fn: Callable[[jax.Array], jax.Array],
                           weight: float) -> Objective:
  """Knowledge distillation (Hinton et al. 2015): the student fits the teacher's distribution
  mixed with the data, `(1 - weight) · ce + weight · KL(teacher || student) + aux_loss`.

  teacher_log_probs_fn: inputs [..., B, S] int -> the teacher's next-token log-probabilities
  [..., B, S, V] (one model's, or an ensemble's fused distribution); no gradient flows into it.
  metrics: `loss` stays the data cross-entropy (so eval_loss is comparable with any run),
  `distill_kl` the KL term, and the aux values.
  """
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f'train.distill_weight={weight}; expected a value in [0, 1]')

  def objective(output, batch):
    logits, aux = output
    ce = cross_entropy(logits, batch[..., 1:])
    teacher = jax.lax.stop_gradient(teacher_log_probs_fn(batch[..., :-1]))
    kl = kl_to_teacher(teacher, logits)
    loss = (1 - weight) * ce + weight * kl + aux['aux_loss']
    return loss, dict(loss=ce, distill_kl=kl, **aux)

  return objective
