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
