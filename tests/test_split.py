"""models.split_model across timm families: tail(head(x)) == model(x), gradients reach z."""
import pytest
import torch

from somprobe.errors import ModelError
from somprobe.models import NormalizedModel, ProbedModel, build_model, split_model

torch.set_num_threads(1)

# tiny random-init configs of each family timm lists with feature_info (name, overrides)
FAMILIES = {
    "resnet": ("test_resnet", {}),
    "resnext": ("resnext26ts", {"channels": (16, 24, 32, 48), "stem_chs": 16}),
    "convnext": ("test_convnext", {}),
    "regnet": ("regnetx_002", {}),
    "efficientnet": ("test_efficientnet", {}),
    "mobilenet": ("mobilenetv3_small_050", {}),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1)}),
    "vgg": ("vgg11", {"mlp_ratio": 1 / 64}),
}


def _tiny(name, overrides, size=32, seed=0):
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            net = timm.create_model(name, pretrained=False, num_classes=5, **overrides)
        except TypeError:  # an override this timm version does not take: default config
            net = timm.create_model(name, pretrained=False, num_classes=5)
    return NormalizedModel(net, name=name, image_size=size, num_classes=5).eval()


def _x(n=3, s=32, seed=0):
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _assert_split(model, layer, x, probe=True):
    head, tail = split_model(model, layer)
    with torch.no_grad():
        want = model(x)
        z = head(x)
        torch.testing.assert_close(tail(z), want, rtol=1e-4, atol=1e-4)
        if probe:
            torch.testing.assert_close(z, ProbedModel(model, layer)(x)[1][layer])
    # gradients flow through the tail to the latent (paths optimise z)
    z = z.detach().requires_grad_(True)
    tail(z)[:, 0].sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # the tail takes any batch of latents, not only the head's
    with torch.no_grad():
        torch.testing.assert_close(tail(z[:1].detach()), want[:1], rtol=1e-4, atol=1e-4)
    return z


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_conv_families(family):
    name, overrides = FAMILIES[family]
    model = _tiny(name, overrides)
    x = _x()
    shapes = [tuple(_assert_split(model, f"CL{k}", x).shape[1:]) for k in range(1, 5)]
    # four distinct stages, each at most as wide spatially as the one before
    assert all(a[-1] >= b[-1] for a, b in zip(shapes, shapes[1:]))
    assert len(set(shapes)) == 4


@pytest.mark.parametrize("name,overrides", [
    ("test_vit", {}),
    ("deit_tiny_patch16_224", {"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 8}),
    ("deit_tiny_distilled_patch16_224", {"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 8}),
])
def test_split_vit_deit_cls(name, overrides):
    model = _tiny(name, {**overrides, "dynamic_img_size": True})
    x = _x()
    for k in (1, 3):
        head, tail = split_model(model, f"CLS{k}")
        with torch.no_grad():
            z = head(x)
            torch.testing.assert_close(tail(z), model(x), rtol=1e-4, atol=1e-4)
            # latent = full token sequence; its first token is the CLS probe
            torch.testing.assert_close(z[:, 0], ProbedModel(model, f"CLS{k}")(x)[1][f"CLS{k}"])
        z = z.detach().requires_grad_(True)
        tail(z).sum().backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_split_module_probes():
    resnet = build_model("test_resnet", num_classes=5, image_size=32)
    vit = build_model("test_vit", num_classes=5, image_size=32)
    x = _x()
    _assert_split(resnet, "module:layer2", x)
    _assert_split(resnet, "module:layer3.0", x)
    _assert_split(vit, "module:blocks.2", x)
    # inside a residual branch the shortcut bypasses the module: not a cut, refused with the fix
    with pytest.raises(ModelError, match=r"not a cut.*CL1–CL4.*module:layer2"):
        split_model(resnet, "module:layer2.0.conv1")


def test_split_unsupported_names_what_is_supported():
    resnet = build_model("test_resnet", num_classes=5, image_size=32)
    with pytest.raises(ModelError, match="valid layers: CL1, CL2, CL3, CL4"):
        split_model(resnet, "CL7")
    with pytest.raises(ModelError, match="close module names"):
        split_model(resnet, "module:layer9")
    with pytest.raises(ModelError, match="NormalizedModel"):
        split_model(resnet.net, "CL1")


def test_hook_tail_equals_clean_tail_on_resnet():
    # the generic mechanism and the clean ResNet split agree (both against model(x) above too)
    from somprobe.models import _HookTail, _ResNetTail

    resnet = build_model("test_resnet", num_classes=5, image_size=32)
    head, _ = split_model(resnet, "CL2")
    with torch.no_grad():
        z = head(_x())
        torch.testing.assert_close(_HookTail(resnet, "layer2", 32)(z), _ResNetTail(resnet, 2)(z))


@pytest.mark.parametrize("name,overrides", [
    ("test_vit", {}),  # CLS token: TOK<k> next to CLS<k>
    ("vit_tiny_patch16_224", {"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 8,
                              "class_token": False, "global_pool": "avg"}),  # no CLS token
])
def test_split_vit_tok_and_gap_cl(name, overrides):
    from somprobe.models import token_probe_names

    model = _tiny(name, {**overrides, "dynamic_img_size": True})
    x = _x()
    p = int(model.net.num_prefix_tokens)
    for layer in token_probe_names(model)[:3:2]:
        head, tail = split_model(model, layer)
        with torch.no_grad():
            z = head(x)
            torch.testing.assert_close(tail(z), model(x), rtol=1e-4, atol=1e-4)
            # latent = all tokens; the mean of its patch tokens is the TOK probe
            torch.testing.assert_close(z[:, p:].mean(1), ProbedModel(model, layer)(x)[1][layer])
    if p == 0:  # a ViT without CLS token probes CL1-CL4 (its last blocks): hook split on the block
        from somprobe.models import probe_names

        for layer in probe_names(model)[::2]:
            _assert_split(model, layer, x, probe=False)
