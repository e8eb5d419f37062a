"""Executes the notebooks in ``colab/`` end to end (small settings) with nbclient.

Every ``colab/*.ipynb`` runs through :func:`run_notebook` with ``ROUTEZOO_NB_SMALL=1``;
notebook-specific checks on the outputs go in ``EXPECTED_OUTPUTS``.
"""

import glob
import json
import os
import sys

import pytest

from conftest import COMPILE_FLAGS

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB_DIR = os.path.join(REPO_ROOT, "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB_DIR, "*.ipynb")))
KERNEL_NAME = "routezoo-test-python"
TIMEOUT_PER_CELL_S = 300

# name -> (substrings that must appear in the stream outputs, output mime types that must appear)
EXPECTED_OUTPUTS = {
    "quickstart.ipynb": (["----- sampled text -----", "validation bits per byte"], ["image/png"]),
    "adapters.ipynb": (["| lora r=2         |", "| mos r=4, r_eq=2  |", "weights changed by the merge",
                        "refused: adapter in"], ["image/png"]),
    "expert_parallel.ipynb": (["expert 0: devices [0, 4]", "all-to-all ops in compiled HLO", "single device|", "train loss:"], ["image/png"]),
    "routers_tour.ipynb": (["| router       | setting", "| top_k        |", "| hash         |", "| top_p        |",
                            "| smoe_dropout |", "eval_loss@k1 ", "eval_loss@k8 ", "token-id information",
                            "top_p: top_p/analysis/experts_per_token.png", "hash: hash/analysis/affinity_layer0_layer1.png"],
                           ["image/png"]),
}


def _kernel_dir(tmp_dir: str, env: dict[str, str]) -> str:
    """A Jupyter data dir with one kernel spec that runs this interpreter (the venv's),
    whatever kernels the machine has installed; returns the dir for ``JUPYTER_PATH``."""
    spec_dir = os.path.join(tmp_dir, "kernels", KERNEL_NAME)
    os.makedirs(spec_dir, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "routezoo tests",
        "language": "python",
        "env": env,
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f)
    return tmp_dir


def run_notebook(path: str, tmp_dir: str, data_dir: str) -> nbformat.NotebookNode:
    """Runs the notebook at ``path`` in a fresh kernel (cwd: the notebook's folder, small
    settings, 8 simulated CPU devices); fails on the first cell that raises. Returns the
    executed notebook."""
    pytest.importorskip("ipykernel")
    env = {
        "ROUTEZOO_NB_SMALL": "1",
        "ROUTEZOO_DATA_DIR": data_dir,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    jupyter_path = _kernel_dir(os.path.join(tmp_dir, "jupyter"), env)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = jupyter_path + (os.pathsep + old if old else "")
    try:
        nb = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            nb, kernel_name=KERNEL_NAME, timeout=TIMEOUT_PER_CELL_S, allow_errors=False,
            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"{os.path.basename(path)} failed:\n{e}", pytrace=False)
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors, f"{os.path.basename(path)}: error outputs: {errors}"
    return nb


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.output_type == "stream")


def _mime_types(nb) -> set[str]:
    return {mime for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.output_type in ("display_data", "execute_result") for mime in o.get("data", {})}


def test_notebooks_found():
    assert os.path.join(COLAB_DIR, "quickstart.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, data_dir):
    saved = nbformat.read(path, as_version=4)
    nbformat.validate(saved)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in saved.cells if c.cell_type == "code"), "save notebooks with outputs cleared"

    nb = run_notebook(path, str(tmp_path), data_dir)

    texts, mimes = EXPECTED_OUTPUTS.get(os.path.basename(path), ([], []))
    stream = _stream_text(nb)
    for t in texts:
        assert t in stream, f"{t!r} not in the outputs of {os.path.basename(path)}:\n{stream[-3000:]}"
    for mime in mimes:
        assert mime in _mime_types(nb), f"no {mime} output in {os.path.basename(path)}"
    if os.path.basename(path) == "quickstart.ipynb":
        sampled = stream.split("----- sampled text -----", 1)[1].split("------------------------")[0]
        assert sampled.strip().startswith("def"), sampled
