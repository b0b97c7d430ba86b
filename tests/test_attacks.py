"""Attacks: equality with advertorch 0.2.3, constraints, model state, bad input, real data."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from somprobe import attacks as A
from somprobe.errors import AttackError

torch.set_num_threads(1)


class Wrapped(nn.Module):
    """Minimal stand-in for somprobe's NormalizedModel: pixels in [0, 1], normalisation inside."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def _model(dtype=torch.float64, seed=0):
    import timm

    torch.manual_seed(seed)
    return Wrapped(timm.create_model("test_resnet", num_classes=10), 10).to(dtype)


@pytest.fixture(scope="module")
def adv():
    return A.import_advertorch_attacks()


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 16, 16, generator=g, dtype=torch.float64)
    x[0, :, :5] = 0.0  # pixels on the clip boundary exercise the clamping order
    x[1, :, :5] = 1.0
    y = torch.randint(0, 10, (5,), generator=g)
    return x, y


# ------------------------------------------------------------------ equality with advertorch
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("targeted", [False, True])
def test_linf_pgd_equals_advertorch(adv, batch, dtype, targeted):
    x, y = batch
    x = x.to(dtype)
    model = _model(dtype).eval()  # advertorch does not switch modes itself
    eps, steps = 8 / 255, 8
    torch.manual_seed(123)
    ours = A.pgd(model, x, y, eps=eps, steps=steps, step_size=eps / 4, targeted=targeted)
    torch.manual_seed(123)
    ref = adv.LinfPGDAttack(model, eps=eps, nb_iter=steps, eps_iter=eps / 4,
                            targeted=targeted).perturb(x, y)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, x)


def test_linf_pgd_paper_defaults_equal_advertorch(adv, batch):
    x, y = batch
    model = _model().eval()
    torch.manual_seed(7)
    ours = A.pgd(model, x, y, steps=12)  # eps 4/255, eps_iter (4/255)*(2/100), rand_init
    torch.manual_seed(7)
    ref = adv.LinfPGDAttack(model, eps=4 / 255, nb_iter=12, eps_iter=(4 / 255) * (2 / 100),
                            rand_init=True, clip_min=0.0, clip_max=1.0).perturb(x, y)
    assert (ours - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("targeted", [False, True])
def test_l2_pgd_equals_advertorch(adv, batch, targeted):
    x, y = batch
    model = _model().eval()
    torch.manual_seed(5)
    ours = A.pgd(model, x, y, eps=0.5, steps=8, step_size=0.1, norm="l2", targeted=targeted)
    torch.manual_seed(5)
    ref = adv.L2PGDAttack(model, eps=0.5, nb_iter=8, eps_iter=0.1, targeted=targeted).perturb(x, y)
    assert torch.equal(ours, ref)


def test_no_rand_init_and_fgsm_equal_advertorch(adv, batch):
    x, y = batch
    model = _model().eval()
    ours = A.pgd(model, x, y, eps=0.05, steps=4, step_size=0.01, rand_init=False)
    ref = adv.LinfPGDAttack(model, eps=0.05, nb_iter=4, eps_iter=0.01, rand_init=False).perturb(x, y)
    assert torch.equal(ours, ref)
    ours = A.fgsm(model, x, y, eps=0.03)
    ref = adv.GradientSignAttack(model, eps=0.03).perturb(x, y)
    assert torch.equal(ours, ref)


def test_advertorch_backend_matches_builtin(batch):
    x, y = batch
    model = _model()
    torch.manual_seed(11)
    ours = A.pgd(model, x, y, eps=0.03, steps=5, step_size=0.01)
    torch.manual_seed(11)
    theirs = A.pgd(model, x, y, eps=0.03, steps=5, step_size=0.01, backend="advertorch")
    assert torch.equal(ours, theirs)


def test_loss_is_summed_like_advertorch(batch):
    # The summed loss gives each sample its own gradient; a mean loss changes L2 steps only
    # through advertorch's 1e-6 floor, so compare gradients directly.
    x, y = batch
    model = _model().eval()
    xg = x.clone().requires_grad_()
    (g_sum,) = torch.autograd.grad(nn.CrossEntropyLoss(reduction="sum")(model(xg), y), xg)
    adv_x = A.pgd(model, x, y, eps=0.02, steps=1, step_size=0.02, rand_init=False)
    expect = (x + 0.02 * g_sum.sign()).clamp(0, 1)
    assert torch.equal(adv_x, expect)


# ------------------------------------------------------------------ randomness
def test_generator_is_local_and_reproducible(batch):
    x, y = batch
    model = _model()
    state = torch.get_rng_state()
    a = A.pgd(model, x, y, eps=0.03, steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # global generator untouched
    b = A.pgd(model, x, y, eps=0.03, steps=2, generator=torch.Generator().manual_seed(3))
    c = A.pgd(model, x, y, eps=0.03, steps=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the start is the advertorch draw, from the generator: uniform(-1, 1) * eps, clipped
    start = A.pgd(model, x, y, eps=0.03, steps=1, step_size=1e-30,
                  generator=torch.Generator().manual_seed(3))
    u = torch.empty_like(x).uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(start, (x + u * 0.03).clamp(0, 1), atol=1e-12)


# ------------------------------------------------------------------ constraints and effect
def test_pgd_respects_balls_and_raises_loss(batch):
    x, y = batch
    model = _model()
    ce = nn.CrossEntropyLoss(reduction="none")
    with torch.no_grad():
        clean = ce(model.eval()(x), y)
    xa = A.pgd(model, x, y, eps=0.05, steps=10, step_size=0.01)
    assert (xa - x).abs().max() <= 0.05 + 1e-12
    assert xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        assert (ce(model(xa), y) > clean).all()
    x2 = A.pgd(model, x, y, eps=0.3, steps=10, step_size=0.1, norm="l2")
    assert ((x2 - x).flatten(1).norm(dim=1) <= 0.3 * (1 + 1e-9)).all()
    target = (y + 1) % 10
    xt = A.pgd(model, x, target, eps=0.05, steps=10, step_size=0.01, targeted=True)
    with torch.no_grad():
        assert (ce(model(xt), target) < ce(model(x), target)).all()


def test_missing_labels_use_predictions(batch):
    x, _ = batch
    model = _model()
    pred = A.predict_labels(model, x)
    torch.manual_seed(2)
    a = A.pgd(model, x, None, eps=0.03, steps=3)
    torch.manual_seed(2)
    b = A.pgd(model, x, pred, eps=0.03, steps=3)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ model state
class _ModeRecorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("backend", ["builtin", "advertorch"])
@pytest.mark.parametrize("preset_grads", [False, True])
def test_eval_mode_and_param_grads_untouched(batch, backend, preset_grads):
    x, y = batch
    model = _ModeRecorder(_model())
    model.train()
    model.inner.net.fc.eval()  # a mixed state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    if preset_grads:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
    model.inner.net.conv1[0].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    A.pgd(model, x, y, eps=0.03, steps=3, backend=backend)
    A.fgsm(model, x, y, eps=0.03)
    assert model.seen and not any(model.seen)  # eval during every forward
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for p in model.parameters():
        if preset_grads:
            assert torch.equal(p.grad, torch.full_like(p, 0.25))
        else:
            assert p.grad is None


# ------------------------------------------------------------------ advertorch import shim
def test_shim_sets_symbol_on_the_module_not_the_function():
    A._restore_zero_gradients()
    module = sys.modules["torch.autograd.gradcheck"]
    assert callable(module.zero_gradients)
    t = torch.ones(3, requires_grad=True)
    t.sum().backward()
    module.zero_gradients(t)
    assert torch.equal(t.grad, torch.zeros(3))
    assert A.advertorch_available()


def test_advertorch_not_importable_is_clear_and_builtin_runs(batch, monkeypatch):
    x, y = batch
    model = _model()
    monkeypatch.setitem(sys.modules, "advertorch", None)  # makes `import advertorch…` fail
    monkeypatch.setitem(sys.modules, "advertorch.attacks", None)
    with pytest.raises(AttackError, match="backend 'advertorch' is not available.*builtin"):
        A.pgd(model, x, y, eps=0.03, steps=2, backend="advertorch")
    assert not A.advertorch_available()
    out = A.pgd(model, x, y, eps=0.03, steps=2)
    assert out.shape == x.shape


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-0.1), "eps must be > 0"),
    (dict(eps=float("nan")), "eps must be finite"),
    (dict(eps=2.0), "larger than the whole pixel range"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=2.5), "steps must be an integer >= 1"),
    (dict(step_size=0.0), "step_size must be > 0"),
    (dict(step_size=-1e-3), "step_size must be > 0"),
    (dict(eps=0.01, step_size=0.1), "larger than eps"),
    (dict(norm="l1"), "unknown norm"),
    (dict(backend="foolbox"), "unknown backend"),
    (dict(clip=(1.0, 0.0)), "min < max"),
])
def test_bad_parameters(batch, kwargs, match):
    x, y = batch
    with pytest.raises(AttackError, match=match):
        A.pgd(_model(), x, y, **{"steps": 2, **kwargs})


def test_bad_images_and_labels(batch):
    x, y = batch
    model = _model()
    normalised = (x - 0.5) / 0.25
    with pytest.raises(AttackError, match="expects pixels in \\[0, 1\\].*not mean/std-normalised"):
        A.pgd(model, normalised, y, steps=1)
    with pytest.raises(AttackError, match="expects pixels"):
        A.uniform_noise(x * 255, eps=0.1)
    with pytest.raises(AttackError, match="floating point"):
        A.pgd(model, (x * 255).to(torch.uint8), y, steps=1)
    with pytest.raises(AttackError, match="NaN"):
        A.fgsm(model, torch.full_like(x, float("nan")), y)
    with pytest.raises(AttackError, match="one class index per image"):
        A.pgd(model, x, y[:3], steps=1)
    with pytest.raises(AttackError, match="must lie in \\[0, 10\\)"):
        A.pgd(model, x, y + 10, steps=1)
    with pytest.raises(AttackError, match="integer class indices"):
        A.pgd(model, x, y.double(), steps=1)
    with pytest.raises(AttackError, match="targeted attack needs labels"):
        A.pgd(model, x, None, steps=1, targeted=True)
    with pytest.raises(AttackError, match="eps must be <= 1"):
        A.fgsm(model, x, y, eps=1.5)
    with pytest.raises(AttackError, match="eps must be > 0"):
        A.uniform_noise(x, eps=0)
    with pytest.raises(AttackError, match="seed must be an integer"):
        A.uniform_noise(x, eps=0.1, seed=None)


# ------------------------------------------------------------------ noise control
def test_uniform_noise_range_seed_and_hand_value():
    x = torch.full((4, 3, 8, 8), 0.5)
    eps = 0.1
    a = A.uniform_noise(x, eps=eps, seed=3)
    d = a - x
    assert d.min() >= 0 and d.max() <= eps and d.max() > 0.9 * eps
    assert abs(d.mean().item() - eps / 2) < 0.01
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, x + u * eps)
    assert torch.equal(a, A.uniform_noise(x, eps=eps, seed=3))
    assert not torch.equal(a, A.uniform_noise(x, eps=eps, seed=4))
    s = A.uniform_noise(x, eps=eps, symmetric=True, seed=3) - x
    assert s.min() >= -eps and s.max() <= eps and s.min() < -0.9 * eps
    assert abs(s.mean().item()) < 0.01
    edge = A.uniform_noise(torch.ones(2, 3, 4, 4), eps=eps, seed=0)
    assert torch.equal(edge, torch.ones(2, 3, 4, 4))  # clipped to [0, 1]


# ------------------------------------------------------------------ real data
def test_pgd_collapses_accuracy_on_digits_while_noise_does_not():
    """A small CNN trained on sklearn's real 8×8 digits: PGD at eps 0.2 collapses accuracy,
    uniform noise of the same eps leaves it nearly unchanged (study 003's finding)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:1700]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))
    model = Wrapped(net, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for idx in tr[torch.randperm(len(tr), generator=g)].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    xt, yt = x[te], y[te]

    def acc(images):
        return (A.predict_labels(model, images) == yt).float().mean().item()

    clean = acc(xt)
    eps = 0.2  # ~3 of the 16 grey levels of these digits
    adv_acc = acc(A.pgd(model, xt, yt, eps=eps, steps=20, step_size=eps / 8,
                        generator=torch.Generator().manual_seed(0)))
    noise_acc = acc(A.uniform_noise(xt, eps=eps, seed=0))
    sym_acc = acc(A.uniform_noise(xt, eps=eps, symmetric=True, seed=0))
    assert clean > 0.9
    assert adv_acc < 0.2 * clean
    assert noise_acc > clean - 0.05 and sym_acc > clean - 0.05
    fgsm_acc = acc(A.fgsm(model, xt, yt, eps=eps))
    assert adv_acc <= fgsm_acc < clean  # the iterative attack is at least as strong


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_shapes_and_devices(batch):
    x, y = batch
    model = _model(torch.float32).to("cuda")
    xa = A.pgd(model, x.float().to("cuda"), y.to("cuda"), eps=0.03, steps=3,
               generator=torch.Generator(device="cuda").manual_seed(0))
    assert xa.is_cuda and (xa.cpu() - x.float()).abs().max() <= 0.03 + 1e-6
    n = A.uniform_noise(x.float().to("cuda"), eps=0.1, seed=1)
    assert torch.equal(n.cpu(), A.uniform_noise(x.float(), eps=0.1, seed=1))
