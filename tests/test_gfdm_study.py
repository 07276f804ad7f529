"""The 2-D study script: data, metrics, the exact mixture ε-model, and an end-to-end --quick run."""
import json
import math

import numpy as np
import pytest
import torch

from models.gfdm import DynamicsSpec, GaussianMixtureEpsModel, sample
from models.gfdm import study2d as S
from stats_helpers import bonferroni_z


def test_ring_mixture_is_geometric_with_a_one_percent_mode():
    means, stds, w = S.ring_mixture()
    assert means.shape == (8, 2) and stds.shape == (8,)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert abs(float(w[-1]) - 0.01) < 1e-9
    ratios = w[1:] / w[:-1]
    torch.testing.assert_close(ratios, ratios[0].expand(7))
    torch.testing.assert_close(means.norm(dim=1), torch.ones(8, dtype=torch.float64))


def test_mode_frequencies_of_data_match_the_weights():
    """Binomial counts: each frequency within z·√(w(1−w)/n), z Bonferroni over 8 modes."""
    n = 20000
    x = S.sample_data("ring8", n, torch.Generator().manual_seed(0))
    means, stds, w = S.ring_mixture()
    f = S.mode_frequencies(x, means, float(stds[0]))
    w = w.numpy()
    assert np.all(np.abs(f - w) <= bonferroni_z(8) * np.sqrt(w * (1 - w) / n))
    assert S.mode_frequencies(x + 10.0, means, float(stds[0])).sum() == 0        # far away: all off-mode


def test_sliced_wasserstein_and_mmd():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 2, generator=gen)
    y = torch.randn(3000, 2, generator=gen)
    shift = torch.tensor([0.6, 0.0])
    assert S.sliced_wasserstein(x, x) == 0.0
    # equal covariances: the W2 of every projection is |θᵀΔ|, and E(θᵀΔ)² = |Δ|²/2 over uniform directions
    sw = S.sliced_wasserstein(x, y + shift, projections=1000, generator=gen)
    assert abs(sw - 0.6 / math.sqrt(2)) < 0.05
    assert abs(S.mmd2(x[:1000], y[:1000])) < 5e-3 < S.mmd2(x[:1000], y[:1000] + shift)


def test_mixture_oracle_samples_the_mixture():
    """With the exact mixture ε-model the reverse SDE reproduces the mode frequencies (200 steps)."""
    dyn = DynamicsSpec.parse("fvp:H=0.9,K=2").build()
    means, stds, w = S.ring_mixture()
    oracle = GaussianMixtureEpsModel(dyn, means, stds, w)
    n = 3000
    x = sample(oracle, dyn, (n, 2), steps=200, generator=torch.Generator().manual_seed(2))
    f = S.mode_frequencies(x, means, float(stds[0]))
    w = w.numpy()
    assert f.sum() > 0.98
    assert np.all(np.abs(f - w) <= bonferroni_z(8) * np.sqrt(w * (1 - w) / n) + 0.01)


def test_study_takes_dynamics_specs_and_refuses_bad_ones_before_training(tmp_path, capsys):
    assert S.DEFAULT_DYNAMICS[2] == "fvp:H=0.7,K=2"
    with pytest.raises(SystemExit) as e:
        S.main(["--out", str(tmp_path), "--dynamics", "vp", "fvp:0.7:2"])
    assert e.value.code == 2
    assert "expected key=value items separated by commas (e.g. fvp:H=0.9,K=3); got '0.7:2'" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_quick_study_writes_table_json_and_figure(tmp_path, capsys):
    assert S.main(["--out", str(tmp_path), "--quick"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    kinds = {(r["dynamics"], r["kind"]) for r in res["summary"]}
    assert {("VP", "trained"), ("FVP(H=0.9,K=2)", "trained"), ("VP", "oracle"), ("data", "baseline")} <= kinds
    assert all(r["seeds"] == 2 for r in res["summary"])
    table = (tmp_path / "results.md").read_text()
    assert "| VP | trained |" in table and "±" in table
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
