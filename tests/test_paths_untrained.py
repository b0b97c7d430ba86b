"""Untrained networks (study 000): BatchNorm statistics from noise before class-optimal inputs."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from somprobe.models import build_model
from somprobe.paths.synthetic import calibrate_untrained_batchnorm, noise_optimal_pairs


def _conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3)).eval()


def test_statistics_are_those_of_the_noise_batches():
    net = _conv_bn()
    assert calibrate_untrained_batchnorm(net, (3, 5, 5), seed=7, batches=3, batch_size=16)
    # Brute force: the same noise, the conv output's per-channel mean and unbiased variance
    # averaged over the three batches (BatchNorm's cumulative average, momentum=None).
    gen = torch.Generator().manual_seed(7)
    means, vars_ = [], []
    for _ in range(3):
        x = (0.5 + 0.1 * torch.randn((16, 3, 5, 5), generator=gen)).clamp(0, 1)
        with torch.no_grad():
            h = net[0](x)
        means.append(h.mean((0, 2, 3)))
        vars_.append(h.var((0, 2, 3), unbiased=True))
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(vars_).mean(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1   # momentum restored
    assert not net.training and not any(m.training for m in net.modules())


def test_trained_network_is_left_alone_and_second_call_is_a_no_op():
    net = _conv_bn()
    net[1].num_batches_tracked += 5          # has seen data: a trained network
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert not calibrate_untrained_batchnorm(net, (3, 5, 5))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    fresh = _conv_bn()
    assert calibrate_untrained_batchnorm(fresh, (3, 5, 5))
    after = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert not calibrate_untrained_batchnorm(fresh, (3, 5, 5))
    assert all(torch.equal(after[k], v) for k, v in fresh.state_dict().items())
    assert not calibrate_untrained_batchnorm(nn.Linear(3, 2), (3,))   # no BatchNorm at all


def test_untrained_resnet_becomes_a_non_constant_function_and_reaches_low_loss():
    # An untrained timm resnet in eval mode with its initial statistics hardly depends on the
    # input; with noise statistics its logits vary, and class-optimal inputs reach low loss.
    net = build_model("test_resnet", num_classes=4, image_size=16, seed=0).eval()
    params = [p.clone() for p in net.parameters()]
    x = (0.5 + 0.1 * torch.randn((32, 3, 16, 16), generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    with torch.no_grad():
        spread0 = net(x).std(0).mean()
    assert calibrate_untrained_batchnorm(net, (3, 16, 16), seed=2)
    with torch.no_grad():
        spread1 = net(x).std(0).mean()
    assert spread1 > 5 * spread0
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))
    for p in net.parameters():
        p.requires_grad_(False)
    a, _b, t, res = noise_optimal_pairs(net, 4, 4, (3, 16, 16), seed=0, iters=300, lr=0.05, tol=1e-2)
    assert np.median(res.loss) <= 1e-2
    with torch.no_grad():
        assert (net(a).argmax(1) == t).float().mean() >= 0.75
