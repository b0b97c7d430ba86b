"""Faults and bad input (issue 8): each case failed before its fix.

Bad tensor datasets, a report on a missing run directory, the SOM importable without the network
stack, image folders with dangling symlinks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from somprobe.cli import main
from somprobe.data import load_dataset
from somprobe.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- tensor datasets -------------------------------------------------------------------------
def _images(n, dtype=np.uint8):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 8, 8)).astype(np.uint8)
    return x if dtype == np.uint8 else (x / 255.0).astype(dtype)


def _save(kind, tmp_path, images, labels):
    if kind == "npz":
        p = tmp_path / "x.npz"
        np.savez(p, images=images, labels=labels)
    elif kind == "pt":
        p = tmp_path / "x.pt"
        torch.save({"images": torch.as_tensor(images), "labels": torch.as_tensor(labels)}, p)
    else:
        p = tmp_path / "x.npy"
        np.save(p, images)
        np.save(tmp_path / "x_labels.npy", labels)
    return p


@pytest.mark.parametrize("kind", ["npz", "pt", "npy"])
@pytest.mark.parametrize("n_labels", [15, 25])
def test_tensor_label_count_must_match_image_count(tmp_path, kind, n_labels):
    p = _save(kind, tmp_path, _images(20), np.arange(n_labels) % 3)
    with pytest.raises(DataError, match=rf"20 images but {n_labels} labels"):
        load_dataset(p, split="all")


@pytest.mark.parametrize("kind", ["npz", "pt", "npy"])
def test_tensor_nan_names_first_sample(tmp_path, kind):
    x = _images(20, np.float32)
    x[7, 3, 2] = np.nan
    x[12, 0, 0] = np.inf
    p = _save(kind, tmp_path, x, np.arange(20) % 3)
    with pytest.raises(DataError) as e:
        load_dataset(p, split="all")
    msg = str(e.value)
    assert "non-finite" in msg and "index 7" in msg and "2 sample(s)" in msg
    assert "[0, 1]" not in msg  # not the out-of-range advice


def test_tensor_matching_counts_still_load(tmp_path):
    ds = load_dataset(_save("npz", tmp_path, _images(20), np.arange(20) % 3), split="all")
    assert len(ds) == 20 and ds.images([0, 19]).shape == (2, 3, 8, 8)


def test_cli_tensor_label_mismatch_exits_cleanly(tmp_path):
    p = _save("npz", tmp_path, _images(20), np.arange(25) % 3)
    res = CliRunner().invoke(main, ["extract", "--out", str(tmp_path / "run"), "--model", "test_resnet",
                                    "--data", str(p), "--split", "all", "--per-class", "0",
                                    "--image-size", "16", "--quiet", "--device", "cpu"])
    assert res.exit_code == 1 and "20 images but 25 labels" in res.output
    assert "Traceback" not in res.output


# -- report ----------------------------------------------------------------------------------
def test_report_on_missing_directory_creates_nothing(tmp_path):
    out = tmp_path / "no" / "such" / "run"
    res = CliRunner().invoke(main, ["report", "--out", str(out), "--quiet"])
    assert res.exit_code == 1 and "no run directory" in res.output
    assert not (tmp_path / "no").exists()


def test_write_report_on_missing_directory_raises(tmp_path):
    from somprobe.errors import AnalysisError
    from somprobe.report import write_report

    with pytest.raises(AnalysisError, match="nothing to report"):
        write_report(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


# -- the SOM knows no network ------------------------------------------------------------------
def test_som_imports_without_timm_or_torchvision():
    code = ("import sys, somprobe.som; from somprobe.som import SOM, Grid; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
    loaded = set(json.loads(out.strip().replace("'", '"')))
    assert "torch" in loaded  # the check itself works
    assert not loaded & {"timm", "torchvision", "torchattacks", "advertorch"}


# -- extract --split both: killed during som-val, resumed ------------------------------------------
_EXTRACT = ["extract", "--model", "test_resnet", "--data", "digits", "--per-class", "6",
            "--image-size", "16", "--batch-size", "16", "--layers", "CL1-CL4", "--quiet",
            "--device", "cpu", "--seed", "3"]


def _store_bytes(run_dir, store):
    d = run_dir / "codes" / store
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "manifest.json"}


def _kill_in(monkeypatch, store, after_rows):
    """Make StoreWriter.write of ``store`` raise KeyboardInterrupt (a kill) after ``after_rows``."""
    from somprobe.store import StoreWriter

    real = StoreWriter.write

    def write(self, start, *a, **k):
        if self.path.name == store and start >= after_rows:
            raise KeyboardInterrupt
        return real(self, start, *a, **k)

    monkeypatch.setattr(StoreWriter, "write", write)


@pytest.fixture(scope="module")
def cmd(tmp_path_factory):
    """The extract command with weights from a file: --seed then seeds only the draw (without
    weights it would seed the random init too)."""
    from somprobe.models import build_model

    p = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(build_model("test_resnet", num_classes=10, seed=0).net.state_dict(), p)
    return [*_EXTRACT, "--checkpoint", str(p)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cmd):
    out = tmp_path_factory.mktemp("whole") / "run"
    res = CliRunner().invoke(main, [*cmd, "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def test_uninterrupted_stores_record_the_seed_of_their_draw(uninterrupted):
    seeds = {s: json.loads((uninterrupted / "codes" / s / "manifest.json").read_text())["seed"]
             for s in ("som-tr", "som-val")}
    assert seeds == {"som-tr": 3, "som-val": 4}


def test_split_both_killed_in_second_store_resumes_byte_identical(tmp_path, monkeypatch, uninterrupted, cmd):
    out = tmp_path / "run"
    runner = CliRunner()
    _kill_in(monkeypatch, "som-val", 32)
    res = runner.invoke(main, [*cmd, "--out", str(out)])
    assert res.exit_code == 1 and "interrupted" in res.output
    m = json.loads((out / "codes" / "som-val" / "manifest.json").read_text())
    assert not m["complete"] and m["rows_completed"] == 32
    tr_before = (out / "codes" / "som-tr" / "manifest.json").read_text()
    monkeypatch.undo()

    res = runner.invoke(main, [*cmd, "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    for store in ("som-tr", "som-val"):
        assert _store_bytes(out, store) == _store_bytes(uninterrupted, store)
    # the finished store was passed over, not rewritten
    assert (out / "codes" / "som-tr" / "manifest.json").read_text() == tr_before
    assert json.loads((out / "codes" / "som-val" / "manifest.json").read_text())["complete"]


def test_second_store_resumes_alone_with_its_recorded_seed(tmp_path, monkeypatch, uninterrupted, cmd):
    out = tmp_path / "run"
    runner = CliRunner()
    _kill_in(monkeypatch, "som-val", 16)
    assert runner.invoke(main, [*cmd, "--out", str(out)]).exit_code == 1
    monkeypatch.undo()
    alone = [a if a != "3" else "4" for a in cmd] + ["--split", "val", "--name", "som-val"]
    res = runner.invoke(main, [*alone, "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert _store_bytes(out, "som-val") == _store_bytes(uninterrupted, "som-val")


def test_resume_refuses_a_complete_store_made_otherwise(tmp_path, uninterrupted, cmd):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    res = CliRunner().invoke(main, [*cmd, "--out", str(out), "--resume", "--stats", "max,mean"])
    assert res.exit_code == 1 and "other parameters" in res.output and "stats" in res.output
    assert "Traceback" not in res.output


# -- input sizes a model cannot take ------------------------------------------------------------
def test_swin_takes_a_small_input_through_dynamic_img_size():
    from somprobe.models import ProbedModel, build_model, check_input_size

    m = build_model("swin_tiny_patch4_window7_224", num_classes=10, image_size=64)
    check_input_size(m, 64)  # timm asserted 224 px before
    logits, acts = ProbedModel(m, "CL1-CL4")(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 10)
    assert [a.shape[-1] for a in acts.values()] == [16, 8, 4, 2]  # stride 4, 8, 16, 32


@pytest.mark.parametrize("name,size,words", [
    ("convit_tiny", 64, ("64×64", "--image-size", "224")),   # timm asserts the size
    ("levit_128s", 64, ("64×64", "--image-size", "224")),    # fixed attention biases
    ("test_convnext", 8, ("8×8", "--image-size")),            # stride-32 stages run dry
])
def test_a_size_the_model_cannot_take_is_a_model_error(name, size, words):
    from somprobe.errors import ModelError
    from somprobe.models import build_model, check_input_size

    m = build_model(name, num_classes=10, image_size=size)
    with pytest.raises(ModelError) as e:
        check_input_size(m, size)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_prints_no_traceback_for_broken_inputs(tmp_path):
    """A battery of user errors: each exits 1 with one line naming the problem, no traceback."""
    runner = CliRunner()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    bad_npz = _save("npz", tmp_path, _images(10, np.float32) * np.nan, np.arange(10) % 2)
    run = str(tmp_path / "run")
    ex = ["extract", "--quiet", "--device", "cpu", "--per-class", "1"]
    cases = [
        ([*ex, "--out", str(a_file / "run"), "--model", "test_resnet", "--data", "digits",
          "--image-size", "16"], "Not a directory"),
        ([*ex, "--out", run, "--model", "convit_tiny", "--data", "digits", "--image-size", "64"],
         "cannot take 64×64"),
        ([*ex, "--out", run, "--model", "test_resnet", "--data", str(bad_npz), "--image-size", "16"],
         "non-finite"),
        ([*ex, "--out", run, "--model", "test_resnet", "--data", str(tmp_path / "nope"),
          "--image-size", "16"], "unknown dataset"),
        ([*ex, "--out", run, "--model", "test_resnet", "--data", "digits", "--layers", "CLS1",
          "--image-size", "16"], "unknown layer"),
        ([*ex, "--out", run, "--model", "test_resnet", "--checkpoint", str(a_file), "--data",
          "digits", "--image-size", "16"], "cannot read checkpoint"),  # torch's message is multi-line
        (["fit", "--out", str(tmp_path / "empty"), "--quiet"], "somprobe extract"),
        (["shift", "--out", str(tmp_path / "empty"), "--quiet"], "somprobe fit"),
    ]
    for args, words in cases:
        res = runner.invoke(main, args)
        assert res.exit_code == 1, (args, res.output, res.exception)
        assert "Traceback" not in res.output and words in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output


# -- image folders: skipped files, symlinks ----------------------------------------------------
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "digits-sample"


def _linked_folder(tmp_path):
    """Classes 0-2 of the bundled sample as symlinks leading outside the folder (a linked
    sub-folder for class 2), one dangling link and one undecodable file."""
    root = tmp_path / "linked"
    for c in ("0", "1"):
        (root / c).mkdir(parents=True)
        for f in sorted((SAMPLE / c).iterdir()):
            (root / c / f.name).symlink_to(f)
    (root / "2").mkdir()
    (root / "2" / "more").symlink_to(SAMPLE / "2", target_is_directory=True)
    (root / "1" / "gone.png").symlink_to(tmp_path / "deleted.png")
    (root / "0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_sample_folder_is_the_sklearn_digits():
    from sklearn.datasets import load_digits

    ds = load_dataset(SAMPLE, split="all", image_size=8)
    assert len(ds) == 50 and ds.classes == [str(c) for c in range(10)]
    assert np.bincount(ds.labels).tolist() == [5] * 10
    d = load_digits()
    idx = [int(Path(i).stem) for i in ds.ids]
    assert (d.target[idx] == ds.labels).all()
    np.testing.assert_allclose(ds.images(np.arange(50))[:, 0].numpy(), d.images[idx] / 16, atol=1 / 255)


def test_folder_follows_symlinks_and_skips_dangling_ones(tmp_path):
    root = _linked_folder(tmp_path)
    ds = load_dataset(root, split="all", image_size=8)
    assert np.bincount(ds.labels).tolist() == [5, 5, 5]  # links outside the folder are followed
    assert "2/more/0002.png" in ds.ids  # a linked sub-folder too; ids are the link paths
    assert ds.skipped == 2 and ds.skipped_files == ["0/bad.png", "1/gone.png"]
    ref = load_dataset(SAMPLE, split="all", image_size=8)
    mine = ds.images([ds.ids.index("1/0001.png")])
    assert torch.equal(mine, ref.images([ref.ids.index("1/0001.png")]))


def test_strict_fails_on_a_dangling_symlink(tmp_path):
    root = _linked_folder(tmp_path)
    (root / "0" / "bad.png").unlink()
    with pytest.raises(DataError, match="dangling symlink .*gone.png"):
        load_dataset(root, split="all", strict=True)


def test_cli_records_and_prints_skipped_files(tmp_path):
    root = _linked_folder(tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["extract", "--out", str(out), "--model", "test_resnet",
                                    "--data", str(root), "--per-class", "1", "--image-size", "16",
                                    "--layers", "CL4", "--quiet", "--device", "cpu"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.count("2 unreadable file(s) skipped (0/bad.png, 1/gone.png)") == 2
    for store in ("som-tr", "som-val"):
        m = json.loads((out / "codes" / store / "manifest.json").read_text())
        assert m["skipped"] == 2 and m["skipped_files"] == ["0/bad.png", "1/gone.png"]
    res = CliRunner().invoke(main, ["extract", "--out", str(out), "--model", "test_resnet",
                                    "--data", str(root), "--strict", "--overwrite", "--quiet",
                                    "--image-size", "16", "--device", "cpu"])
    assert res.exit_code == 1 and "corrupt image" in res.output and "Traceback" not in res.output


# -- shift with a perturbed split that holds part of the clean ids --------------------------------
def test_shift_compares_shared_ids_and_counts_the_missing(tmp_path):
    import pandas as pd

    from somprobe.run import Run
    from somprobe.store import StoreWriter, open_store

    runner = CliRunner()
    out = str(tmp_path / "run")
    base = ["--out", out, "--quiet"]
    for args in (["extract", "--model", "test_resnet", "--data", "digits", "--per-class", "4",
                  "--image-size", "16", "--layers", "CL3,CL4", "--device", "cpu"],
                 ["fit", "--size", "4", "--epochs", "1", "--device", "cpu"],
                 ["attack", "--attack", "noise", "--eps", "8/255", "--device", "cpu"]):
        res = runner.invoke(main, [args[0], *base, *args[1:]], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    run = Run(out)
    full = open_store(run.codes_dir("noise"))
    keep = np.arange(0, full.n_rows, 3)[::-1]  # a third of the ids, in another order
    w = StoreWriter(run.codes_dir("noise-part"), layers_dims=full.dims, n_rows=len(keep),
                    manifest={"split": "noise-part"}, ids=[full.ids[i] for i in keep])
    w.write(0, {l: full.codes(l)[keep] for l in full.layers}, full.labels[keep], full.preds[keep])
    w.close()

    res = runner.invoke(main, ["shift", *base, "--perturbed", "noise,noise-part", "--no-figures"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    n_all, n_part = full.n_rows, len(keep)
    assert f"note: noise-part holds {n_part} of {n_all} som-val inputs; {n_all - n_part} without" \
        in res.output
    assert "note: noise holds" not in res.output
    summ = pd.read_csv(run.table("shift_summary")).set_index(["layer", "perturbation"])
    assert (summ.xs("noise-part", level=1)[["n", "n_missing"]].values == [n_part, n_all - n_part]).all()
    assert (summ.xs("noise", level=1)[["n", "n_missing"]].values == [n_all, 0]).all()
    # the shared ids have the same shifts as in the full split
    s = pd.read_csv(run.table("shifts"), dtype={"sample_id": str})
    part = s[s.perturbation == "noise-part"].set_index(["layer", "sample_id", "rank"])["distance"]
    whole = s[s.perturbation == "noise"].set_index(["layer", "sample_id", "rank"])["distance"]
    assert len(part) == n_part * 10 * 2
    pd.testing.assert_series_equal(part.sort_index(), whole.loc[part.index].sort_index())


# -- transformers without a CLS token: TOKk -------------------------------------------------------
def _tiny_vit(name, **kw):
    import timm

    from somprobe.models import NormalizedModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = timm.create_model(name, num_classes=5, img_size=32, dynamic_img_size=True, depth=3,
                                embed_dim=32, num_heads=2, **kw)
    return NormalizedModel(net, name=name, image_size=32, num_classes=5).eval()


def _tokens_after(model, x, k):
    """Brute force: the token sequence after block k, running the blocks by hand."""
    net = model.net
    t = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(model.normalize(x)))))
    for blk in net.blocks[:k]:
        t = blk(t)
    return t


@pytest.mark.parametrize("name,prefix", [("vit_base_patch16_gap_224", 0),            # pure gap
                                         ("vit_little_patch16_reg4_gap_256", 4),     # registers only
                                         ("vit_base_patch16_224", 1)])               # CLS
def test_tok_is_the_mean_patch_token_after_each_block(name, prefix):
    from somprobe.models import ProbedModel, parse_layers, probe_names

    m = _tiny_vit(name)
    assert m.net.num_prefix_tokens == prefix
    assert parse_layers("tok1-TOK3", m) == ["TOK1", "TOK2", "TOK3"]
    assert "TOK1" not in parse_layers("all", m)  # `all` stays what it was
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers = ["TOK1", "TOK3"] + (["CLS2"] if prefix == 1 else ["CL1", "CL3"])
    with torch.no_grad():
        logits, acts = ProbedModel(m, layers)(x)
        torch.testing.assert_close(logits, m(x))
        for k in (1, 3):
            ref = _tokens_after(m, x, k)[:, prefix:].mean(dim=1)
            torch.testing.assert_close(acts[f"TOK{k}"], ref, rtol=1e-5, atol=1e-5)
            # gap ViTs: timm's own pooling of those tokens (fc_norm of their mean)
            if m.net.global_pool == "avg":
                own = m.net.forward_head(_tokens_after(m, x, k), pre_logits=True)
                torch.testing.assert_close(m.net.fc_norm(acts[f"TOK{k}"]), own, rtol=1e-5, atol=1e-5)
        # CLS / CL probes taken in the same pass equal those of their own pass
        others = [l for l in layers if not l.startswith("TOK")]
        _, alone = ProbedModel(m, others)(x)
        for l in others:
            torch.testing.assert_close(acts[l], alone[l])
    if prefix == 1:
        assert probe_names(m) == ["CLS1", "CLS2", "CLS3"]
    else:
        assert probe_names(m) == ["CL1", "CL2", "CL3"]  # patch grids of the last blocks


def test_tok_probes_are_refused_on_conv_nets():
    from somprobe.errors import ModelError
    from somprobe.models import build_model, parse_layers

    with pytest.raises(ModelError, match="unknown layer 'TOK1'"):
        parse_layers("TOK1", build_model("test_resnet", num_classes=3))


def test_extract_says_what_cl_means_without_a_cls_token(tmp_path):
    out = tmp_path / "run"
    base = ["extract", "--out", str(out), "--model", "vit_dwee_patch16_reg1_gap_256", "--data",
            "digits", "--split", "val", "--per-class", "1", "--image-size", "32", "--quiet",
            "--device", "cpu"]
    res = CliRunner().invoke(main, base, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert ("note: vit_dwee_patch16_reg1_gap_256 has no CLS token: CL1, CL2, CL3, CL4 are its "
            "patch-token grids after blocks 11, 12, 13, 14 (of 14)") in res.output
    res = CliRunner().invoke(main, [*base, "--layers", "TOK1-TOK14", "--name", "tok"],
                             catch_exceptions=False)
    assert res.exit_code == 0 and "note:" not in res.output
    from somprobe.store import open_store

    st = open_store(out / "codes" / "tok", validate=True)
    assert st.layers == [f"TOK{i}" for i in range(1, 15)] and set(st.dims.values()) == {256}


def test_train_records_and_prints_skipped_files(tmp_path):
    root = _linked_folder(tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--out", str(out), "--model", "test_resnet", "--data",
                                    str(root), "--epochs", "1", "--image-size", "16", "--quiet",
                                    "--device", "cpu"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "2 unreadable file(s) skipped" in res.output
    meta = json.loads((out / "model" / "meta.json").read_text())
    assert meta["skipped_files"] == ["0/bad.png", "1/gone.png"]
