"""Engine fixtures: digits as tensors, and one thread for tiny models on a shared CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from worker.compression.base import Dataset


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models on a shared CPU: more intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data / 16.0, bunch.target, test_size=0.3, stratify=bunch.target, random_state=0
    )
    return (
        Dataset(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)),
        Dataset(torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test)),
    )
