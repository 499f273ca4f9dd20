"""A tiny 5-group MLP, its seeded batches and a seeded dataset, shared by the core-reliability and lean tests."""

import torch
from torch import nn


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def batch(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def tensor_data(n=64, seed=0):
    """(train, test): the same seeded TensorDataset of the MLP's inputs."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return ds, ds


def one_step(model, opt, strategy, step):
    """One training step of the MLP on batch ``step`` through ``strategy``."""
    opt.zero_grad()
    x, y = batch(step)
    nn.functional.cross_entropy(model(x), y).backward()
    strategy.step()
