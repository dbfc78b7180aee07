"""Every notebook under notebooks/ runs top to bottom without a cell error.

The kernel is a separate process on one CPU device: it sees none of conftest.py's jax settings
(only the XLA_FLAGS it inherits through the environment), as a researcher's kernel would not.
"""
import glob
import os
import sys

from absl.testing import parameterized
from ipykernel.kernelspec import make_ipkernel_cmd
from jupyter_client import kernelspec
from jupyter_client.manager import AsyncKernelManager
import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'notebooks', '**', '*.ipynb'), recursive=True))


class ThisPythonKernelManager(AsyncKernelManager):
  """Runs ipykernel in this interpreter (sys.executable), whatever kernelspecs are installed.

  A user- or system-level 'python3' kernelspec can point at another Python without moejax.
  """

  @property
  def kernel_spec(self):
    return kernelspec.KernelSpec(argv=make_ipkernel_cmd(executable=sys.executable),
                                 display_name='python3', language='python')


@pytest.mark.slow
class NotebooksTest(parameterized.TestCase):

  def test_found_notebooks(self):
    self.assertNotEmpty(NOTEBOOKS)

  @parameterized.named_parameters(
      (os.path.relpath(path, os.path.join(REPO, 'notebooks')), path) for path in NOTEBOOKS)
  def test_runs_without_errors(self, path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name='python3', kernel_manager_class=ThisPythonKernelManager, timeout=300,
        resources={'metadata': {'path': REPO}})
    client.execute()  # raises CellExecutionError, naming the cell, on any cell error
