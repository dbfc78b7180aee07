"""Tests for moejax.objective: the default LM objective, with and without leading axes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from moejax import objective


def _reference_cross_entropy(logits, targets):
  """-log softmax(logits)[target], averaged, in numpy float64."""
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  return np.mean(log_z - picked)


def test_lm_objective_is_cross_entropy_plus_aux_loss():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
  batch = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 7)
  aux = dict(aux_loss=jnp.float32(0.25), router_z_loss=jnp.float32(3.0))
  loss, metrics = objective.lm_objective((logits, aux), batch)
  expected = _reference_cross_entropy(logits, batch[:, 1:])
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, expected + 0.25, rtol=1e-5)
  assert set(metrics) == {'loss', 'aux_loss', 'router_z_loss'}


def test_a_leading_member_axis_passes_through():
  # [M, B, S, V] logits against [M, B, S+1] batches: targets come from batch[..., 1:].
  logits = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 5, 7))
  batch = jax.random.randint(jax.random.PRNGKey(3), (3, 2, 6), 0, 7)
  aux = dict(aux_loss=jnp.float32(0.0))
  _, metrics = objective.lm_objective((logits, aux), batch)
  per_member = [objective.lm_objective((logits[m], aux), batch[m])[1]['loss'] for m in range(3)]
  chex.assert_trees_all_close(metrics['loss'], jnp.mean(jnp.stack(per_member)), rtol=1e-6)


def _distillation_case(teacher_seed=4):
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
  batch = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 7)
  teacher = jax.nn.log_softmax(2.0 * jax.random.normal(jax.random.PRNGKey(teacher_seed),
                                                       (2, 5, 7)))
  aux = dict(aux_loss=jnp.float32(0.25))
  return logits, batch, teacher, aux


def test_distillation_with_weight_zero_is_the_data_loss_and_its_gradient():
  logits, batch, teacher, aux = _distillation_case()
  distill = objective.distillation_objective(lambda tokens: teacher, weight=0.0)
  loss_fn = lambda f: lambda lg: f((lg, aux), batch)[0]
  np.testing.assert_allclose(loss_fn(distill)(logits), loss_fn(objective.lm_objective)(logits),
                             rtol=1e-7)
  chex.assert_trees_all_close(jax.grad(loss_fn(distill))(logits),
                              jax.grad(loss_fn(objective.lm_objective))(logits), atol=1e-8)
  _, metrics = distill((logits, aux), batch)
  assert float(metrics['distill_kl']) > 0.1  # the KL is there; weight 0 just ignores it


def test_distillation_mixes_the_kl_to_the_teacher():
  logits, batch, teacher, aux = _distillation_case()
  _, metrics = objective.distillation_objective(lambda tokens: teacher, 0.3)((logits, aux), batch)
  p = np.exp(np.asarray(teacher, np.float64))
  student = np.asarray(jax.nn.log_softmax(logits), np.float64)
  kl = np.mean(np.sum(p * (np.log(p) - student), -1))
  np.testing.assert_allclose(metrics['distill_kl'], kl, rtol=1e-5)
  loss, _ = objective.distillation_objective(lambda tokens: teacher, 0.3)((logits, aux), batch)
  np.testing.assert_allclose(loss, 0.7 * metrics['loss'] + 0.3 * kl + 0.25, rtol=1e-5)
  # A student that is the teacher has no KL; weight 1 then leaves only the aux loss.
  loss, metrics = objective.distillation_objective(lambda tokens: teacher, 1.0)((teacher, aux),
                                                                                  batch)
  np.testing.assert_allclose(metrics['distill_kl'], 0.0, atol=1e-6)
  np.testing.assert_allclose(loss, 0.25, atol=1e-6)
  with np.testing.assert_raises_regex(ValueError, 'train.distill_weight'):
    objective.distillation_objective(lambda tokens: teacher, 1.5)
