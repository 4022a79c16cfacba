import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_engine():
    """Every test starts from the same RNG state and restores the global quantized engine."""
    torch.manual_seed(0)
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
