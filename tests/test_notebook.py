"""The Colab notebook runs top to bottom on CPU (8 fake devices) with a small preset."""

import json
import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.support import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "colab_tpu.ipynb")
KERNEL_NAME = "pcjax-test-python"


def _install_kernelspec(directory) -> None:
    """A kernelspec whose interpreter is this test's Python (the venv), found via JUPYTER_PATH."""
    spec_dir = directory / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pcjax test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def test_notebook_is_committed_with_a_cpu_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    # Outputs of a CPU run are committed (with the expected numbers written beside them).
    for cell in code_cells:
        assert cell.outputs, cell.source[:60]
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:60]
    text = "\n".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "")
        for cell in code_cells
        for o in cell.outputs
    )
    assert "Not on Colab" in text and "platform cpu" in text and "train/loss" in text
    notes = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert "Expected" in notes and "edit `REPO_URL`" in nb.cells[0].source
    code = "\n".join(cell.source for cell in code_cells)
    assert '"google.colab" in sys.modules' in code
    assert "REPO_URL" in code and "PCJAX_NOTEBOOK_STEPS" in code
    assert "loop.train_and_evaluate(" in code and "analysis.layerwise_separation(" in code
    # Install: pcjax without its pins; tensorflow-cpu only where no TensorFlow exists; CUDA
    # jax only where the runtime has none.
    assert 'pip("--no-deps", REPO_URL)' in code
    assert 'if importlib.util.find_spec("tensorflow") is None:' in code
    assert "elif on_gpu and not cuda_jax:" in code
    # Everything comes from pcjax: no model, optimiser or training loop of its own (the install
    # cell names packages, so it is left out of this check).
    body = "\n".join(cell.source for cell in code_cells[1:])
    for forbidden in ("flax", "nn.Module", "optax", "value_and_grad", "jax.grad", "model.apply"):
        assert forbidden not in body, forbidden
    assert not re.search(r"^\s*class\s(?!TrainingProgress)", body, re.MULTILINE)


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    _install_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PCJAX_NOTEBOOK_STEPS", "30")
    monkeypatch.setenv("PCJAX_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    # The kernel inherits conftest's environment: CPU only, 8 fake devices; it trains the
    # full-width net for 30 steps, so its programs are compiled at XLA's own level (alone on 2
    # cores: 37 s against 46 s at -O0).
    assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", xla.xla_flags(8, optimize=True))
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=900,  # per cell: generous, for a loaded 2-core machine
        resources={"metadata": {"path": str(run_dir)}},
    )
    # Alone on 2 cores the notebook runs in about 2 min; each cell must finish within `timeout`.
    # No wall-clock assertion: under `pytest -n 2` its time depends on the other worker's load.
    client.execute()  # raises CellExecutionError if any cell errors

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    text = "\n".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "")
        for cell in code
        for o in cell.outputs
    )
    assert "Not on Colab" in text  # the install step was skipped
    assert "8 device(s), platform cpu" in text
    assert "30 steps on 8 device(s)" in text
    # Final cell: the separation table (a row per layer) and the plot.
    final = code[-1].outputs
    table = "".join(o.get("text", "") for o in final if o.output_type == "stream")
    assert "between/within (train)" in table and "NCM acc. (test)" in table
    assert "NC1 (train)" in table
    for layer in ("input", "block0", "block1", "block2", "head/bn"):
        assert any(line.startswith(layer) for line in table.splitlines()), layer
    assert any("image/png" in o.get("data", {}) for o in final if o.output_type == "display_data")
    assert (tmp_path / "workdir" / "checkpoints" / "30").exists()
