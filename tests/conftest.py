"""Suite-wide fixtures: every test model is tiny, and several runs share one process."""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Tiny models are thousands of small ops: intra-op threads only add overhead and contend
    with the multi-process tests' workers on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process training runs each start from clean accelerate singletons."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
