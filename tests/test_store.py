"""Code store: streaming writes, atomic manifest, resume, validated loads."""
import json

import numpy as np
import pytest

from somprobe.errors import StoreError
from somprobe.store import CodeStore, StoreWriter, layer_file, open_store

DIMS = {"CL1": 8, "module:layer1.0": 3}
N = 10


def _data(seed=0):
    rng = np.random.default_rng(seed)
    codes = {k: rng.normal(size=(N, d)).astype(np.float32) for k, d in DIMS.items()}
    labels = rng.integers(0, 3, N)
    preds = rng.integers(0, 3, N)
    ids = [f"img{i}" for i in range(N)]
    return codes, labels, preds, ids


def _writer(path, ids, **kw):
    return StoreWriter(path, layers_dims=DIMS, n_rows=N, ids=ids,
                       manifest={"model": "m", "stats": ["max"], "split": "som-tr"}, **kw)


def _write(w, codes, labels, preds, starts):
    for s in starts:
        e = min(s + 4, N)
        w.write(s, {k: v[s:e] for k, v in codes.items()}, labels[s:e], preds[s:e])


def test_roundtrip(tmp_path):
    codes, labels, preds, ids = _data()
    w = _writer(tmp_path / "s", ids)
    _write(w, codes, labels, preds, [0, 4, 8])
    store = w.close()
    assert isinstance(store, CodeStore)
    assert store.layers == list(DIMS) and store.dims == DIMS and store.n_rows == N
    for k in DIMS:
        got = store.codes(k)
        assert isinstance(got, np.memmap) and got.dtype == np.float32
        np.testing.assert_array_equal(got, codes[k])
    np.testing.assert_array_equal(store.labels, labels)
    np.testing.assert_array_equal(store.preds, preds)
    assert store.ids == ids
    assert (tmp_path / "s" / "module_layer1.0.npy").is_file()
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["complete"] and m["rows_completed"] == N and m["model"] == "m"
    assert set(m["versions"]) >= {"torch", "numpy", "timm", "python"}
    # the arrays are ordinary .npy files
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "CL1.npy"), codes["CL1"])
    # no temporary files left behind
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_manifest_tracks_rows_and_resume(tmp_path):
    codes, labels, preds, ids = _data()
    path = tmp_path / "s"
    w = _writer(path, ids)
    _write(w, codes, labels, preds, [0, 4])
    m = json.loads((path / "manifest.json").read_text())
    assert m["rows_completed"] == 8 and not m["complete"]
    del w  # "crash": never closed
    with pytest.raises(StoreError, match="incomplete.*--resume"):
        open_store(path)
    with pytest.raises(StoreError, match="pass --resume to continue it or --overwrite"):
        _writer(path, ids)
    w = _writer(path, ids, resume=True)
    assert w.rows_done == 8
    with pytest.raises(StoreError, match="in order"):
        w.write(0, {k: v[:4] for k, v in codes.items()}, labels[:4], preds[:4])
    _write(w, codes, labels, preds, [8])
    store = w.close()
    for k in DIMS:
        np.testing.assert_array_equal(store.codes(k), codes[k])
    np.testing.assert_array_equal(store.labels, labels)


def test_resume_refuses_other_parameters(tmp_path):
    codes, labels, preds, ids = _data()
    path = tmp_path / "s"
    _write(_writer(path, ids), codes, labels, preds, [0])
    # same parameters in other Python types (tuple, numpy int) still match
    w = StoreWriter(path, layers_dims={k: np.int64(v) for k, v in DIMS.items()}, n_rows=N, ids=ids,
                    resume=True, manifest={"model": "m", "stats": ("max",), "split": "som-tr"})
    assert w.rows_done == 4
    with pytest.raises(StoreError, match="parameters differ.*model"):
        StoreWriter(path, layers_dims=DIMS, n_rows=N, ids=ids, resume=True,
                    manifest={"model": "other", "stats": ["max"], "split": "som-tr"})
    with pytest.raises(StoreError, match="ids_sha256"):
        _writer(path, ids[::-1], resume=True)
    with pytest.raises(StoreError, match="dims"):
        StoreWriter(path, layers_dims={"CL1": 9, "module:layer1.0": 3}, n_rows=N, ids=ids, resume=True,
                    manifest={"model": "m", "stats": ["max"], "split": "som-tr"})


def test_complete_store_refuses_unless_overwrite(tmp_path):
    codes, labels, preds, ids = _data()
    path = tmp_path / "s"
    w = _writer(path, ids)
    _write(w, codes, labels, preds, [0, 4, 8])
    w.close()
    (path / "keep.txt").write_text("user file")
    with pytest.raises(StoreError, match="complete code store; pass --overwrite"):
        _writer(path, ids)
    with pytest.raises(StoreError, match="nothing to resume"):
        _writer(path, ids, resume=True)
    codes2, labels2, preds2, _ = _data(seed=1)
    w = _writer(path, ids, overwrite=True)
    assert w.rows_done == 0
    _write(w, codes2, labels2, preds2, [0, 4, 8])
    store = w.close()
    np.testing.assert_array_equal(store.codes("CL1"), codes2["CL1"])
    assert (path / "keep.txt").read_text() == "user file"  # only the store's own files go


def test_close_before_all_rows(tmp_path):
    codes, labels, preds, ids = _data()
    w = _writer(tmp_path / "s", ids)
    _write(w, codes, labels, preds, [0])
    with pytest.raises(StoreError, match="only 4 of 10 rows"):
        w.close()


def test_writer_bad_input(tmp_path):
    codes, labels, preds, ids = _data()
    with pytest.raises(StoreError, match="0 samples"):
        StoreWriter(tmp_path / "a", layers_dims=DIMS, n_rows=0, ids=[], manifest={})
    with pytest.raises(StoreError, match="not unique"):
        _writer(tmp_path / "b", ["x"] * N)
    w = _writer(tmp_path / "c", ids)
    with pytest.raises(StoreError, match="width"):
        w.write(0, {"CL1": codes["CL1"][:4, :5], "module:layer1.0": codes["module:layer1.0"][:4]},
                labels[:4], preds[:4])


def test_open_missing_says_extract(tmp_path):
    with pytest.raises(StoreError, match="run `somprobe extract`"):
        open_store(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a code store"):
        open_store(tmp_path / "empty")


@pytest.fixture()
def complete(tmp_path):
    codes, labels, preds, ids = _data()
    w = _writer(tmp_path / "s", ids)
    _write(w, codes, labels, preds, [0, 4, 8])
    w.close()
    return tmp_path / "s"


def test_validate_names_bad_file(complete):
    open_store(complete, validate=True)
    arr = np.load(complete / "CL1.npy")
    arr[3, 2] = np.nan
    np.save(complete / "CL1.npy", arr)
    store = open_store(complete)
    with pytest.raises(StoreError, match=r"CL1\.npy holds non-finite.*row 3.*'img3'"):
        store.codes("CL1")
    with pytest.raises(StoreError, match=r"CL1\.npy"):
        open_store(complete, validate=True)


def test_validate_dtype_shape_missing(complete):
    np.save(complete / layer_file("module:layer1.0"), np.zeros((N, 3), np.float64))
    with pytest.raises(StoreError, match=r"module_layer1\.0\.npy has dtype float64"):
        open_store(complete).codes("module:layer1.0")
    np.save(complete / "labels.npy", np.zeros(N - 1, np.int64))
    with pytest.raises(StoreError, match=r"labels\.npy has shape \(9,\)"):
        open_store(complete).labels
    (complete / "preds.npy").unlink()
    with pytest.raises(StoreError, match=r"missing file .*preds\.npy"):
        open_store(complete).preds
    (complete / "ids.json").write_text('["a"]')
    with pytest.raises(StoreError, match=r"ids\.json holds 1 ids"):
        open_store(complete).ids
    with pytest.raises(StoreError, match="stored layers: CL1"):
        open_store(complete).codes("CL9")
    (complete / "CL1.npy").write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"cannot read .*CL1\.npy"):
        open_store(complete).codes("CL1")


def test_memory_stays_flat_while_writing(tmp_path):
    # rows are mapped batch by batch: the writer keeps no array of the whole store
    n, d = 2000, 512
    w = StoreWriter(tmp_path / "big", layers_dims={"CL4": d}, n_rows=n, ids=[str(i) for i in range(n)],
                    manifest={})
    block = np.ones((100, d), np.float32)
    for s in range(0, n, 100):
        w.write(s, {"CL4": block * s}, np.zeros(100, np.int64), np.zeros(100, np.int64))
    assert not any(isinstance(v, np.ndarray) for v in vars(w).values())
    store = w.close()
    assert store.codes("CL4")[1999, 0] == 1900.0
