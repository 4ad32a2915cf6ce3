"""A user's Keras project: Keras models and torch datasets, trained by cadence."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

import cadence  # noqa: E402


class Blobs(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
        self.x = centres[self.y] + 0.7 * torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Bars(Dataset):
    """8x8 images with a bright bar in one of four rows: the row is the class."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = 0.3 * torch.rand(n, 8, 8, 1, generator=g)
        for i, c in enumerate(self.y.tolist()):
            self.x[i, 1 + 2 * c, :, 0] += 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def mlp(cfg):
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    return cadence.DatasetWorkload(
        model, Blobs(512, 0), Blobs(128, 1), F.cross_entropy, metric="val_accuracy"
    )


def cnn(cfg):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    return cadence.DatasetWorkload(
        model, Bars(512, 0), Bars(128, 1), F.cross_entropy, metric="val_accuracy"
    )
