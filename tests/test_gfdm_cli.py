"""End-to-end tests of the ``gfdm`` command on the 8x8 digits with a tiny network (CPU).

Training runs in subprocesses (one thread each), so a run can be killed mid-way and resumed; the resumed
run must end bit-identical to the uninterrupted one. sample / evaluate / compare / error paths run
in-process through ``models.gfdm.cli.main``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.gfdm.checkpoint import payload_checksum
from models.gfdm.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "models.gfdm.cli"]
TINY = ["--dataset", "digits", "--preset", "digits-tiny", "--threads", "1", "--no-progress"]
RUN = TINY + ["--dynamics", "fvp", "--hurst", "0.9", "--num-processes", "3", "--steps", "100",
              "--batch-size", "64", "--log-every", "10", "--ckpt-every", "20", "--sample-every", "50",
              "--grid-steps", "10", "--sample-num", "16", "--dropout", "0.1", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "gfdm-cache"    # shared by the gfdm test files of a session
    return {**os.environ, "GFDM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_step(metrics: Path, step: int, proc, timeout: float = 120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step
                                     for line in metrics.read_text().splitlines() if line.strip()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    """An uninterrupted 100-step run and the same run SIGKILLed at step >= 50, resumed, stopped by
    SIGTERM, and resumed again to step 100. Both are started together (one core each)."""
    base = tmp_path_factory.mktemp("gfdm-runs")
    full, broken = base / "full", base / "broken"
    pa = subprocess.Popen(CLI + ["train", *RUN, "--out", str(full)], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pb = subprocess.Popen(CLI + ["train", *RUN, "--out", str(broken)], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(broken / "metrics.jsonl", 50, pb)
    pb.kill()                                   # SIGKILL: no chance to clean up
    pb.wait()
    killed_at = torch.load(broken / "checkpoint.pt", weights_only=True)["step"]
    # resume, and stop it gracefully with SIGTERM (checkpoint at the next log step, exit 0)
    pc = subprocess.Popen(CLI + ["train", *RUN, "--out", str(broken), "--resume"], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(broken / "metrics.jsonl", killed_at + 20, pc)
    pc.send_signal(signal.SIGTERM)
    out_c, err_c = pc.communicate(timeout=120)
    termed_at = torch.load(broken / "checkpoint.pt", weights_only=True)["step"]
    pd = subprocess.run(CLI + ["train", *RUN, "--out", str(broken), "--resume"], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=300)
    out_a, err_a = pa.communicate(timeout=300)
    assert pa.returncode == 0, err_a[-3000:]
    assert pd.returncode == 0, pd.stderr[-3000:]
    return {"full": full, "broken": broken, "killed_rc": pb.returncode, "killed_at": killed_at,
            "term_rc": pc.returncode, "term_out": out_c, "termed_at": termed_at, "resume_out": pd.stdout,
            "full_out": out_a}


def test_train_writes_checkpoint_metrics_and_grids(runs):
    full = runs["full"]
    state = torch.load(full / "checkpoint.pt", weights_only=True)       # plain state dict
    assert state["step"] == 100 and state["dynamics"] == {      # read from the built dynamics
        "family": "fvp", "hurst": 0.9, "num_processes": 3, "gamma_max": 20.0, "normalize_weights": True,
        "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "grid_size": 2048, "covariance_jitter": 0.0,
        "rates": "geometric", "max_rate": None}
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:2])                 # it learns
    assert all(x["img_per_s"] > 0 for x in lines if "loss" in x)
    assert (full / "samples" / "grid-0000050.png").is_file() and (full / "samples" / "grid-0000100.png").is_file()
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["dynamics"] == "fvp" and cfg["unet"]["model_channels"] == 16 and cfg["dropout"] == 0.1
    assert "done: step 100" in runs["full_out"]
    assert not list(full.glob(".*.tmp"))                              # no temp files left behind


def test_resume_after_kill_is_bit_identical(runs):
    assert runs["killed_rc"] == -signal.SIGKILL and 40 <= runs["killed_at"] < 100
    assert runs["term_rc"] == 128 + signal.SIGTERM and "stopped (SIGTERM)" in runs["term_out"]   # saved, 143
    assert runs["killed_at"] < runs["termed_at"] < 100
    assert "resumed from" in runs["resume_out"] and f"at step {runs['termed_at']}" in runs["resume_out"]
    a = torch.load(runs["full"] / "checkpoint.pt", weights_only=True)
    b = torch.load(runs["broken"] / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 100
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for i, sa in a["optimizer"]["state"].items():
        for k, v in sa.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k])
    assert a["data_stream"] == b["data_stream"]
    # the metrics log was cut back to the checkpoint on resume: identical losses line by line
    la = [json.loads(x).get("loss") for x in (runs["full"] / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x).get("loss") for x in (runs["broken"] / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_sample_writes_grid_and_npz(runs, tmp_path, capsys):
    ck = runs["full"] / "checkpoint.pt"
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(ck), "--num", "24", "--batch-size", "10", "--steps", "20",
                 "--method", "ode", "--weights", "raw", "--out", str(out), "--no-progress"]) == 0
    with np.load(out / "samples.npz") as z:
        x, imgs = z["x"], z["images"]
        meta = json.loads(str(z["meta"]))
    assert x.shape == (24, 1, 8, 8) and imgs.shape == (24, 8, 8, 1) and imgs.dtype == np.uint8
    assert np.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert meta["method"] == "ode" and meta["weights"] == "raw" and meta["step"] == 100
    assert (out / "grid.png").is_file() and "img/s" in capsys.readouterr().out
    # batches are seeded by index: a different batch size gives the same images
    out2 = tmp_path / "s2"
    main(["sample", "--checkpoint", str(ck), "--num", "24", "--batch-size", "10", "--steps", "20", "--method", "ode",
          "--weights", "raw", "--out", str(out2), "--no-progress"])
    with np.load(out2 / "samples.npz") as z:
        np.testing.assert_array_equal(z["x"], x)


def test_evaluate_offline_fid_vendi_and_nll(runs, env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GFDM_CACHE", env["GFDM_CACHE"])
    monkeypatch.delenv("GFDM_INCEPTION", raising=False)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(runs["full"] / "checkpoint.pt"), "--num", "200", "--steps", "30",
                 "--out", str(out), "--no-progress", "--nll", "--nll-num", "16", "--nll-steps", "10"]) == 0
    text = capsys.readouterr().out
    assert "offline FID" in text and "NOT comparable to published FID" in text and "bits/dim" in text
    res = json.loads(out.read_text())
    assert res["fid_kind"] == "offline" and res["comparable_to_published"] is False
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    assert 1 < res["vs_p"] < 200 and 1 < res["vs_p_data"] < 200 and res["num_samples"] == 200
    assert np.isfinite(res["nll_bpd"]) and res["nll_num"] == 16


def test_evaluate_with_user_inception_file(runs, tmp_path, capsys, monkeypatch):
    """A user-supplied TorchScript detector (EDM/StyleGAN2-ADA calling convention) via $GFDM_INCEPTION."""
    import warnings

    class Detector(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            f = x.float().flatten(1)
            return torch.cat([f, f.sqrt()], 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Detector()).save(str(tmp_path / "inception.pt"))
    monkeypatch.setenv("GFDM_INCEPTION", str(tmp_path / "inception.pt"))
    monkeypatch.setenv("GFDM_CACHE", str(tmp_path / "cache"))
    main(["sample", "--checkpoint", str(runs["full"] / "checkpoint.pt"), "--num", "40", "--steps", "10",
          "--out", str(tmp_path / "s"), "--no-progress"])
    assert main(["evaluate", "--samples", str(tmp_path / "s" / "samples.npz"), "--ref-max", "300"]) == 0
    text = capsys.readouterr().out
    assert "FID: " in text and "TorchScript weights from" in text and "offline" not in text
    assert "NVIDIA/EDM convention" in text     # a detector resizes inside itself: NVIDIA's convention, labelled
    res = json.loads((tmp_path / "s" / "samples.eval.json").read_text())
    assert res["comparable_to_published"] is True and res["num_reference"] == 300


def test_compare_prints_one_table(tmp_path, env, capsys, monkeypatch):
    monkeypatch.setenv("GFDM_CACHE", env["GFDM_CACHE"])
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--steps", "20", "--batch-size", "32", "--num-samples", "60",
                 "--sample-steps", "10", "--log-every", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    for t in (text, table):
        assert "| VP |" in t and "| FVP(H=0.9,K=3) |" in t and "offline FID" in t and "VS_p" in t
    assert "offline FID: offline FID" not in table and "\noffline FID (features of" in table
    assert (out / "grid-vp.png").is_file() and (out / "grid-fvp-h-0-9-k-3.png").is_file()
    # the two FVP(0.9, 3) rows are told apart wherever they are named; the table says what it does not show
    assert "training FVP(H=0.9,K=3) on" in text
    assert "training FVP(H=0.9,K=3) [time_sampling=like:vp, precondition=edm] on" in text
    assert "| FVP(H=0.9,K=3) [time_sampling=like:vp, precondition=edm] |" in text
    for t in (text, table):
        assert "± : bootstrap standard deviation of the FID" in t and "NOT comparable across rows" in t
    from PIL import Image

    grid = np.asarray(Image.open(out / "grid-vp.png"))
    assert grid.shape[1] >= 8 * 64 and (grid[:14] < 128).any()       # 60 samples at 64 px each, a title band
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["label"] for r in rows[:2]] == ["VP", "FVP(H=0.9,K=3)"] and all(r["step"] == 20 for r in rows[:2])
    assert all(np.isfinite(r["fid"]) and r["fid_bootstrap_std"] > 0 and r["train_time_s"] > 0 for r in rows[:2])
    # --reuse evaluates the finished runs again without training; their loss and time come from the checkpoint
    assert main(["compare", *TINY, "--steps", "20", "--batch-size", "32", "--num-samples", "60",
                 "--sample-steps", "10", "--log-every", "10", "--out", str(out), "--reuse"]) == 0
    again = json.loads((out / "compare.json").read_text())["rows"]
    for a, b in zip(rows[:2], again[:2], strict=True):
        assert (a["loss"], a["train_time_s"], a["fid"]) == (b["loss"], b["train_time_s"], b["fid"])


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dynamics", "--hurst", "--num-processes", "--preset", "--batch-size", "--steps", "--lr",
                 "--ema-halflife-kimg", "--grad-clip", "--amp", "--seed", "--config", "--resume"):
        assert flag in text
    assert "(default: fvp)" in text and "(default: 0.9)" in text and "(default: 128)" in text


def test_config_files_json_and_toml(tmp_path, capsys):
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"dataset": "digits", "preset": "digits-tiny", "steps": 3, "batch-size": 16,
                              "dynamics": "vp", "log_every": 1, "sample_every": 100, "progress": False,
                              "out": str(tmp_path / "j")}))
    assert main(["train", "--config", str(js)]) == 0
    cfg = json.loads((tmp_path / "j" / "config.json").read_text())
    assert (cfg["dynamics"], cfg["steps"], cfg["batch_size"]) == ("vp", 3, 16)
    toml = tmp_path / "c.toml"
    toml.write_text(f'dataset = "digits"\npreset = "digits-tiny"\nsteps = 2\nbatch-size = 16\n'
                    f'dynamics = "fve"\nhurst = 0.7\nnum-processes = 2\nprogress = false\nsample-every = 100\n'
                    f'out = "{tmp_path / "t"}"\n')
    # a flag on the command line overrides the file
    assert main(["train", "--config", str(toml), "--steps", "4"]) == 0
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert (cfg["dynamics"], cfg["hurst"], cfg["num_processes"], cfg["steps"]) == ("fve", 0.7, 2, 4)


@pytest.mark.parametrize("argv, message", [
    (["train", "--dynamics", "bm"], "invalid choice"),
    (["train", "--steps", "ten"], "invalid int value"),
    (["sample"], "--checkpoint"),
    (["evaluate", "--checkpoint", "a", "--samples", "b"], "not allowed with"),
])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--dynamics", "fvp", "--hurst", "1.5"], "hurst must lie in (0, 1)"),
    (["--num-processes", "0"], "num_processes must be >= 1"),
    (["--batch-size", "30", "--grad-accum", "4"], "must be divisible"),
    (["--steps", "-5"], "steps must be a positive integer"),
    (["--amp", "bf16", "--device", "cpu"], "CUDA devices only"),
    (["--dataset", "mnist", "--data-root", "EMPTY"], "mnist (train) not found"),
    (["--attention-resolutions", "16"], "not reached by this U-Net"),
])
def test_bad_values_give_one_clear_error_and_write_nothing(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GFDM_DATA", raising=False)
    extra = [str(tmp_path) if x == "EMPTY" else x for x in extra]
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_config_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"stepz": 3}')
    with pytest.raises(SystemExit):
        main(["train", "--config", str(bad)])
    assert "unknown keys ['stepz']" in capsys.readouterr().err
    bad.write_text('{"dynamics": "brownian"}')
    with pytest.raises(SystemExit):
        main(["train", "--config", str(bad)])
    assert "is not one of" in capsys.readouterr().err
    bad.write_text('{"steps": "many"}')
    with pytest.raises(SystemExit):
        main(["train", "--config", str(bad)])
    assert "steps='many' is invalid" in capsys.readouterr().err
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(bad)])
    assert "cannot be parsed" in capsys.readouterr().err


def test_bad_compare_spec(capsys):
    assert main(["compare", "--dynamics", "vp", "fvp:H=2,K=3"]) == 2
    assert "need 0 < H < 1" in capsys.readouterr().err


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_bad_checkpoints_give_clear_errors_and_touch_nothing(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    before = _snapshot(run)
    # a checkpoint of another run: different dynamics, different network
    assert main(["train", *RUN, "--dynamics", "vp", "--out", str(run), "--resume", "--steps", "120"]) == 2
    err = capsys.readouterr().err
    assert "--dynamics vp --hurst 0.9 --num-processes 3 gives VP (the checkpoint has FVP(H=0.9,K=3))" in err
    assert "nothing was changed" in err
    assert main(["train", *RUN, "--channels", "32", "--out", str(run), "--resume", "--steps", "120"]) == 2
    assert "--channels 32 (the checkpoint has None) contradicts the run" in capsys.readouterr().err
    # training into a folder with a checkpoint without --resume
    assert main(["train", *RUN, "--out", str(run)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert _snapshot(run) == before
    # damaged files
    raw = (run / "checkpoint.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "noise.pt").write_bytes(__import__("random").Random(0).randbytes(4096))   # fixed bytes
    for bad in ("trunc.pt", "noise.pt"):
        assert main(["sample", "--checkpoint", str(tmp_path / bad), "--num", "2", "--steps", "2",
                     "--out", str(tmp_path / "never")]) == 2
        assert "cannot be read" in capsys.readouterr().err
        assert main(["train", *RUN, "--out", str(tmp_path / "r2"), "--resume", str(tmp_path / bad)]) == 2
        assert "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "never").exists() and not (tmp_path / "r2").exists()
    # weights that do not fit the network described in the checkpoint
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["ema"]["conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    state["checksum"] = payload_checksum(state)           # a consistent file, only its weights do not fit
    torch.save(state, tmp_path / "shape.pt")
    assert main(["sample", "--checkpoint", str(tmp_path / "shape.pt"), "--num", "2", "--steps", "2"]) == 2
    assert "shape mismatch conv_in.weight" in capsys.readouterr().err
    # --label on an unconditional network
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--label", "3", "--num", "2"]) == 2
    assert "class-conditional" in capsys.readouterr().err
