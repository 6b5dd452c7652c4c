"""Shared fixtures: tiny models of every supported shape and a small real calibration batch (digits)."""

import helpers
import pytest
import torch

# One thread: on a 2-core machine shared with other jobs, two OpenMP threads wait on each other's time slices and
# tiny models run 5-30x slower; alone, one thread costs these small tests little.
torch.set_num_threads(1)

import models  # noqa: E402, F401  (after set_num_threads: models may build tensors on import)


# Seeded: a model must not depend on which tests ran before in the same process (pytest-xdist changes that).
@pytest.fixture
def tiny_vgg():
    return helpers.tiny_vgg()


@pytest.fixture
def tiny_resnet():
    return helpers.tiny_resnet()


@pytest.fixture
def example_input():
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def digits_calib():
    """A real calibration batch: 256 digits images (1x32x32, normalised) and labels."""
    from prune_cli.data import splits as D

    splits = D.make_splits(D.load_dataset("digits"), seed=0)
    return D.to_float(splits.train.x[:256], splits), splits.train.y[:256]
