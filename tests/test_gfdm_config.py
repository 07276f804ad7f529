"""TrainConfig as the one source of flags, config files and checkpoints; the dataset registry; checkpoints
that carry the dynamics as a DynamicsSpec dict (and older ones that do not)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from models.gfdm import sampling
from models.gfdm.checkpoint import load_for_sampling
from models.gfdm.cli import build_parser, main
from models.gfdm.config import TrainConfig
from models.gfdm.data import DATASETS, DatasetSource, ImageDataset, load_dataset
from models.gfdm.dynamics import FVP
from models.gfdm.spec import DynamicsSpec

TINY = ["--dataset", "digits", "--preset", "digits-tiny", "--threads", "1", "--no-progress", "--batch-size", "16",
        "--log-every", "1", "--sample-every", "1000", "--steps", "3"]


def _actions(command: str) -> dict:
    _, subs = build_parser()
    return {a.dest: a for a in subs[command]._actions}


def test_every_field_is_a_flag_with_the_dataclass_default():
    actions = _actions("train")
    for f in dataclasses.fields(TrainConfig):
        assert f.name in actions, f.name
        assert actions[f.name].option_strings[0] == "--" + f.name.replace("_", "-")     # (and --no-… for bools)
        assert actions[f.name].default == f.default, f.name
        assert actions[f.name].help == (f.metadata["help"] if isinstance(f.metadata["help"], str)
                                        else f.metadata["help"]())
    assert actions["grid_steps"].default == 200 and "sample_steps" not in actions
    compare = _actions("compare")
    assert (compare["preset"].default, compare["steps"].default, compare["lr"].default) == ("digits-tiny", 1500, 1e-3)
    assert compare["sample_steps"].default == 200 and "hurst" not in compare and "resume" not in compare


def test_method_choices_come_from_the_sampler_registry():
    names = tuple(getattr(sampling, "SAMPLERS", None) or sampling.METHODS)
    assert {"sde", "ode"} <= set(names)
    for command in ("sample", "evaluate", "compare"):
        assert tuple(_actions(command)["method"].choices) == names


def test_config_normalises_the_dynamics_into_family_hurst_and_processes():
    cfg = TrainConfig(dynamics="fvp:H=0.7,K=2,gamma_max=10")
    assert (cfg.dynamics, cfg.hurst, cfg.num_processes) == ("fvp:gamma_max=10", 0.7, 2)
    assert cfg.dynamics_spec() == DynamicsSpec.parse("fvp:H=0.7,K=2,gamma_max=10")
    assert TrainConfig(dynamics="fvp", hurst=0.6).dynamics_spec().label == "FVP(H=0.6,K=3)"
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    vp = cfg.with_dynamics(DynamicsSpec.parse("vp:beta_max=15"))
    assert (vp.dynamics, vp.hurst, vp.num_processes) == ("vp:beta_max=15", 0.7, 2)
    old = {**TrainConfig().to_dict(), "sample_steps": 7, "unet": {"model_channels": 16}, "world_size": 1}
    del old["grid_steps"]
    assert TrainConfig.from_dict(old).grid_steps == 7
    with pytest.raises(ValueError, match="unknown TrainConfig keys \\['stepz'\\]"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="unknown key 'gamma' for fvp"):
        TrainConfig(dynamics="fvp:gamma=3")


def test_bad_dynamics_spec_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dynamics", "fvp:H=0.9,K=3,gamma=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --dynamics: invalid choice" in err and "unknown key 'gamma'" in err


def test_config_json_round_trips_and_the_checkpoint_keeps_non_default_dynamics(tmp_path):
    spec_text = "fvp:H=0.7,K=2,gamma_max=10,normalize_weights=false,beta_max=15"
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--dynamics", spec_text, "--grid-steps", "7", "--out", str(first)]) == 0
    saved = json.loads((first / "config.json").read_text())
    assert (saved["dynamics"], saved["hurst"], saved["num_processes"], saved["grid_steps"]) == (
        "fvp:gamma_max=10,normalize_weights=false,beta_max=15", 0.7, 2, 7)
    # the run's own config.json (with its recorded keys "unet", "world_size") is a valid --config
    assert main(["train", "--config", str(first / "config.json"), "--out", str(second)]) == 0
    again = json.loads((second / "config.json").read_text())
    assert {**again, "out": None} == {**saved, "out": None}
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (first, second))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())      # same settings, same run
    # the checkpoint's dynamics entry is read from the built object and rebuilds it exactly
    assert a["dynamics"] == DynamicsSpec.parse(spec_text).to_dict()
    _, dyn, _ = load_for_sampling(first / "checkpoint.pt")
    assert (dyn.gamma_max, dyn.normalize_weights, dyn.schedule.beta_max, dyn.hurst, dyn.num_processes) == (
        10.0, False, 15.0, 0.7, 2)
    direct = FVP(hurst=0.7, num_processes=2, gamma_max=10, normalize_weights=False, beta_max=15)
    assert torch.equal(dyn.weights, direct.weights) and torch.equal(dyn.gammas, direct.gammas)
    assert not torch.equal(dyn.weights, FVP(hurst=0.7, num_processes=2).weights)


def test_older_checkpoints_and_config_files_still_work(tmp_path, capsys):
    run = tmp_path / "run"
    old_config = tmp_path / "old.json"       # an older config file: "sample_steps" was the grid-steps field
    old_config.write_text(json.dumps({"dynamics": "fvp", "hurst": 0.7, "num_processes": 2, "sample_steps": 5}))
    assert main(["train", "--config", str(old_config), *TINY, "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["grid_steps"] == 5
    # rewrite the checkpoint as the older code wrote it
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["dynamics"] = {"name": "fvp", "hurst": 0.7, "num_processes": 2}
    state["config"]["sample_steps"] = state["config"].pop("grid_steps")
    del state["checksum"]                    # the older code stored none (it is verified only where present)
    torch.save(state, run / "checkpoint.pt")
    _, dyn, _ = load_for_sampling(run / "checkpoint.pt")
    assert dyn.name == "FVP(H=0.7,K=2)" and torch.equal(dyn.weights, FVP(hurst=0.7, num_processes=2).weights)
    capsys.readouterr()
    assert main(["train", "--config", str(old_config), *TINY, "--steps", "4", "--out", str(run), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4


def _noise_images(root, split: str, download: bool) -> ImageDataset:
    """The extension-point example: a dataset is a loader returning uint8 images (N, C, H, W) with labels."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    images = torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8)
    return ImageDataset(name="noise-8x8", images=images, labels=torch.zeros(64, dtype=torch.int64), max_value=255,
                        num_classes=1, hflip=False, source=f"random uint8 ({split})")


def test_one_registration_adds_a_dataset_to_load_dataset_and_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(DATASETS, "noise-8x8", DatasetSource(load=_noise_images, help="random 8x8 test images"))
    assert load_dataset("noise-8x8", split="test").source == "random uint8 (test)"
    for command in ("train", "evaluate", "compare"):
        action = _actions(command)["dataset"]
        assert tuple(action.choices) == tuple(DATASETS) and "noise-8x8: random 8x8 test images" in action.help
    monkeypatch.setenv("COLUMNS", "400")          # one line per flag in --help
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "noise-8x8: random 8x8 test images" in capsys.readouterr().out
    args = [a if a != "digits" else "noise-8x8" for a in TINY]
    assert main(["train", *args, "--dynamics", "vp", "--out", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["dataset"]["name"] == "noise-8x8" and state["step"] == 3
    assert np.isfinite(state["stats"]["loss"])
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("no-such-data")
