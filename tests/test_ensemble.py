"""Ensembles: the member axis, fusion rules, scores, member data and the stacked/gated fit."""
import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

from moejax import data as data_lib
from moejax import ensemble
from moejax import generate as generate_lib
from moejax import model as model_lib
from moejax import precision
from test_sharding import load_config

M, B, S = 3, 2, 8


def smoke_config(size=M, **ensemble_fields):
  config = load_config('moe_tiny', 'smoke')
  config.model.moe.dispatch = 'dense'
  config.ensemble.update(size=size, **ensemble_fields)
  return config


def build(config):
  return ensemble.build_model(config, precision.get_policy(config.precision.policy))


def lp_of(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))


class MemberAxisTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.config = smoke_config()
    self.model = build(self.config)
    self.single = model_lib.build_model(self.config.model, precision.get_policy('fp32'))
    tokens = jax.random.randint(jax.random.key(1), (M, B, S + 1), 0, 257)
    self.inputs, self.targets = tokens[..., :-1], tokens[..., 1:]
    self.params = nn.unbox(self.model.init(jax.random.key(0), self.inputs)['params'])

  def test_size_one_is_the_single_model(self):
    self.assertIsInstance(build(smoke_config(size=1)), model_lib.TransformerLM)

  def test_members_get_their_own_initialisation_and_member_axis_name(self):
    boxed = self.model.init(jax.random.key(0), self.inputs)['params']
    kernel = boxed['members']['layer_0']['attn']['query']
    self.assertEqual(kernel.names[0], 'member')
    for m in range(1, M):
      self.assertGreater(float(jnp.abs(kernel.value[m] - kernel.value[0]).max()), 0.0)

  def test_equals_separately_applied_members_outputs_and_gradients(self):
    def ensemble_loss(params):
      logits, _ = self.model.apply({'params': params}, self.inputs)
      return jnp.sum(ensemble.member_losses(logits, self.targets)), logits

    def member_loss(params, m):
      logits, _ = self.single.apply({'params': params}, self.inputs[m])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, self.targets[m]).mean()
      return ce, logits

    grads, logits = jax.grad(ensemble_loss, has_aux=True)(self.params)
    for m in range(M):
      member = ensemble.member_params(self.params, m)
      member_grads, member_logits = jax.grad(member_loss, has_aux=True)(member, m)
      chex.assert_trees_all_close(logits[m], member_logits, atol=1e-5)
      chex.assert_trees_all_close(ensemble.member_params(grads, m), member_grads, atol=1e-5)

  def test_shared_batch_reaches_every_member(self):
    shared, _ = self.model.apply({'params': self.params}, self.inputs[0])
    stacked, _ = self.model.apply({'params': self.params},
                                  jnp.broadcast_to(self.inputs[0], self.inputs.shape))
    chex.assert_trees_all_close(shared, stacked, atol=1e-6)

  def test_final_hidden_states_are_sown_per_member(self):
    _, state = self.model.apply({'params': self.params}, self.inputs, mutable=['intermediates'])
    hidden, = state['intermediates']['members']['final_hidden']
    self.assertEqual(hidden.shape, (M, B, S, self.config.model.d_model))

  def test_decoding_samples_the_fused_distribution_with_a_cache_per_member(self):
    prompt = self.inputs[0, :, :3]
    out = generate_lib.generate(self.model, self.params, prompt, 6, jax.random.key(0),
                                temperature=0.0, fusion='mean_logprob')
    logits, _ = self.model.apply({'params': self.params}, out[:, :-1])
    fused = ensemble.mean_logprob(ensemble.log_probs(logits))
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(fused[:, 2:], axis=-1))
    # Not simply one member's continuation.
    member_greedy = [generate_lib.generate(self.single, ensemble.member_params(self.params, m),
                                           prompt, 6, jax.random.key(0), temperature=0.0)
                     for m in range(M)]
    self.assertFalse(all(np.array_equal(out, g) for g in member_greedy))

  def test_stack_members_inverts_member_params(self):
    members = [ensemble.member_params(self.params, m) for m in range(M)]
    chex.assert_trees_all_equal(ensemble.stack_members(members), self.params)


class FusionTest(parameterized.TestCase):
  # Two members over a vocabulary of two: p1 = (0.5, 0.5), p2 = (0.9, 0.1).
  LP = lp_of([[0.5, 0.5], [0.9, 0.1]])

  @parameterized.named_parameters(
      ('mean_prob', 'mean_prob', (), [0.7, 0.3]),
      # sqrt(.45) : sqrt(.05) = 3 : 1
      ('mean_logprob', 'mean_logprob', (), [0.75, 0.25]),
      ('weighted', 'weighted', (3.0, 1.0), [0.6, 0.4]),
      # .45 : .05
      ('sum_logits', 'sum_logits', (), [0.9, 0.1]),
  )
  def test_hand_computed(self, fusion, weights, expected):
    fused = ensemble.fuse(self.LP, fusion, weights)
    np.testing.assert_allclose(np.exp(fused), expected, rtol=1e-6)

  def test_stacked_with_given_logits_is_the_weighted_pool(self):
    params = {'logits': jnp.log(jnp.array([3.0, 1.0]))}
    np.testing.assert_allclose(np.exp(ensemble.fuse(self.LP, 'stacked', fusion_params=params)),
                               [0.6, 0.4], rtol=1e-6)

  def test_unfitted_gate_is_the_linear_pool(self):
    hidden = jax.random.normal(jax.random.key(0), (2, 5, 4))
    lp = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (2, 5, 7)))
    params = ensemble.Gate().init(jax.random.key(2), hidden)['params']
    chex.assert_trees_all_close(ensemble.fuse(lp, 'gated', fusion_params=params, hidden=hidden),
                                ensemble.mean_prob(lp), atol=1e-6)

  @parameterized.parameters('mean_prob', 'mean_logprob')
  def test_identical_members_give_the_member(self, fusion):
    lp = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (4, 3, 11)))
    chex.assert_trees_all_close(ensemble.fuse(jnp.stack([lp[0]] * 4), fusion), lp[0], atol=1e-6)

  @parameterized.parameters(0, 1, 2)
  def test_linear_pool_nll_is_at_most_the_mean_member_nll(self, seed):
    key1, key2 = jax.random.split(jax.random.key(seed))
    lp = jax.nn.log_softmax(3 * jax.random.normal(key1, (4, 64, 11)))
    targets = jax.random.randint(key2, (64,), 0, 11)
    nll = lambda lp: -jnp.take_along_axis(lp, targets[:, None], -1).mean()
    member_nll = jnp.mean(jax.vmap(nll)(lp))
    self.assertLessEqual(float(nll(ensemble.mean_prob(lp))), float(member_nll) + 1e-6)

  def test_stacked_fit_prefers_the_better_member(self):
    key1, key2 = jax.random.split(jax.random.key(0))
    targets = jax.random.randint(key1, (256,), 0, 5)
    good = jax.nn.log_softmax(3 * jax.nn.one_hot(targets, 5))
    bad = jax.nn.log_softmax(jax.random.normal(key2, (256, 5)))
    target_lp = jnp.stack([jnp.take_along_axis(x, targets[:, None], -1)[:, 0]
                           for x in (bad, good)])
    params = ensemble.fit_fusion('stacked', target_lp, None, steps=200, learning_rate=0.1)
    weights = jax.nn.softmax(params['logits'])
    self.assertGreater(float(weights[1]), 0.9)


class ScoresTest(parameterized.TestCase):

  def test_ece_and_accuracy_hand_computed(self):
    # Two positions: top-1 prob 0.9 correct and 0.6 wrong (bins 13 and 9).
    lp = lp_of([[[0.9, 0.1], [0.6, 0.4]]])
    sums = ensemble.batch_sums(lp[None], lp, jnp.array([[0, 1]]))
    scores = ensemble.scores(jax.tree.map(np.asarray, sums['fused']), 1.0)
    self.assertAlmostEqual(scores['accuracy'], 0.5)
    self.assertAlmostEqual(scores['ece'], (0.1 + 0.6) / 2, places=6)
    self.assertAlmostEqual(scores['eval_loss'], -(math.log(0.9) + math.log(0.4)) / 2, places=6)

  def test_disagreement_and_mutual_information(self):
    # Members agree at position 0, disagree at position 1 (their pool's top-1 is member 0's).
    lp = lp_of([[[[0.8, 0.2], [0.7, 0.3]]], [[[0.8, 0.2], [0.4, 0.6]]]])
    fused = ensemble.mean_prob(lp)
    sums = jax.device_get(ensemble.batch_sums(lp, fused, jnp.array([[0, 0]])))
    out = ensemble.ensemble_scores(ensemble.add_sums(None, sums), 1.0, 'mean_prob')
    self.assertAlmostEqual(out['disagreement'], (0 + 0.5) / 2, places=6)
    entropy = lambda p: -sum(x * math.log(x) for x in p)
    information = entropy([0.55, 0.45]) - (entropy([0.7, 0.3]) + entropy([0.4, 0.6])) / 2
    self.assertAlmostEqual(out['mutual_information'], information / 2, places=6)
    self.assertLen(out['members'], 2)
    self.assertEqual(out['fused']['fusion'], 'mean_prob')

  def test_identical_members_have_no_mutual_information_or_disagreement(self):
    lp = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (1, 2, 6, 9)))
    lp = jnp.concatenate([lp, lp])
    sums = ensemble.add_sums(None, ensemble.batch_sums(lp, ensemble.mean_prob(lp),
                                                       jnp.zeros((2, 6), jnp.int32)))
    out = ensemble.ensemble_scores(sums, 1.0, 'mean_prob')
    self.assertAlmostEqual(out['mutual_information'], 0.0, places=5)
    self.assertEqual(out['disagreement'], 0.0)


class MemberDataTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.config = smoke_config(size=3, method='bagging')
    self.ds = data_lib.make_dataset(self.config.data, self.config.seed,
                                    self.config.model.vocab_size)

  def test_bootstrap_differs_between_members_and_is_reproducible(self):
    train = self.ds.train_tokens
    streams = [ensemble.bootstrap_stream(train, seed=0, member=m) for m in range(3)]
    for m in (1, 2):
      self.assertFalse(np.array_equal(streams[0][:100_000], streams[m][:100_000]))
    np.testing.assert_array_equal(ensemble.bootstrap_stream(train, seed=0, member=1), streams[1])
    self.assertFalse(np.array_equal(ensemble.bootstrap_stream(train, seed=1, member=1)[:100_000],
                                    streams[1][:100_000]))
    # A resample holds whole documents of the stream it was drawn from.
    docs = {d.tobytes() for d in ensemble.documents(train)}
    self.assertTrue(all(d.tobytes() in docs for d in ensemble.documents(streams[2])[:50]))

  @parameterized.parameters('deep', 'bagging')
  def test_member_batches_are_pure_and_differ(self, method):
    self.config.ensemble.method = method
    data = ensemble.make_data(self.config, self.ds)
    batch = data.train_batch(5)
    self.assertEqual(batch.shape, (3, self.config.data.batch_size, self.config.data.seq_len + 1))
    np.testing.assert_array_equal(batch, ensemble.make_data(self.config, self.ds).train_batch(5))
    self.assertFalse(np.array_equal(batch[0], batch[1]))
    halves = [data.train_batch(5, p, 2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), batch)

  def test_additive_boosting_members_read_the_same_windows(self):
    # Member m fits the residual of the earlier members' summed logits: on the same tokens.
    self.config.ensemble.update(method='boosting', fusion='sum_logits')
    batch = ensemble.make_data(self.config, self.ds).train_batch(5)
    for m in (1, 2):
      np.testing.assert_array_equal(batch[m], batch[0])
    self.assertFalse(np.array_equal(batch[0], ensemble.make_data(
        self.config, self.ds).train_batch(6)[0]))

  def test_reweighting_draws_high_loss_documents_more_often(self):
    config = smoke_config(size=2, method='boosting', boosting='reweight')
    config.train.num_steps = 20
    data = ensemble.make_data(config, self.ds)
    hard = ord('#')  # member 0 is confidently wrong on windows that start with '#'

    def members(tokens):
      wrong = jax.nn.log_softmax(50.0 * jax.nn.one_hot(jnp.full(tokens.shape, 255), 257))
      uniform = jnp.full(tokens.shape + (257,), -math.log(257.0))
      lp = jnp.where((tokens[:, :1] == hard)[..., None], wrong, uniform)
      return jnp.stack([lp, uniform]), None

    data.start_stage(9, lambda: self.fail('stage 0 needs no draw'))
    data.start_stage(10, lambda: members)
    share = lambda stream: np.mean([d[0] == hard for d in ensemble.documents(stream)])
    # Probability proportional to the loss: 50 nats on hard documents, log 257 on the others.
    p = share(data.streams[0])
    self.assertAlmostEqual(share(data.streams[1]), 50 * p / (50 * p + math.log(257) * (1 - p)),
                           delta=0.05)
    drawn = data.streams[1]
    data.start_stage(15, lambda: self.fail('drawn once per stage'))
    again = ensemble.make_data(config, self.ds)
    again.start_stage(12, lambda: members)
    np.testing.assert_array_equal(again.streams[1], drawn)

  @parameterized.parameters('deep', 'bagging')
  def test_members_never_train_on_the_selection_split(self, method):
    self.config.ensemble.method = method
    self.config.data.selection_fraction = 0.05
    ds = data_lib.make_dataset(self.config.data, self.config.seed, self.config.model.vocab_size)
    # Documents only the selection split holds (a few stdlib files share their contents).
    held = ({d.tobytes() for d in ensemble.documents(ds.selection_tokens)}
            - {d.tobytes() for d in ensemble.documents(ds.train_tokens)})
    self.assertNotEmpty(held)
    for stream in ensemble.make_data(self.config, ds).streams:
      self.assertFalse(any(d.tobytes() in held for d in ensemble.documents(stream)))


class SelectionFitTest(parameterized.TestCase):

  @parameterized.product(fusion=('stacked', 'gated'), split=('val_tokens', 'train_tokens'))
  def test_fit_reads_neither_the_validation_nor_the_training_split(self, fusion, split):
    config = smoke_config(size=2, fusion=fusion)
    config.data.selection_fraction = 0.05
    model = build(config)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 1, 8), jnp.int32))['params'])
    members = ensemble.members_fn(model, {'params': params})
    ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
    poisoned = dataclasses.replace(ds, **{split: np.full_like(getattr(ds, split), 7)})
    fitted = [ensemble.fit_on_selection(config, d, members) for d in (ds, poisoned)]
    chex.assert_trees_all_equal(*fitted)
    # The fit moved away from the uniform start, so the test could see a change.
    self.assertGreater(max(float(jnp.abs(x).max()) for x in jax.tree.leaves(fitted[0])), 0.0)

  @parameterized.parameters('stacked', 'gated')
  def test_a_fitted_fusion_without_a_selection_split_is_refused_before_training(self, fusion):
    config = smoke_config(size=2, fusion=fusion)
    with self.assertRaisesRegex(
        ValueError, rf"^data.selection_fraction=0.0: ensemble.fusion='{fusion}' reads the selection "
        r'split .* the members must have been trained with one data.selection_fraction > 0$'):
      ensemble.validate_config(config)
    config.data.selection_fraction = 0.05
    ensemble.validate_config(config)
