"""Faults a new user hit (issue 12): each bad input gives one clear error naming the parameter, its allowed
range and the value — never a traceback, a hang, a silent NaN or a silently wrong result."""
from __future__ import annotations

import warnings

import pytest
import torch

from models.gfdm import GaussianEpsModel, GaussianMixtureEpsModel
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

    with pytest.raises(ValueError, match=r"max\(gamma_max, max\|mu\|\)·T = 2e\+07 .* exceeds 20000"):
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


# --------------------------------------------------------------------------------------- 3. NaN is an error
@pytest.fixture(scope="module")
def fvp():
    from models.gfdm import FVP

    return FVP(0.9, 2)


def test_evaluate_refuses_non_finite_samples(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "nan.npz"
    np.savez(path, x=np.full((12, 1, 8, 8), np.nan, np.float32))
    assert main(["evaluate", "--samples", str(path), "--dataset", "digits"]) == 2
    err = _one_error(capsys)
    assert "samples must be finite; 12 of 12 images hold NaN" in err
    assert not path.with_suffix(".eval.json").exists()


def test_loss_and_likelihood_refuse_non_finite_data(fvp):
    from models.gfdm import nll_bits_per_dim, score_matching_loss

    x0 = torch.zeros(4, 3)
    x0[1, 2] = float("nan")
    model = lambda u, t: u  # noqa: E731
    with pytest.raises(ValueError, match="x0 must be finite; 1 of its 4 samples hold NaN"):
        score_matching_loss(model, fvp, x0)
    with pytest.raises(ValueError, match="x0 must be finite; 1 of its 4 samples hold NaN"):
        nll_bits_per_dim(model, fvp, x0, steps=2)


def test_likelihood_names_an_eps_model_that_ignores_its_input(fvp):
    from models.gfdm import nll_bits_per_dim

    with pytest.raises(ValueError, match="no autograd graph to its input u"):
        nll_bits_per_dim(lambda u, t: torch.zeros_like(u), fvp, torch.zeros(2, 3), steps=2)


@pytest.mark.parametrize("make, message", [
    (lambda d: GaussianEpsModel(d, 0.0, 0.0),
     r"std must be > 0 and finite \(every entry\); got 0.0"),
    (lambda d: GaussianEpsModel(d, 0.0, [1.0, -2.0]),
     r"std must be > 0 .* got \[1.0, -2.0\]"),
    (lambda d: GaussianMixtureEpsModel(d, [[0.0], [1.0]], [1.0, 1.0], [-1.0, 2.0]),
     r"weights must be >= 0, finite and not all 0; got \[-1.0, 2.0\]"),
    (lambda d: GaussianMixtureEpsModel(d, [[0.0], [1.0]], [1.0, 0.0], [1.0, 2.0]),
     r"stds must be > 0 and finite; got \[1.0, 0.0\]"),
])
def test_gaussian_oracles_refuse_bad_parameters(fvp, make, message):
    with pytest.raises(ValueError, match=message):
        make(fvp)


# ------------------------------------------------------------------------------------ 5. resume and folders
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run with two training grids, a sample folder and an evaluation beside its checkpoint."""
    import shutil

    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", *TINY, "--steps", "2", "--batch-size", "16", "--sample-every", "1", "--grid-steps", "2",
                 "--sample-num", "4", "--out", str(out)]) == 0
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--num", "4", "--steps", "2",
                 "--no-progress", "--threads", "1"]) == 0
    (out / "eval-ema-sde-uniform-2-n4-seed0.json").write_text("{}")
    shutil.copy(out / "checkpoint.pt", out.parent / "pristine.pt")
    return out


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), "--resume"]) == 2
    err = _one_error(capsys)
    assert f"--resume: no checkpoint at {out / 'checkpoint.pt'}" in err
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), "--resume", str(tmp_path / "missing.pt")]) == 2
    assert f"no checkpoint at {tmp_path / 'missing.pt'}" in _one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "sample", "evaluate"])
def test_a_read_only_output_folder_is_one_clear_error_before_any_work(run, tmp_path, capsys, monkeypatch, command):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(locked)) else real(p, mode))
    argv = {"train": ["train", *TINY, "--steps", "2", "--out", str(locked / "run")],
            "sample": ["sample", "--checkpoint", str(run / "checkpoint.pt"), "--num", "2", "--steps", "2",
                       "--out", str(locked / "s")],
            "evaluate": ["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--num", "2", "--steps", "2",
                         "--out", str(locked / "e.json")]}[command]
    assert main(argv) == 2
    err = _one_error(capsys)
    assert f"--out {locked}" in err and f"{locked} is not writable" in err
    assert list(locked.iterdir()) == []


def test_sample_into_an_existing_file_fails_before_sampling(run, tmp_path, capsys, monkeypatch):
    import models.gfdm.cli as cli

    monkeypatch.setattr(cli, "_sample", lambda *a: pytest.fail("sampled before checking --out"))
    target = tmp_path / "file"
    target.write_text("keep")
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--num", "2", "--out", str(target)]) == 2
    assert f"--out {target} is an existing file" in _one_error(capsys)
    assert target.read_text() == "keep"


def test_overwrite_removes_the_previous_runs_artefacts_and_a_crash_keeps_its_config(run, tmp_path, capsys,
                                                                                   monkeypatch):
    import json
    import shutil

    import models.gfdm.train as train_module

    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.copy(run.parent / "pristine.pt", out / "checkpoint.pt")
    config = (out / "config.json").read_text()
    # a new run that crashes before its first checkpoint leaves the old checkpoint's config.json beside it
    monkeypatch.setattr(train_module, "_train_step", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        main(["train", *TINY, "--steps", "3", "--batch-size", "8", "--out", str(out), "--overwrite"])
    assert (out / "config.json").read_text() == config
    monkeypatch.undo()
    assert main(["train", *TINY, "--steps", "3", "--batch-size", "8", "--sample-every", "10", "--grid-steps", "2",
                 "--sample-num", "4", "--out", str(out), "--overwrite"]) == 0
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["checkpoint.pt", "config.json", "metrics.jsonl", "samples", "samples/grid-0000003.png"], left
    assert json.loads((out / "config.json").read_text())["batch_size"] == 8


def test_compare_refuses_finished_runs_and_bad_sample_counts_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "vp").mkdir(parents=True)
    (out / "vp" / "checkpoint.pt").write_bytes(b"a finished run")
    argv = ["compare", "--dataset", "digits", "--threads", "1", "--no-progress", "--out", str(out),
            "--dynamics", "vp", "fvp:H=0.9"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "pass --reuse to continue and reuse them or --overwrite" in captured.err
    assert "'fvp:H=0.9' gives no K; using num_processes K = 3" in captured.out
    assert (out / "vp" / "checkpoint.pt").read_bytes() == b"a finished run"
    assert main(argv + ["--overwrite", "--num-samples", "1"]) == 2
    assert "--num-samples must be >= 2 (the FID needs a sample covariance); got 1" in _one_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["vp"]


# ------------------------------------------------------------------------------ 6. one-line errors, not tracebacks
@pytest.mark.parametrize("extra, message", [
    (["--threads", "-1"], "argument --threads: must be an integer >= 1; got -1"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1; got 0"),
])
def test_bad_thread_counts_are_argparse_errors(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *TINY[:-3], "--out", str(tmp_path / "run"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu"], "device must be auto, cpu, cuda, cuda:N or another torch device type; got 'tpu'"),
    (["--steps", "0"], "steps must be a positive integer; got 0"),
    (["--time-limit", "-1"], "time_limit must be > 0 minutes (or none); got -1.0"),
    (["--ema-halflife-kimg", "-1"], "ema_halflife_kimg must be >= 0; got -1.0"),
    (["--t-eps", "2"], "t_eps must lie in (0, T) with T = 1; got 2.0"),
])
def test_bad_training_values_are_one_line_errors(extra, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), *extra]) == 2
    assert message in _one_error(capsys)
    assert not out.exists()


def test_bad_evaluate_inputs_are_one_line_errors(run, tmp_path, capsys):
    samples = next(run.glob("samples-*/samples.npz"))
    assert main(["evaluate", "--samples", str(samples), "--dataset", "mnist"]) == 2
    assert "--dataset mnist does not match" in (err := _one_error(capsys)) and "holds digits images" in err
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert main(["evaluate", "--samples", str(empty)]) == 2
    assert f"--samples {empty} cannot be read as an .npz" in _one_error(capsys)
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--nll", "--nll-num", "0"]) == 2
    assert "--nll-num must be >= 1; got 0" in _one_error(capsys)
    bad = tmp_path / "inception.pth"
    bad.write_bytes(b"\x80\x02 not a pickle at all")
    out = str(tmp_path / "e.json")
    assert main(["evaluate", "--samples", str(samples), "--inception", str(bad), "--out", out]) == 2
    assert f"Inception weights {bad} cannot be read" in _one_error(capsys)


def test_bad_checkpoint_paths_say_what_they_are(run, tmp_path, capsys):

    assert main(["sample", "--checkpoint", str(run), "--num", "2"]) == 2
    assert f"checkpoint {run} is a folder, not a file" in _one_error(capsys)
    noise = tmp_path / "noise.pt"
    import random
    noise.write_bytes(random.Random(0).randbytes(4096))        # fixed bytes: torch's own message depends on them
    assert main(["sample", "--checkpoint", str(noise), "--num", "2", "--out", str(tmp_path / "s")]) == 2
    err = _one_error(capsys)
    assert "cannot be read" in err and "damaged, truncated" in err
    assert "weights_only=False" not in err and "set to `False`" not in err      # no advice to run the file's code


def test_checkpoints_get_the_users_umask(run):
    import os
    import stat

    mask = os.umask(0o22)
    os.umask(mask)
    assert stat.S_IMODE((run / "checkpoint.pt").stat().st_mode) == 0o666 & ~mask



def test_a_long_horizon_is_refused_before_the_covariance_solve_hangs():
    from models.gfdm import FVP

    with pytest.raises(ValueError, match=r"max\|mu\(t\)\| = 10 .* horizon T = 1e\+06\) exceeds 20000"):
        FVP(0.9, 3, T=1e6)


# --------------------------------------------------------------- 7. issue 19: wrong, NaN and unclear library calls
def test_preconditioned_refuses_times_outside_the_horizon_as_marginal_does(fvp):
    from models.gfdm import Preconditioned

    eps = Preconditioned(lambda x, c: x, fvp)
    u = torch.ones(2, 1)
    for t in (2.0, float("nan"), 0.0):
        with pytest.raises(ValueError, match=r"t must lie in \(0, T\] with T = 1"):
            fvp.marginal(torch.tensor([t]))
        with pytest.raises(ValueError, match=r"t must lie in \(0, T\] with T = 1"):
            eps(u, torch.full((2,), t))
    assert torch.isfinite(eps(u, torch.full((2,), 0.5))).all()


def test_estimators_refuse_what_they_cannot_estimate():
    from fracsde.estimators import dfa_hurst, variogram_hurst

    path = torch.cumsum(torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="max_lag must be an integer >= 2; got 0"):
        variogram_hurst(path, max_lag=0)
    assert variogram_hurst(path, max_lag=3).scales.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="increments are constant .* DFA fluctuation is zero"):
        dfa_hurst(torch.zeros(1000))


def test_exact_fbm_refuses_nan_times_and_a_batch_of_hurst_indices():
    from fracsde import FractionalBrownianMotion

    with pytest.raises(ValueError, match=r"s must be finite; got \[nan\]"):
        FractionalBrownianMotion(0.7).covariance(float("nan"), 1.0)
    with pytest.raises(ValueError, match=r"hurst must be a single value here; got a tensor of shape \(2,\)"):
        FractionalBrownianMotion(torch.tensor([0.3, 0.7]))
    assert float(FractionalBrownianMotion(torch.tensor(0.7)).covariance(1.0, 1.0)) == pytest.approx(1.0)


def test_score_matching_loss_names_a_model_that_returns_nan(fvp):
    from models.gfdm import score_matching_loss

    with pytest.raises(ValueError, match="eps_model returned NaN or infinity for 4 of 4 samples"):
        score_matching_loss(lambda u, t: torch.full_like(u, float("nan")), fvp, torch.zeros(4, 3))


def test_dynamics_spec_constructor_takes_the_text_form_with_parses_messages():
    from models.gfdm import DynamicsSpec

    assert DynamicsSpec("fvp:H=0.9,K=3,gamma_max=10") == DynamicsSpec.parse("fvp:H=0.9,K=3,gamma_max=10")
    with pytest.raises(ValueError, match=r"dynamics spec 'fvq:H=0.9': family 'fvq' is not one of"):
        DynamicsSpec("fvq:H=0.9")
    with pytest.raises(ValueError, match="not both"):
        DynamicsSpec("fvp:H=0.9", {"K": 2})


def test_dense_fbm_likelihood_refuses_what_cannot_fit_before_allocating():
    import resource

    from fracsde.distributions import FractionalBrownianPath

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = FractionalBrownianPath(0.7, torch.linspace(1e-4, 2, 20000, dtype=torch.float64) ** 2, kind="type2")
    with pytest.raises(ValueError, match=r"n = 20000 points .* GiB \(limit fracsde.distributions.DENSE_MEMORY_LIMIT"
                                         r" = 4 GiB\); use kind='type1' on the grid"):
        d.log_prob(torch.zeros(20000, dtype=torch.float64))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000      # kB: nothing n x n was made


@pytest.mark.parametrize("call", ["variogram", "fbm-sample", "fbm-device", "times"])
def test_meta_tensors_are_refused_by_name(call):
    from fracsde import FractionalBrownianMotion
    from fracsde.estimators import variogram_hurst

    meta = torch.zeros(100, device="meta")
    with pytest.raises(ValueError, match="'meta'"):
        {"variogram": lambda: variogram_hurst(meta),
         "fbm-sample": lambda: FractionalBrownianMotion(0.7).sample(torch.linspace(0, 1, 10, device="meta"), 2),
         "fbm-device": lambda: FractionalBrownianMotion(0.7).sample(torch.linspace(0, 1, 10), 2, device="meta"),
         "times": lambda: FractionalBrownianMotion(torch.tensor(0.7, device="meta"))}[call]()


def test_latent_posterior_samples_are_detached():
    from fracsde.latent import AffineControl, BridgeProblem

    prob = BridgeProblem(0.7, theta=1.0, obs_time=1.0, obs_value=1.0, obs_noise=0.5)
    model = prob.model(AffineControl(1, 1, 3))
    paths = model.sample_posterior(torch.linspace(0, 1, 5, dtype=torch.float64), 8, dt=0.02)
    assert not paths.requires_grad


# ------------------------------------------------------------------ 8. issue 19: runs and files lose nothing
def _train_argv(out, *extra):
    return ["train", *TINY, "--steps", "2", "--batch-size", "8", "--sample-every", "100", "--grid-steps", "2",
            "--sample-num", "4", "--out", str(out), *extra]


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "compare"])
def test_a_locked_output_is_refused_naming_the_holder(run, tmp_path, capsys, command):
    import os

    from models.gfdm.runfiles import run_lock

    ckpt = str(run / "checkpoint.pt")
    target, folder, argv = {
        "train": (tmp_path / "r", True, _train_argv(tmp_path / "r")),
        "sample": (tmp_path / "s", True, ["sample", "--checkpoint", ckpt, "--num", "2", "--steps", "2",
                                          "--out", str(tmp_path / "s")]),
        "evaluate": (tmp_path / "e.json", False, ["evaluate", "--checkpoint", ckpt, "--num", "2", "--steps", "2",
                                                  "--out", str(tmp_path / "e.json")]),
        "compare": (tmp_path / "c", True, ["compare", *TINY, "--steps", "2", "--out", str(tmp_path / "c")]),
    }[command]
    with run_lock(target, "holder", folder=folder):
        assert main(argv) == 2
    err = _one_error(capsys)
    assert f"{target} is in use by another gfdm process (pid {os.getpid()}, gfdm holder" in err
    assert not target.exists() or not any(p.name != ".gfdm.lock" for p in target.iterdir())


def test_the_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".gfdm.lock").write_text("pid 999999999, gfdm train\n")       # SIGKILLed holder: no flock on it
    assert main(_train_argv(out)) == 0
    assert "took over the lock of pid 999999999, gfdm train, which is no longer running" in capsys.readouterr().out
    assert not (out / ".gfdm.lock").exists() and (out / "checkpoint.pt").is_file()


def _flip_bytes_inside_a_weight(path):
    """Flip 16 bytes in the middle of the largest weight tensor's data in the file (the first copy: the EMA's or,
    if still equal to it, the model's)."""
    state = torch.load(path, weights_only=True)
    name, weight = max(state["ema"].items(), key=lambda kv: kv[1].numel())
    data = weight.contiguous().view(torch.uint8).numpy().tobytes()
    raw = bytearray(path.read_bytes())
    at = raw.find(data) + len(data) // 2
    assert at > len(data) // 2, "weight bytes not found in the file"
    raw[at:at + 16] = bytes(b ^ 0xFF for b in raw[at:at + 16])
    path.write_bytes(bytes(raw))
    loaded = torch.load(path, weights_only=True)               # torch reads it silently; model or EMA changed
    assert not (torch.equal(loaded["ema"][name], weight) and torch.equal(loaded["model"][name], state["model"][name]))


def test_a_checkpoint_with_flipped_bytes_is_refused_on_every_load(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.copy(run.parent / "pristine.pt", out / "checkpoint.pt")
    _flip_bytes_inside_a_weight(out / "checkpoint.pt")
    message = f"checkpoint {out / 'checkpoint.pt'} is damaged: its contents do not match the checksum"
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--num", "2", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 2
    assert message in _one_error(capsys)
    assert main([*_train_argv(out, "--resume"), "--steps", "3"]) == 2
    assert message in _one_error(capsys)


def test_divergence_stops_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_train_argv(out, "--lr", "1e9", "--ckpt-every", "1", "--log-every", "50"), "--steps", "40"]) == 2
    err = _one_error(capsys)
    assert "training diverged: " in err and "Try a smaller --lr (now 1e+09)" in err
    assert "nothing non-finite was written" in err and "NonFiniteStateError" not in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert f"the last finite checkpoint (step {state['step']}) is kept" in err
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[part].values() if v.is_floating_point())


def _small_disk(budget: int):
    """``os.fdopen`` of a disk with ``budget`` bytes free: a write past them fails with ENOSPC mid-file, as on a
    real full file system (torch's zip writer then raises a RuntimeError about the file position)."""
    import errno
    import io

    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() + len(memoryview(b)) > budget:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    return lambda fd, mode="wb", *a, **k: FullDisk(fd, "w", closefd=True)


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "checkpoint"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(run, tmp_path, capsys, monkeypatch, command):
    import models.gfdm.runfiles as runfiles

    ckpt = str(run / "checkpoint.pt")
    out, argv, target = {
        "train": (tmp_path / "r", _train_argv(tmp_path / "r"), "samples/grid-0000002.png"),     # its first file
        "sample": (tmp_path / "s", ["sample", "--checkpoint", ckpt, "--num", "2", "--steps", "2", "--no-progress",
                                    "--out", str(tmp_path / "s")], "grid.png"),
        "evaluate": (tmp_path / "e", ["evaluate", "--checkpoint", ckpt, "--num", "4", "--steps", "2",
                                      "--no-progress", "--out", str(tmp_path / "e" / "e.json")], "e.json"),
        "checkpoint": (tmp_path / "c", _train_argv(tmp_path / "c"), "checkpoint.pt"),
    }[command]
    if command == "evaluate":        # the feature network and reference statistics are cached first
        assert main([*argv[:-1], str(tmp_path / "warm" / "e.json")]) == 0
    # 200 bytes: every artefact is larger; 100 kB: the training grid fits, the checkpoint (~2.6 MB) does not
    monkeypatch.setattr(runfiles.os, "fdopen", _small_disk(100_000 if command == "checkpoint" else 200))
    assert main(argv) == 2
    err = _one_error(capsys)
    assert f"No space left on device while writing {out / target}" in err
    assert not (out / target).exists() and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_temporaries_of_a_killed_write_are_swept_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    assert main(_train_argv(out)) == 0
    left = [out / ".checkpoint.pt.k1ll3d.tmp", out / ".config.json.x9.tmp", out / "samples" / ".grid-0000001.png.a.tmp"]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    (out / "notes.tmp").write_text("the user's")
    assert main([*_train_argv(out, "--resume"), "--steps", "3"]) == 0
    assert not any(p.exists() for p in left) and (out / "notes.tmp").exists()


@pytest.mark.parametrize("command", ["sample", "evaluate", "train", "demo"])
def test_existing_results_are_refused_without_overwrite(run, tmp_path, capsys, command):
    from fracsde.demo import main as demo_main

    ckpt = str(run / "checkpoint.pt")
    out = tmp_path / "out"
    argv, kept = {
        "sample": (["sample", "--checkpoint", ckpt, "--num", "2", "--steps", "2", "--no-progress", "--out", str(out)],
                   out / "samples.npz"),
        "evaluate": (["evaluate", "--checkpoint", ckpt, "--num", "4", "--steps", "2", "--no-progress",
                      "--out", str(out / "e.json")], out / "e.json"),
        "train": (_train_argv(out), out / "metrics.jsonl"),
        "demo": (["--out", str(out)], out / "paths.png"),
    }[command]
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(b"the user's own file")
    run_command = demo_main if command == "demo" else main
    assert run_command(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and "--overwrite" in err, err
    assert kept.read_bytes() == b"the user's own file"
    if command != "demo":          # the demo's --overwrite run is covered by its one-line-error test
        assert run_command([*argv, "--overwrite"]) == 0
        assert kept.read_bytes() != b"the user's own file"


@pytest.fixture(scope="module")
def vp_run(tmp_path_factory):
    """A 2-step VP run with a non-default learning rate."""
    out = tmp_path_factory.mktemp("faults-vp") / "vp"
    assert main([*_train_argv(out, "--dynamics", "vp", "--lr", "2e-3")]) == 0
    return out


@pytest.mark.parametrize("flags, message", [
    (["--dynamics", "fvp"], "--dynamics fvp gives FVP(H=0.9,K=3) (the checkpoint has VP)"),
    (["--lr", "1e-3"], "--lr 0.001 (the checkpoint has 0.002)"),      # equal to the flag's default, still typed
    (["--precondition", "edm"], "--precondition edm (the checkpoint has 'none')"),
])
def test_resume_refuses_every_typed_flag_that_contradicts_the_checkpoint(vp_run, capsys, flags, message):
    before = (vp_run / "checkpoint.pt").read_bytes()
    assert main([*_train_argv(vp_run, "--resume", *flags), "--steps", "3"]) == 2
    err = _one_error(capsys)
    assert message in err and "contradicts the run being resumed; nothing was changed" in err
    assert (vp_run / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_a_config_json_that_disagrees_with_the_checkpoint(run, vp_run, tmp_path, capsys):
    import json
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(vp_run, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "seed": 7}))
    assert main([*_train_argv(edited, "--resume"), "--steps", "3"]) == 2
    err = _one_error(capsys)
    assert "config.json disagrees with" in err and "seed: config.json 7, checkpoint 0" in err
    assert "the checkpoint is the source of truth" in err
    swapped = tmp_path / "swapped"                 # an FVP run's folder holding a VP run's checkpoint
    shutil.copytree(run, swapped)
    shutil.copy(vp_run / "checkpoint.pt", swapped / "checkpoint.pt")
    assert main([*_train_argv(swapped, "--resume"), "--steps", "3"]) == 2
    assert "dynamics: config.json 'fvp', checkpoint 'vp'" in _one_error(capsys)


def test_sigint_saves_and_exits_130(tmp_path, monkeypatch):
    import os
    import signal

    import models.gfdm.train as train_module

    step = train_module._train_step

    def interrupted_step(run, *a):
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C during the second step
        return step(run, *a)

    monkeypatch.setattr(train_module, "_train_step", interrupted_step)
    out = tmp_path / "run"
    assert main([*_train_argv(out, "--log-every", "1"), "--steps", "50"]) == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "--device", "meta"], "device 'meta' holds shapes without values"),
    (["train", "--channels", "100000"], "the U-Net of --channels 100000"),
    (["train", "--sample-num", "1000000000"], "a training sample grid of --sample-num 1000000000 images needs"),
    (["train", "--out", "/proc/gfdm-run"], "--out /proc/gfdm-run: /proc does not accept new files"),
    (["sample", "--num", "1000000000"], "--num 1000000000 images of shape (1, 8, 8) needs"),
    (["evaluate", "--samples", "PICKLED"], "is not a samples file written by gfdm sample"),
])
def test_inputs_that_gave_tracebacks_are_one_line_errors(run, tmp_path, capsys, argv, message):
    import numpy as np

    if argv[0] == "train":
        argv = [*_train_argv(tmp_path / "r"), *argv[1:]]
    elif argv[0] == "sample":
        argv = ["sample", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "s"), *argv[1:]]
    else:
        np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        (tmp_path / "pickled.npy").rename(tmp_path / "pickled.npz")
        argv = ["evaluate", "--samples", str(tmp_path / "pickled.npz")]
    assert main(argv) == 2
    assert message in _one_error(capsys)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_a_config_null_for_a_setting_without_an_unset_value_is_an_argparse_error(tmp_path, capsys):
    import json

    (tmp_path / "c.json").write_text(json.dumps({"hurst": None}))
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "hurst=null is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--gamma-max", "0.5"], "--gamma-max must be finite and in (1, 10000]; got 0.5"),
    (["--gamma-max", "nan"], "--gamma-max must be finite and in (1, 10000]; got nan"),
    (["--gamma-max", "1e300"], "--gamma-max must be finite and in (1, 10000]; got 1e+300"),
    (["--out", "/proc/x"], "--out /proc/x: /proc does not accept new files"),
    (["--out", "FILE"], "is an existing file; --out needs a folder"),
])
def test_demo_bad_arguments_are_one_line_before_any_output(tmp_path, capsys, argv, message):
    from fracsde.demo import main as demo_main

    if "FILE" in argv:
        (tmp_path / "file").write_text("keep")
        argv = ["--out", str(tmp_path / "file")]
    try:
        rc = demo_main(argv)
    except SystemExit as e:            # argparse's own errors
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 2 and message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""          # nothing printed, then lost


def test_demo_prints_its_tables_without_warnings_and_marks_the_large_errors(tmp_path, capsys):
    import warnings

    from fracsde.demo import error_table

    with warnings.catch_warnings():
        warnings.simplefilter("error")           # an ApproximationWarning between the tables fails here
        table = error_table("type1")
    assert "| 0.9 | 9.51e-01* | 7.03e-01* |" in table and "* relative error above 0.5" in table


def test_fid_features_stream_in_batches_with_progress_bars(tmp_path, capsys):
    import numpy as np

    from models.gfdm.data import load_dataset
    from models.gfdm.metrics.common import feature_batches
    from models.gfdm.metrics.fid import FeatureStats, reference_stats

    data = load_dataset("digits")
    seen = []

    def extractor(images, progress=None):          # a stand-in feature network: four pixels per image
        seen.append(images.shape[0])
        return images.reshape(images.shape[0], -1)[:, 20:24].double().numpy()

    extractor.id = "four-pixels"
    stats = reference_stats(extractor, data, cache_dir=tmp_path, progress=True, chunk=400)
    assert max(seen) == 400 and sum(seen) == len(data)          # never all 1500 images at once
    assert "FID features of the reference (1500 digits images)" in capsys.readouterr().err
    whole = FeatureStats.from_features(extractor(data.all_float()))
    np.testing.assert_allclose(stats.mu, whole.mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, whole.sigma, rtol=1e-10)
    sizes = [b.shape[0] for b in feature_batches(torch.zeros(70, 1, 8, 8), 32, progress="FID features of 70")]
    assert sizes == [32, 32, 6] and "FID features of 70" in capsys.readouterr().err
