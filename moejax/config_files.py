"""Experiment config files: the one loader that tests, notebooks and scripts share.

A config file (experiments/configs/NAME.py) is a module with `get_config(arg=None)` returning an
ml_collections.ConfigDict; its docstring is the record of the experiment. Config files are not a
package, so they are loaded by path; experiments/train.py reads the same files through
ml_collections' --config flag. Blocks every config shares live in experiments/configs/common.py.
"""
import importlib.util
import os
import types

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'experiments', 'configs')


def config_path(name: str, next_to: str | None = None) -> str:
  """'moe_tiny' -> CONFIG_DIR/moe_tiny.py, or the moe_tiny.py beside the file `next_to` (a
  config file loading another: pass its __file__); a path ending in .py is returned as it is."""
  directory = os.path.dirname(os.path.abspath(next_to)) if next_to else CONFIG_DIR
  path = name if name.endswith('.py') else os.path.join(directory, f'{name}.py')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist (names are looked up in {directory})')
  return path


def load_module(name: str, next_to: str | None = None) -> types.ModuleType:
  """Executes the Python file `name` (a name or a path, see `config_path`) as a module."""
  path = config_path(name, next_to)
  module_name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'moejax_config_files.{module_name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(spec: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of `spec`, 'NAME[:ARG]' or 'PATH.py[:ARG]' as on the --config flag, e.g.
  get_config('moe_tiny:smoke') or get_config('moe_tiny', 'smoke')."""
  name, _, spec_arg = spec.partition(':')
  if spec_arg and arg is not None:
    raise ValueError(f'get_config({spec!r}, arg={arg!r}): give the arg once')
  return load_module(name).get_config(arg if arg is not None else (spec_arg or None))
