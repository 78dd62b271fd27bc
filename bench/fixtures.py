"""The digits data and the training recipe that benchmarks and tests share.

Here, not in tests/, so the benchmarks stand on their own (tests/test_boundaries.py holds it): tests/helpers.py
imports them from here, which keeps benchmark and test models alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 images, shipped inside the package), 70/30 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    inputs = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    return tuple(train_test_split(inputs, labels, test_size=0.3, random_state=0, stratify=labels))  # type: ignore[return-value]


def train(model: nn.Module, inputs: np.ndarray, labels: np.ndarray, epochs: int = 20, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x, y = torch.tensor(inputs), torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.f1 = nn.Linear(256, 128)
        self.f2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    reference, output = reference.float(), output.float()
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - output).pow(2).mean().clamp_min(1e-20)))
