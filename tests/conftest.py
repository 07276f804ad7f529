import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: derandomized (reproducible) examples; slow numerics make deadlines meaningless.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# One thread per test process: the suite runs under `pytest -n 2`, and on a shared 2-core host
# OpenMP threads of many small ops wait on each other (measured: 8 s -> 185 s for one test).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
