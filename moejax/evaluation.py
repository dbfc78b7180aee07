"""Scoring workdirs: one model, an ensemble workdir, or several workdirs fused as one ensemble.

Shapes: M members (over all workdirs, in the order given), B batch, S seq, V vocab.

Every member reads the validation batches of the first workdir's config (the ones its training
evaluated on). One model gives train.evaluate's JSON plus `accuracy` and `ece`; an ensemble (an
ensemble workdir, or several workdirs that share a vocabulary) gives DESIGN.md's
  {members: [{eval_loss, eval_bits_per_byte, accuracy, ece}, ...],
   fused: {the same keys, fusion}, disagreement, mutual_information}
(see moejax.ensemble for the definitions), with `eval_perplexity` beside each eval_loss. Stacked
and gated fusions are fitted first on the first config's selection split (never the validation
split), so every workdir must have been trained with the same data.selection_fraction > 0: then
none of the members trained on it.
"""
import os
import sys
from typing import Any, NamedTuple, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checkpoint as checkpoint_lib
from moejax import data as data_lib
from moejax import ensemble
from moejax import int8
from moejax import precision
from moejax import train
from moejax import workdir as workdir_lib

RELIABILITY_FILE = 'reliability.png'
_SCORE_KEYS = ('eval_loss', 'eval_bits_per_byte', 'accuracy', 'ece')


def load_members(workdirs: Sequence[str]
                 ) -> tuple[list[ml_collections.ConfigDict], ensemble.MembersFn, int, list[int]]:
  """(each workdir's config, members function, M, the latest checkpoint step of each workdir)."""
  configs, fns, steps = [], [], []
  for workdir in workdirs:
    config, params, router_state = workdir_lib.restore_params(workdir)
    model = ensemble.build_model(config, precision.get_policy(config.precision.policy))
    variables = train.model_variables(params, router_state)
    configs.append(config)
    fns.append(ensemble.members_fn(model, variables))
    steps.append(_latest_step(workdir))
  first = configs[0]
  for workdir, config in zip(workdirs[1:], configs[1:]):
    if config.model.vocab_size != first.model.vocab_size:
      raise ValueError(f'{workdir}: model.vocab_size={config.model.vocab_size} differs from '
                       f'{workdirs[0]}\'s {first.model.vocab_size}; fused members must share a '
                       'vocabulary')
    if config.model.max_seq_len < first.data.seq_len:
      raise ValueError(f'{workdir}: model.max_seq_len={config.model.max_seq_len} is shorter than '
                       f'the evaluation windows (data.seq_len={first.data.seq_len} of '
                       f'{workdirs[0]})')
  num_members = sum(c.ensemble.size for c in configs)
  return configs, ensemble.concat_members(fns), num_members, steps


class Decoder(NamedTuple):
  """What `load_ensemble` gives generate.sample_text."""
  config: ml_collections.ConfigDict  # the first workdir's, ensemble section of all M members
  precision: str  # the compute dtype's name
  model: Any  # TransformerLM (M = 1) or Ensemble
  variables: dict  # params (and router_state), members stacked in the order given
  fusion: dict  # generate's fusion, weights, fusion_params ({} for one model)


def load_ensemble(workdirs: Sequence[str], fusion: str | None = None,
                  weights: Sequence[float] | None = None, precision_name: str = '',
                  quantize: str = 'none') -> Decoder:
  """Workdirs whose models share one architecture as one Ensemble (an ensemble workdir adds all
  its members), for decoding; stacked and gated fusions fitted on the selection split, as in
  `evaluate`. precision_name, quantize: as experiments/generate.py's --precision, --quantize
  (int8 experts for a single model only)."""
  restored = [workdir_lib.restore_params(workdir) for workdir in workdirs]
  first = restored[0][0]
  for workdir, (config, _, _) in zip(workdirs[1:], restored[1:]):
    if config.model.to_dict() != first.model.to_dict():
      raise ValueError(f'{workdir}: its model config differs from {workdirs[0]}\'s; decoding '
                       'members together (one vmapped KV cache) needs one architecture')
  for workdir, (config, _, _) in zip(workdirs, restored):
    if len(workdirs) > 1 and ensemble.is_e3(config):
      raise ValueError(f"{workdir}: an E3 workdir (ensemble.method='e3') decodes alone: its "
                       'copies share one parameter tree, which no member axis can stack')
  name, policy = precision.inference_policy(first.precision.policy, precision_name)
  num_members = sum(config.ensemble.size for config, _, _ in restored)
  if num_members == 1:
    config, params, router_state = restored[0]
    quantized = quantize == 'int8'
    model = ensemble.build_model(config, policy, 'int8' if quantized else '')
    params = int8.quantize_expert_params(params) if quantized else params
    return Decoder(config, name, model, train.model_variables(params, router_state), {})
  if quantize != 'none':
    raise ValueError(f'--quantize={quantize}: int8 experts are for a single model, not an '
                     f'ensemble of {num_members}')

  def stacked(trees):  # each workdir's tree, members first, one after another
    trees = [tree['members'] if config.ensemble.size > 1 else jax.tree.map(lambda x: x[None], tree)
             for (config, _, _), tree in zip(restored, trees)]
    return {'members': jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)}

  if len(restored) == 1:  # one ensemble workdir: its own tree (members stacked, or E3's)
    _, params, router_state = restored[0]
  else:
    params = stacked([p for _, p, _ in restored])
    router_state = stacked([s for _, _, s in restored]) if restored[0][2] else {}
  config = _with_fusion([config for config, _, _ in restored], fusion, weights)
  model = ensemble.build_model(config, policy)
  variables = train.model_variables(params, router_state)
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  fusion_params = ensemble.fit_on_selection(config, ds, ensemble.members_fn(model, variables))
  return Decoder(config, name, model, variables,
                 dict(fusion=config.ensemble.fusion, weights=tuple(config.ensemble.weights),
                      fusion_params=fusion_params))


def _latest_step(workdir: str) -> int:
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _with_fusion(configs: Sequence[ml_collections.ConfigDict], fusion: str | None,
                 weights: Sequence[float] | None) -> ml_collections.ConfigDict:
  """The first of the workdirs' `configs` with the ensemble section describing all M members."""
  num_members = sum(c.ensemble.size for c in configs)
  config = ml_collections.ConfigDict(configs[0].to_dict())
  ens = config.ensemble
  if ens.method == 'e3' and num_members != ens.size:
    ens.update(method='deep', e3_layers=0)  # E3's copies among other members: the fusion only
  ens.size = num_members
  if fusion:
    ens.fusion = fusion
  if weights is not None:
    ens.weights = tuple(weights)
  elif len(ens.weights) != num_members:
    ens.weights = ()
  if ens.method == 'boosting' and ens.fusion != 'sum_logits':
    ens.method = 'deep'  # a boosted run scored with another fusion: validate the fusion only
  config.mesh.member = 1
  config.mesh.expert = 1
  if ens.fusion in ensemble.FITTED_FUSIONS:  # the first config's split; no member may know it
    data_lib.check_selection_split([c.data.selection_fraction for c in configs],
                                   f'the {ens.fusion} fusion', "every workdir's members")
  ensemble.validate_config(config)
  return config


def score(config: ml_collections.ConfigDict, members: ensemble.MembersFn,
          batches: list[np.ndarray], fusion_params=None) -> dict:
  """Accumulated ensemble.batch_sums of `members` over `batches` under config.ensemble.fusion."""
  ens = config.ensemble
  weights = tuple(ens.weights)

  @jax.jit
  def sums(lp, hidden, targets):
    fused = ensemble.fuse(lp, ens.fusion, weights, fusion_params, hidden)
    return ensemble.batch_sums(lp, fused, targets)

  total = None
  for batch in batches:
    lp, hidden = members(jnp.asarray(batch[:, :-1]))
    total = ensemble.add_sums(total, sums(lp, hidden, jnp.asarray(batch[:, 1:])))
  return total


def evaluate(workdirs: Sequence[str], fusion: str | None = None,
             weights: Sequence[float] | None = None, out: str | None = None,
             precision_name: str = '', quantize: str = 'none', include: str | None = None
             ) -> dict[str, Any]:
  """The JSON of `experiments/evaluate.py` for `workdirs` (see the module docstring); writes a
  reliability diagram to `out` (default: the first workdir's reliability.png). precision_name and
  quantize (train.evaluate's) apply to a single model only; accuracy and ece are then of the
  model as trained. `include` (globs, as data.include) scores only those validation files, e.g.
  one domain's: files are assigned to the validation split one by one, so they are the same files
  whatever the run trained on; a stacked or gated fit then reads those files' selection split."""
  if not workdirs:
    raise ValueError('evaluate: give at least one workdir')
  configs, members, num_members, steps = load_members(workdirs)
  if include is not None:
    for run_config in configs:
      run_config.data.include = include
  config = configs[0]
  ds = data_lib.make_dataset(config.data, config.seed, config.model.vocab_size)
  batches = ds.eval_batches(config.train.eval_steps)
  if num_members == 1:
    if fusion or weights:
      raise ValueError('--fusion and --weights need an ensemble: several workdirs, or a workdir '
                       'trained with ensemble.size > 1')
    own = train.evaluate(config, workdirs[0], precision_name, quantize)
    sums = score(_with_fusion(configs, 'mean_prob', None), members, batches)
    fused = ensemble.scores(sums['fused'], ds.bytes_per_token)
    result = {**own, 'accuracy': fused['accuracy'], 'ece': fused['ece']}
  else:
    if precision_name or quantize != 'none':
      raise ValueError('--precision and --quantize apply to a single model, not an ensemble')
    config = _with_fusion(configs, fusion, weights)
    fusion_params = ensemble.fit_on_selection(config, ds, members)
    sums = score(config, members, batches, fusion_params)
    result = ensemble.ensemble_scores(sums, ds.bytes_per_token, config.ensemble.fusion)
    result['step'] = steps[0] if len(steps) == 1 else steps
  _plot_reliability(sums, out or os.path.join(workdirs[0], RELIABILITY_FILE))
  return result


def format_table(result: dict) -> str:
  """The scores of `evaluate`'s result as an aligned text table (one row per member, fused)."""
  header = f'{"":>10} {"eval_loss":>10} {"bits/byte":>10} {"accuracy":>10} {"ece":>8}'
  def row(name, scores):
    return (f'{name:>10} {scores["eval_loss"]:>10.4f} {scores["eval_bits_per_byte"]:>10.4f} '
            f'{scores["accuracy"]:>10.4f} {scores["ece"]:>8.4f}')
  if 'members' not in result:
    return '\n'.join([header, row('model', result)])
  lines = [header] + [row(f'member {m}', s) for m, s in enumerate(result['members'])]
  lines.append(row('fused', result['fused']))
  lines.append(f'fusion {result["fused"]["fusion"]}; disagreement {result["disagreement"]:.4f}; '
               f'mutual information {result["mutual_information"]:.4f} nats')
  return '\n'.join(lines)


def print_table(result: dict) -> None:
  print(format_table(result), file=sys.stderr, flush=True)


class InferenceFlags(NamedTuple):
  """The flags `define_inference_flags` defines (absl FlagHolders)."""
  workdir: Any
  workdirs: Any
  fusion: Any
  weights: Any
  precision: Any
  quantize: Any

  def load_args(self) -> dict[str, Any]:
    """workdirs, fusion, weights, precision_name and quantize as `load_ensemble` and `evaluate`
    take them."""
    weights = None if self.weights.value is None else [float(w) for w in self.weights.value]
    return dict(workdirs=self.workdirs.value or [self.workdir.value], fusion=self.fusion.value,
                weights=weights, precision_name=self.precision.value or '',
                quantize=self.quantize.value)


def define_inference_flags(workdirs_help: str) -> InferenceFlags:
  """Defines --workdir or --workdirs (one of them required), --fusion, --weights, --precision and
  --quantize, the checkpoint-loading flags of experiments/evaluate.py and generate.py; call once,
  at the script's import (never from a library: the required pair binds every flag parse), then
  `flags.adopt_module_key_flags(evaluation)` for --helpshort to list them."""
  holders = InferenceFlags(
      workdir=flags.DEFINE_string('workdir', None, 'A training workdir.'),
      workdirs=flags.DEFINE_list('workdirs', None, workdirs_help),
      fusion=flags.DEFINE_enum('fusion', None, ensemble.FUSIONS,
                               "Fusion rule of an ensemble; default: the (first) config's."),
      weights=flags.DEFINE_list('weights', None, 'Member weights for --fusion=weighted.'),
      precision=flags.DEFINE_enum('precision', None, ['fp32', 'bf16', 'fp16'],
                                  "Compute dtype at inference; default: the run's own."),
      quantize=flags.DEFINE_enum('quantize', 'none', ['none', 'int8'],
                                 'int8: routed expert weights stored int8 (per-expert, '
                                 'per-output-channel scales), dequantised into the grouped '
                                 'matmul.'))
  flags.mark_flags_as_mutual_exclusive(['workdir', 'workdirs'], required=True)
  return holders


def _plot_reliability(sums: dict, path: str) -> None:
  """Reliability diagram: accuracy against mean top-1 confidence per bin, members and fused."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:  # optional at run time: the GPU machines lack it
    logging.warning('matplotlib is not installed: no %s', path)
    return
  figure, axes = plt.subplots(figsize=(4.5, 4.5))
  axes.plot([0, 1], [0, 1], color='0.7', linestyle='--', label='calibrated')
  num_members = len(np.asarray(sums['members']['nll']))
  if num_members > 1:
    for m in range(num_members):
      bins = ensemble.reliability_bins(jax.tree.map(lambda x, m=m: x[m], sums['members']))
      axes.plot(bins['confidence'], bins['accuracy'], marker='.', alpha=0.5,
                label=f'member {m}')
  bins = ensemble.reliability_bins(sums['fused'])
  axes.plot(bins['confidence'], bins['accuracy'], marker='o', color='black',
            label='fused' if num_members > 1 else 'model')
  axes.set(xlabel='top-1 confidence', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1),
           title=f'reliability ({ensemble.CALIBRATION_BINS} bins)')
  axes.legend(fontsize=7)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=100)
  plt.close(figure)
