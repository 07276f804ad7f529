"""Bit-identity check for refactors: hashes of seeded results, to compare before and after a change.

    python scripts/bitcheck.py before.json     # on the old commit
    python scripts/bitcheck.py after.json      # on the new one; then compare the two JSON files key by key

Hashes (587): MA-fBM paths and covariances, sdeint solutions and adjoint/backprop gradients, FractionalOU log_prob,
FVP/FVE coefficient tables, Gaussian-oracle samples (sde/ode), loss and NLL, and a 12-step digits-tiny `gfdm train`
run (every checkpoint tensor) with `gfdm sample` (sde/ode). SKIP_CLI=1 skips the CLI part; BITCHECK_LR sets --lr.
"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from fracsde import FractionalSDE, MarkovApproxFBM, sdeint
from fracsde.distributions import FractionalOU
from models.gfdm import FVE, FVP, GaussianEpsModel, nll_bits_per_dim, sample, score_matching_loss

torch.set_num_threads(1)
F64 = torch.float64


def h(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous()
        data = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes()
        return hashlib.sha1(data).hexdigest()[:16]
    return hashlib.sha1(np.ascontiguousarray(t).tobytes()).hexdigest()[:16]


class OU(FractionalSDE):
    noise_type = "additive"  # may be ignored

    def __init__(self, noise):
        super().__init__(noise)
        self.theta = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))

    def f(self, t, x):
        return -self.theta * x

    def g(self, t, x):
        return 0.5 * torch.ones_like(x).unsqueeze(-1)


def library_hashes(out: dict) -> None:
    g = torch.Generator().manual_seed(0)
    for kind in ("type1", "type2"):
        n = MarkovApproxFBM(0.7, 3, kind=kind)
        out[f"mafbm_{kind}"] = h(n.sample(torch.linspace(0, 1, 65), 8, generator=g))
        out[f"mafbm_{kind}_nonuni"] = h(n.sample(torch.tensor([0.1, 0.3, 0.35, 0.9]), 8, generator=g))
        out[f"mafbm_cov_{kind}"] = h(n.covariance(torch.linspace(0, 1, 5)[:, None], torch.linspace(0, 1, 5)[None]))
    try:
        for kind in ("type1", "type2"):
            torch.manual_seed(1)
            sde = OU(MarkovApproxFBM(0.7, 3, kind=kind)).double()
            x0 = torch.ones(4, 1, dtype=F64)
            ts = torch.linspace(0, 1, 11, dtype=F64)
            xs = sdeint(sde, x0, ts, dt=0.01, method="euler")
            out[f"sdeint_{kind}"] = h(xs)
            for adj in (False, True):
                torch.manual_seed(2)
                xs = sdeint(sde, x0, ts, dt=0.01, method="midpoint", adjoint=adj)
                (gr,) = torch.autograd.grad(xs[-1].sum(), [sde.theta])
                out[f"grad_{kind}_{adj}"] = h(xs) + "/" + h(gr)
    except Exception as e:
        out["sdeint_error"] = repr(e)
    try:
        d = FractionalOU(torch.tensor(0.7, dtype=F64), torch.tensor(1.0, dtype=F64), torch.tensor(0.5, dtype=F64),
                         torch.linspace(0.1, 1, 10, dtype=F64), torch.tensor(0.1, dtype=F64))
        torch.manual_seed(3)
        x = d.sample((3,))
        out["fou_sample"] = h(x)
        out["fou_lp"] = h(d.log_prob(x))
    except Exception as e:
        out["fou_error"] = repr(e)


def gfdm_hashes(out: dict) -> None:
    for name, dyn in [("fvp", FVP(0.9, 3)), ("fve", FVE(0.9, 2)), ("vp", FVP(0.9, 0))]:
        t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=F64)
        for attr in ("sigma_tilde", "mean_coefficient", "eta"):
            if hasattr(dyn, attr):
                try:
                    out[f"{name}_{attr}"] = h(getattr(dyn, attr)(t))
                except Exception as e:
                    out[f"{name}_{attr}"] = repr(e)[:80]
        eps = GaussianEpsModel(dyn, 0.5, 0.2)
        for m in ("sde", "ode"):
            torch.manual_seed(4)
            out[f"{name}_sample_{m}"] = h(sample(eps, dyn, (16, 1, 2, 2), steps=30, method=m))
        torch.manual_seed(5)
        x0 = torch.randn(8, 1, 2, 2)
        out[f"{name}_loss"] = h(score_matching_loss(eps, dyn, x0))
        torch.manual_seed(6)
        out[f"{name}_nll"] = h(nll_bits_per_dim(eps, dyn, x0[:2], steps=10))


def _walk(out: dict, prefix: str, obj) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = h(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _walk(out, f"{prefix}.{k}", obj[k])
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(out, f"{prefix}[{i}]", v)


def cli_hashes(out: dict) -> None:
    d = "/tmp/bitcheck_run"
    shutil.rmtree(d, ignore_errors=True)
    gfdm = os.path.join(os.path.dirname(sys.executable), "gfdm")
    common = ["--threads", "1", "--no-progress"]
    lr = ["--lr", os.environ["BITCHECK_LR"]] if os.environ.get("BITCHECK_LR") else []
    subprocess.run([gfdm, "train", "--out", d, "--steps", "12", "--preset", "digits-tiny", "--batch-size", "16",
                    "--log-every", "4", "--ckpt-every", "6", "--sample-every", "12", "--sample-num", "4",
                    "--grid-steps", "5", *common, *lr], check=True, stdout=subprocess.DEVNULL)
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=True, map_location="cpu")
    for key in ("model", "ema", "optimizer"):
        if key in ck:
            _walk(out, "ckpt." + key, ck[key])
    for m in ("sde", "ode"):
        o = f"/tmp/bitcheck_s_{m}"
        shutil.rmtree(o, ignore_errors=True)
        subprocess.run([gfdm, "sample", "--checkpoint", f"{d}/checkpoint.pt", "--out", o, "--num", "8", "--steps",
                        "10", "--method", m, *common], check=True, stdout=subprocess.DEVNULL)
        for f in sorted(glob.glob(f"{o}/**/*.npz", recursive=True)):
            z = np.load(f)
            for k in z.files:
                out[f"cli_sample_{m}.{k}"] = h(z[k])


def main() -> None:
    out: dict = {}
    library_hashes(out)
    gfdm_hashes(out)
    if not os.environ.get("SKIP_CLI"):
        cli_hashes(out)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    if not os.environ.get("SKIP_CLI"):
        print(len(out), "hashes")


if __name__ == "__main__":
    main()
