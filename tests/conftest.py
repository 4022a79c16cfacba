import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_engine():
    """Every test starts from the same RNG state and restores the global quantized engine."""
    torch.manual_seed(0)
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: their tensors are tiny, and OpenMP hand-offs
    between the two cores of a shared machine cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
