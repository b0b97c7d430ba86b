"""Execute the notebooks on tiny settings so they never rot.

Each notebook's first code cell (tagged ``parameters``) is replaced by small settings (tiny timm
model, sklearn digits, 5 per class, 5x5 SOMs, 1 training epoch, 3 PGD steps, run directory under
``tmp_path``); the notebook runs in a fresh ``python3`` kernel with ``tmp_path`` as working
directory, no cell may raise, and the JSON summary printed by the last cell is checked.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"

SMALL = dict(DATA="digits", MODEL="test_resnet", MODEL_RUN=None, TRAIN_EPOCHS=1, MAX_TRAIN=None,
             LAYERS="CL1-CL4", PER_CLASS=5, SOM_SIZE=5, SOM_EPOCHS=1, SOM_BATCH=10, SEED=0,
             DEVICE="cpu")


def _kernel_available() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        return False
    return True


pytestmark = pytest.mark.skipif(not _kernel_available(),
                                reason=f"no Jupyter kernel spec {KERNEL!r} (pip install ipykernel)")


def _parameters_cell(nb):
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in cell.metadata.get("tags", []), "first code cell must be the parameters cell"
    return cell


def _parameter_names(source: str) -> set[str]:
    names = set()
    for line in source.splitlines():
        line = line.split("#", 1)[0]
        if "=" in line and not line.startswith((" ", "\t")):
            names.add(line.split("=", 1)[0].strip())
    return names


def execute(name: str, params: dict, cwd: Path, monkeypatch):
    """Run notebook ``name`` with its parameters cell replaced; return the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = _parameters_cell(nb)
    # Every parameter the test sets must exist in the notebook (and the reverse), so a renamed
    # parameter cannot silently fall back to the full, slow setting.
    assert _parameter_names(cell.source) == set(params), (
        f"{name}: parameters {sorted(_parameter_names(cell.source))} != test's {sorted(params)}")
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    # The kernel is a child process: it inherits the environment and imports this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    for c in nb.cells:
        if c.cell_type == "code":
            errors = [o for o in c.get("outputs", []) if o.get("output_type") == "error"]
            assert not errors, f"{name}: cell raised {errors[0]['ename']}: {errors[0]['evalue']}"
    return nb


def summary_of(nb) -> dict:
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")
    return json.loads(text.strip().splitlines()[-1])


def images_shown(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_notebooks_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{path.name} has outputs"


@pytest.fixture(scope="module")
def layer_probing(tmp_path_factory):
    """Notebook 01 executed once on tiny settings; later tests continue from its run."""
    cwd = tmp_path_factory.mktemp("nb01")
    mp = pytest.MonkeyPatch()
    try:
        nb = execute("01_layer_probing.ipynb", dict(SMALL, RUN=str(cwd / "run")), cwd, mp)
    finally:
        mp.undo()
    return cwd / "run", nb


def test_layer_probing_notebook(layer_probing):
    run, nb = layer_probing
    s = summary_of(nb)
    assert s["layers"] == ["CL1", "CL2", "CL3", "CL4"]
    assert s["som_size"] == "5x5"
    # digits has 10 classes; 5 per class in SOM-tr and SOM-val.
    assert s["n"] == {"som-tr": 50, "som-val": 50}
    assert 0.0 <= s["val_accuracy"] <= 1.0 and 0.0 <= s["som_val_accuracy"] <= 1.0
    # A vector code is 4 statistics per channel of the stage's output (timm's feature_info).
    import timm

    stages = timm.create_model("test_resnet", pretrained=False).feature_info[-4:]
    assert [s["dims"][l] for l in s["layers"]] == [4 * f["num_chs"] for f in stages]
    half_diagonal = math.hypot(2.5, 2.5)
    assert s["max_torus_distance"] == pytest.approx(half_diagonal)
    for split in ("som-tr", "som-val"):
        for layer in s["layers"]:
            assert 0.0 <= s["median_dclass"][split][layer] <= half_diagonal
    for layer in s["layers"]:
        assert 0.0 <= s["weight_mean_cosine_distance"][layer] <= 2.0
        assert 0.0 <= s["quantization_error_som_val"][layer] <= 2.0
    # The run it wrote is an ordinary run directory, in tmp_path and nowhere else.
    assert (run / "model" / "checkpoint.pt").is_file()
    assert len(list((run / "soms").glob("CL*-5x5.pt"))) == 4
    assert (run / "analysis" / "dclass.csv").is_file()
    # Figures are drawn inline: curves, density, class BMUs, D_class, weights x2, centres, Supp 3.
    assert images_shown(nb) >= 8
