"""examples/hierarchical_hurst.py runs in its --test mode (the Pyro convention: every example has one)."""
import importlib.util
import math
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_hierarchical_hurst_example_runs_in_test_mode(capsys):
    spec = importlib.util.spec_from_file_location("hierarchical_hurst", ROOT / "examples" / "hierarchical_hurst.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    start = time.perf_counter()
    result = example.main(["--test"])
    assert time.perf_counter() - start < 60                     # ~10 s on one idle core
    assert "90% interval coverage" in capsys.readouterr().out
    assert result["num_series"] == 8 and result["draws"] == 30
    for key in ("corr", "rmse", "coverage90", "mean_sd", "ess_min"):
        assert math.isfinite(result[key]), key
    assert 0.0 <= result["coverage90"] <= 1.0 and result["mean_sd"] > 0
