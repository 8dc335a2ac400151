"""Shared pytest configuration: loads the real-service fixtures from tests/services.py."""
import sys
from pathlib import Path

# tests/ has no __init__.py; put it on sys.path ourselves so `services` imports under any
# --import-mode (prepend mode would do it, importlib mode would not).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

pytest_plugins = ["services"]


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny matrices (threads only add wake-up latency there: 15x slower
    on a shared 2-core machine), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
