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
