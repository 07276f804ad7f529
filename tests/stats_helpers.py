"""Statistical assertions with tolerances derived from the sample size (imported by tests)."""

import numpy as np
import torch
from scipy import stats


def bonferroni_z(num_tests: int, alpha: float = 1e-3) -> float:
    """Two-sided z threshold so that all `num_tests` checks pass together with probability >= 1 - alpha."""
    return float(stats.norm.isf(alpha / (2 * num_tests)))


def assert_covariance_matches(samples: torch.Tensor, cov: torch.Tensor, alpha: float = 1e-3) -> None:
    """Empirical second moments of zero-mean Gaussian samples (n, d) against `cov` (d, d).

    For Gaussian X the estimator mean(X_s X_t) has variance (C_ss C_tt + C_st^2) / n. Every entry must
    lie within z standard errors, z Bonferroni-corrected over the d(d+1)/2 distinct entries.
    """
    x = samples.to(torch.float64)
    cov = cov.to(torch.float64)
    n, d = x.shape
    emp = x.T @ x / n
    diag = torch.diagonal(cov)
    se = torch.sqrt((diag[:, None] * diag[None, :] + cov ** 2) / n)
    z = bonferroni_z(d * (d + 1) // 2, alpha)
    mask = se > 0
    excess = ((emp - cov).abs() - z * se)[mask]
    assert float(excess.max()) <= 1e-12, (
        f"empirical covariance off by more than {z:.2f} standard errors: max |emp - cov| / se = "
        f"{float(((emp - cov).abs()[mask] / se[mask]).max()):.2f}")


def variogram_slope(paths: torch.Tensor, lag_steps, dt: float) -> float:
    """Least-squares slope of log mean |B_{t+k dt} - B_t|^2 against log(k dt)."""
    lags = [int(k) for k in lag_steps]
    msq = [float(((paths[:, k:] - paths[:, :-k]) ** 2).mean()) for k in lags]
    return float(np.polyfit(np.log(np.array(lags) * dt), np.log(msq), 1)[0])
