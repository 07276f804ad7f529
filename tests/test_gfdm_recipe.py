"""Training recipes through the CLI: --time-sampling, --precondition, --covariance-jitter; run specs of compare."""
import json

import pytest
import torch

from models.gfdm.checkpoint import load_for_sampling
from models.gfdm.cli import main as gfdm
from models.gfdm.precondition import Preconditioned
from models.gfdm.spec import DynamicsSpec, RunSpec

TINY = ["--preset", "digits-tiny", "--batch-size", "16", "--steps", "3", "--log-every", "1", "--ckpt-every", "3",
        "--sample-every", "100", "--threads", "1", "--no-progress"]


def test_recipe_is_stored_and_used_for_sampling(tmp_path):
    out = tmp_path / "run"
    assert gfdm(["train", "--out", str(out), "--precondition", "edm", "--time-sampling", "like:vp",
                 "--covariance-jitter", "1e-4", *TINY]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = state["config"]
    assert (cfg["precondition"], cfg["time_sampling"], cfg["covariance_jitter"]) == ("edm", "like:vp", 1e-4)
    assert state["dynamics"]["covariance_jitter"] == 1e-4
    model, dyn, _ = load_for_sampling(out / "checkpoint.pt")
    assert isinstance(model, Preconditioned) and model.kind == "edm" and dyn.covariance_jitter == 1e-4
    assert json.loads((out / "config.json").read_text())["time_sampling"] == "like:vp"
    # resuming with another recipe is refused, naming the setting, and nothing is changed
    before = (out / "checkpoint.pt").read_bytes()
    code = gfdm(["train", "--out", str(out), "--resume", "--precondition", "edm", "--time-sampling", "edm",
                 "--covariance-jitter", "1e-4", *TINY])
    assert code != 0 and (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("flags,match", [
    (["--time-sampling", "often"], "time_sampling must be"),
    (["--time-sampling", "like:vpsde"], "vpsde"),
    (["--covariance-jitter", "-1"], "covariance_jitter"),
    (["--dynamics", "vp", "--covariance-jitter", "1e-4"], "covariance_jitter applies to fvp/fve"),
])
def test_bad_recipe_flags_fail_before_any_work(tmp_path, flags, match, capsys):
    out = tmp_path / "bad"
    code = gfdm(["train", "--out", str(out), *flags, *TINY])
    assert code != 0 and not (out / "checkpoint.pt").exists()
    assert match in capsys.readouterr().err


def test_unknown_preconditioning_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gfdm(["train", "--out", str(tmp_path / "x"), "--precondition", "karras", *TINY])
    assert "karras" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_run_spec_parses_labels_and_round_trips():
    spec = RunSpec.parse("fvp:H=0.9,K=3@precondition=edm;time_sampling=like:fvp:H=0.7,K=2")
    assert spec.dynamics == DynamicsSpec.parse("fvp:H=0.9,K=3")
    assert dict(spec.recipe) == {"precondition": "edm", "time_sampling": "like:fvp:H=0.7,K=2"}
    assert RunSpec.parse(spec.text) == spec and spec.label.startswith("FVP(H=0.9,K=3) [")
    assert set(spec.slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert RunSpec.parse("vp") == RunSpec(DynamicsSpec.parse("vp"))
    with pytest.raises(ValueError, match="keys in"):
        RunSpec.parse("vp@lr=3")


def test_resume_takes_the_runs_settings_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--preset", "digits-tiny", "--batch-size", "16", "--log-every", "1", "--ckpt-every", "1",
            "--sample-every", "100", "--threads", "1", "--no-progress"]
    assert gfdm(["train", "--out", str(out), "--steps", "2", "--lr", "3e-3", "--t-eps", "1e-4",
                 "--time-sampling", "edm", *base]) == 0
    # only --steps is repeated: lr, t_eps and time_sampling come from the checkpoint
    assert gfdm(["train", "--out", str(out), "--resume", "--steps", "3", "--threads", "1", "--no-progress"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["lr"] == 3e-3 and state["config"]["time_sampling"] == "edm"
    assert "settings from" in capsys.readouterr().out
    # a changed identity setting is refused, named
    code = gfdm(["train", "--out", str(out), "--resume", "--steps", "4", "--lr", "1e-2", "--threads", "1",
                 "--no-progress"])
    assert code != 0 and "lr" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
