"""Faults a new user hit (issue 12): each bad input gives one clear error naming the parameter, its allowed
range and the value — never a traceback, a hang, a silent NaN or a silently wrong result."""
from __future__ import annotations

import warnings

import pytest
import torch

from models.gfdm.cli import main

TINY = ["--dataset", "digits", "--preset", "digits-tiny", "--threads", "1", "--no-progress"]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


# ------------------------------------------------------------------------------------- 1. what cannot fit
def test_train_refuses_a_batch_larger_than_the_training_set(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--batch-size", "100000", "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert "--batch-size 100000" in err and "digits (1500 images)" in err
    assert not out.exists()


# ------------------------------------------------------------------- 2. coefficient tables out of range
# γ_max·T is what matters; it is set through gamma_max at T = 1 so the tests hold whichever unit gamma_max has
@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=8), "num_processes K = 8"),
    (dict(num_processes=3, gamma_max=2000.0), "gamma_max·T = 2000"),
])
def test_fractional_dynamics_refuse_tables_they_cannot_resolve(kwargs, message):
    from models.gfdm import FVP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # ill-conditioning / prior-mismatch warnings of these settings
        with pytest.raises(ValueError, match="K <= 7") as e:
            FVP(0.9, **kwargs)
    assert message in str(e.value)


def test_fractional_dynamics_refuse_a_rate_horizon_the_covariance_solve_cannot_finish():
    import numpy as np

    from fracsde.linear import VPSchedule, augmented_covariance

    with pytest.raises(ValueError, match=r"gamma_max·T = 2e\+07 .* exceeds 20000"):
        augmented_covariance(VPSchedule(horizon=1e6), np.array([0.05, 1.0, 20.0]), np.ones(3), np.array([1e6]))


# ---------------------------------------------------------------- 4. reversible Heun's adjoint when stiff
def test_reversible_heun_adjoint_is_refused_where_its_gradients_are_wrong():
    from fracsde import FractionalSDE, MarkovApproxFBM, sdeint

    class OU(FractionalSDE):
        noise_type, sde_type = "additive", "stratonovich"

        def f(self, t, x):
            return -x

        def g(self, t, x):
            return torch.ones_like(x).unsqueeze(-1)

    sde = OU(MarkovApproxFBM(0.7, 3, gamma_max=20.0))
    x0 = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError) as e:
        sdeint(sde, x0, ts, method="reversible_heun", dt=0.01, adjoint=True)
    msg = str(e.value)
    assert "gamma_max * (T - t0) = 20" in msg and "<= 6.91" in msg
    assert all(name in msg for name in ("'midpoint'", "'heun'", "'euler_heun'"))
