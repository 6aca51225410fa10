"""Suite-wide settings. `make test` runs 2 pytest workers on 2 cores: one torch thread each,
because two workers each spinning two OpenMP threads run many times slower than one."""

import pytest
import torch

from medvae.training import runtime

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float32_unless_a_test_asks(request, monkeypatch):
    """``amp: auto`` resolves to float32 in every test, whatever the CPU: the suite's numbers must not depend on
    whether this machine has AMX / AVX-512 BF16. The tests of the capability probe (test_amp.py) fake it
    themselves."""
    if request.node.path.name != "test_amp.py":
        monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
