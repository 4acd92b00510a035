"""Fixtures shared by the whole suite."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU interpreter (DESIGN.md section 9). This must happen before
# anything imports triton.language: its @jit helpers (tl.zeros, ...) are built for the mode in force at import,
# and an earlier test (torch.library.opcheck, torch.export) may import triton long before tests/plugins runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: intra-op threading only adds contention on the 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
