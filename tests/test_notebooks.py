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

import numpy as np
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


def _brute_force_bmus(X, W, k):
    """Top-k units by cosine distance, computed the plain way."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    return np.argsort(1.0 - Xn @ Wn.T, axis=1, kind="stable")[:, :k]


def _brute_force_torus(a, b, m, n):
    """Shortest distance between units a and b over the 9 copies of an m x n grid."""
    ra, ca, rb, cb = a // n, a % n, b // n, b % n
    best = np.full(a.shape, np.inf)
    for dr in (-m, 0, m):
        for dc in (-n, 0, n):
            best = np.minimum(best, np.hypot(ra - rb - dr, ca - cb - dc))
    return best


def test_adversarial_shifts_notebook(layer_probing, tmp_path, monkeypatch):
    import pandas as pd

    from somprobe.som import SOM
    from somprobe.store import open_store

    # Notebook 02 continues notebook 01's run (its default): the model must be reused, not retrained.
    run = tmp_path / "run"
    shutil.copytree(layer_probing[0], run)
    checkpoint = (run / "model" / "checkpoint.pt").read_bytes()
    eps = 4 / 255
    params = dict(SMALL, RUN=str(run), EPS=eps, PGD_STEPS=3, ATTACK_BATCH=32)
    nb = execute("02_adversarial_shifts.ipynb", params, tmp_path, monkeypatch)
    s = summary_of(nb)
    setup = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "(reused)" in setup and (run / "model" / "checkpoint.pt").read_bytes() == checkpoint

    assert s["n"] == 50 and s["k"] == 10 and s["layers"] == ["CL1", "CL2", "CL3", "CL4"]
    acc = s["accuracy"]
    assert set(acc) == {"clean", "adv-pgd", "noise"} and all(0.0 <= v <= 1.0 for v in acc.values())
    # PGD climbs the loss of the true label: it cannot make more inputs right than it found.
    assert acc["adv-pgd"] <= acc["clean"]
    assert all(0.0 <= v <= 1.0 for v in s["success_rate"].values())
    # Both perturbations stay inside the Linf ball (float32 rounding aside) and are not empty.
    for name in ("adv-pgd", "noise"):
        assert 0.0 < s["linf"][name] <= eps + 1e-6
    half_diagonal = math.hypot(2.5, 2.5)
    assert s["max_torus_distance"] == pytest.approx(half_diagonal)
    assert 0.0 <= s["min_shift"] and s["max_shift"] <= half_diagonal + 1e-9
    assert s["shift_rows"] == 2 * 4 * 50 * 10
    assert s["shift_run_difference"] == 0.0

    # The shifts it wrote (through shift_run) against a brute-force recomputation from the run.
    shifts = pd.read_csv(run / "analysis" / "shifts.csv", dtype={"sample_id": str})
    clean = open_store(run / "codes" / "som-val")
    for pert in ("adv-pgd", "noise"):
        store = open_store(run / "codes" / pert)
        assert store.ids == clean.ids
        for layer in ("CL1", "CL4"):
            W = SOM.load(run / "soms" / f"{layer}-5x5.pt").weights.double().numpy()
            cb = _brute_force_bmus(np.asarray(clean.codes(layer), np.float64), W, 10)
            pb = _brute_force_bmus(np.asarray(store.codes(layer), np.float64), W, 10)
            expected = _brute_force_torus(cb, pb, 5, 5)
            got = (shifts.query("layer == @layer and perturbation == @pert")
                   .pivot(index="sample_id", columns="rank", values="distance")
                   .loc[clean.ids].to_numpy())
            np.testing.assert_allclose(got, expected, atol=1e-9)
            assert s["median_shift"][pert][layer] == pytest.approx(np.median(expected))


# --------------------------------------------------------------------------- notebook 05 (issue 11)
def test_geometry_detection_notebook(layer_probing, tmp_path, monkeypatch):
    import pandas as pd

    run = tmp_path / "run"
    shutil.copytree(layer_probing[0], run)
    params = dict(SMALL, RUN=str(run), SAMPLES=40, ATTACKS="fgsm,pgd", SEEDS=(0, 1),
                  N_DIRECTIONS=2, K_CURVATURES=2)
    nb = execute("05_geometry_detection.ipynb", params, tmp_path, monkeypatch)
    s = summary_of(nb)
    assert 0 < s["n_boundary"] <= 16 and s["k"] == 2
    assert s["bottom_curvature_mean"] <= s["top_curvature_mean"]
    assert s["attacks"] == ["fgsm", "pgd"]
    assert s["detectors"] == sorted(["curvature", "loss_curve", "som_distance", "input_mfs",
                                     "mahalanobis", "max_softmax"])
    assert s["score_rows"] == 2 * 6 * 2
    for v in s["auc"].values():
        assert v is None or 0.0 <= v <= 1.0
    scores = pd.read_csv(run / "detect" / "scores.csv")
    assert len(scores) == s["score_rows"]
    for a, n in s["n_success"].items():
        g = scores[scores["attack"] == a]
        assert ((g["n_train"] + g["n_test"]) == 2 * n).all()
    assert images_shown(nb) >= 3   # curvature spectrum, rho boxes, ROC (+ AUC when any)


# --------------------------------------------------------------------------- notebook 04 (issue 10)
def test_barriers_regions_notebook(layer_probing, tmp_path, monkeypatch):
    import pandas as pd

    run = tmp_path / "run"
    params = dict(RUN=str(run), DATA=SMALL["DATA"], MODEL=SMALL["MODEL"], MODEL_RUN=str(layer_probing[0]),
                  TRAIN_EPOCHS=1, PAIRS=3, ITERS=10, MAX_DEPTH=2, SPACING=0.05, EPS=32 / 255,
                  PGD_STEPS=5, TRIALS=10, SEED=0, DEVICE="cpu")
    nb = execute("04_barriers_regions.ipynb", params, tmp_path, monkeypatch)
    s = summary_of(nb)
    # The toy cases have known answers: a barrier bypassed, a hole gone round.
    assert s["toy_barrier"]["gap"] > 1 and s["toy_barrier"]["success"] and s["toy_barrier"]["rounds"] >= 1
    assert s["toy_region"]["success"] and s["toy_region"]["anchors"] > 3
    assert s["toy_region"]["length_ratio"] > 1.1
    assert set(s["pairs"]) == {"nat", "adv", "noiseadv"}
    for name in ("nat", "adv", "noiseadv"):
        paths = pd.read_csv(run / "paths" / name / "paths.csv")
        assert "regions" in set(paths["method"])
    assert set(s["convexity_share"]) == {str(k) for k in range(2, 11)}
    assert all(0.0 <= v <= 1.0 for v in s["convexity_share"].values())
    # The model was reused, not retrained, and the figures were drawn inline.
    assert not (run / "model").exists()
    assert images_shown(nb) >= 6


# --------------------------------------------------------------------------- notebook 03 (issue 9)
def test_connectivity_notebook(layer_probing, tmp_path, monkeypatch):
    import pandas as pd

    run = tmp_path / "run"
    params = dict(RUN=str(run), DATA=SMALL["DATA"], MODEL=SMALL["MODEL"], MODEL_RUN=str(layer_probing[0]),
                  TRAIN_EPOCHS=1, IMAGE_SIZE=None, SPACES=["input", "CL3"], LATENT="CL3", PAIRS=3,
                  STEPS=5, POINTS=5, DECODER_EPOCHS=1, DECODER_MAX_TRAIN=64, SEED=0, DEVICE="cpu")
    nb = execute("03_connectivity.ipynb", params, tmp_path, monkeypatch)
    s = summary_of(nb)
    assert s["pairs"] == 3 and s["misclassified_skipped"] >= 0
    assert 0 <= s["linear_ok_latent"] <= 3 and 0 <= s["neb_path_ok_latent"] <= 3
    t1 = pd.DataFrame(s["table1"])
    assert t1["space"].tolist() == ["input", "CL3"]
    assert (t1["linear"] + t1["nonlinear_only"] + t1["no_path"] == 3).all()
    # The job's files, the model copied from notebook 01's run (not retrained), decoded images.
    assert (run / "paths" / "notebook" / "paths.csv").is_file()
    assert (run / "model" / "checkpoint.pt").read_bytes() == \
        (layer_probing[0] / "model" / "checkpoint.pt").read_bytes()
    assert s["decoded"] and (run / "paths" / "notebook" / "images" / "CL3__neb.npz").is_file()
    assert images_shown(nb) >= 4   # Table 1, loss, softmax in input and CL3
