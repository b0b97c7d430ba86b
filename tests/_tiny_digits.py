"""Tiny classifiers trained in about a second on scikit-learn's bundled 8×8 digits (real data).

Shared by the attack and geometry tests: an MLP with a chosen activation (ReLU for the
piecewise-linear case, softplus/tanh for a smooth net whose Hessian is not zero).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


@functools.lru_cache(maxsize=None)
def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    y = torch.as_tensor(d.target, dtype=torch.long)
    return x, y


class DigitsMLP(nn.Module):
    def __init__(self, act: str = "relu", hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(p.shape[-1])))
        self.act = {"relu": nn.ReLU(), "softplus": nn.Softplus(beta=2.0), "tanh": nn.Tanh()}[act]
        self.num_classes = 10

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


@functools.lru_cache(maxsize=None)
def trained_mlp(act: str = "relu", seed: int = 0, steps: int = 300) -> DigitsMLP:
    """An MLP trained full-batch with Adam on the first 1,500 digits (~95% on the rest)."""
    x, y = digits_data()
    model = DigitsMLP(act, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:1500]), y[:1500]).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
