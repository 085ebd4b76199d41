"""Every test starts from the same random state, so a failure always reproduces."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One tokenised-corpus cache for every test that trains (the corpus is tokenised once)."""
    return tmp_path_factory.mktemp("corpus-cache")
