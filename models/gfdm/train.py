"""Training loop for image score networks: one process or many (torchrun), resumable bit for bit.

Randomness is a function of ``(seed, step, shard)``: each global batch (indices from a
:class:`~models.gfdm.data.BatchStream`) is cut into ``world_size × grad_accum`` shards, and shard ``j``
draws its diffusion times, noise, flips and dropout from generators seeded with ``(seed, step, j)``.
Hence a resumed run repeats the uninterrupted one exactly on CPU, and 2 processes × 1 shard equal
1 process × 2 accumulated shards up to float summation order. Gradients are averaged over shards.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models.gfdm as core  # the GFDM core (dynamics, loss, samplers); attribute access at call time

from . import distributed
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_checkpoint
from .data import DATASETS, BatchStream, ImageDataset, load_dataset
from .ema import EMA
from .generate import class_labels, derive_seed, generate, save_grid
from .unet import PRESETS, AutocastNet, UNet, UNetConfig, unet_config

__all__ = ["TrainConfig", "train", "build_dynamics", "dynamics_label", "DYNAMICS", "IDENTITY_KEYS",
           "load_for_sampling", "AMP_CHOICES"]

DYNAMICS = ("vp", "ve", "fvp", "fve")
AMP_CHOICES = ("auto", "bf16", "off")


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    hflip: bool | None = None            # None: as the paper (CIFAR-10 only)
    # dynamics
    dynamics: str = "fvp"
    hurst: float = 0.9
    num_processes: int = 3
    # network (None: take the preset's value)
    preset: str = "digits-small"
    channels: int | None = None
    channel_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: tuple[int, ...] | None = None
    dropout: float | None = None
    class_cond: bool = False
    # optimisation
    batch_size: int = 128
    steps: int = 2000
    lr: float = 2e-4
    lr_warmup: int = 100
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_halflife_kimg: float = 25.0
    ema_rampup: float | None = 0.05
    t_eps: float = 1e-5
    amp: str = "auto"
    seed: int = 0
    # run
    out: str = "runs/gfdm"
    device: str = "auto"
    resume: str | None = None            # "auto": <out>/checkpoint.pt if present; else a path
    overwrite: bool = False
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 1000
    sample_num: int = 64
    sample_steps: int = 200
    time_limit: float | None = None      # minutes of wall time, then checkpoint and stop
    progress: bool = True

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(int(i) for i in v))
        _choice(self.dataset, "dataset", DATASETS)
        _choice(self.dynamics, "dynamics", DYNAMICS)
        _choice(self.preset, "preset", tuple(PRESETS))
        _choice(self.amp, "amp", AMP_CHOICES)
        if self.dynamics in ("fvp", "fve"):
            if not 0 < self.hurst < 1:
                raise ValueError(f"hurst must lie in (0, 1); got {self.hurst}")
            if self.num_processes < 1:
                raise ValueError(f"num_processes must be >= 1 for {self.dynamics} (use vp/ve for "
                                 f"Brownian diffusion); got {self.num_processes}")
        for name in ("batch_size", "steps", "grad_accum", "log_every", "ckpt_every", "sample_every",
                     "sample_num", "sample_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        for name in ("lr", "t_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.grad_clip < 0 or self.ema_halflife_kimg < 0 or self.lr_warmup < 0:
            raise ValueError("grad_clip, ema_halflife_kimg and lr_warmup must be >= 0")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# Settings a resumed run must share with its checkpoint (anything else may change, e.g. more steps).
IDENTITY_KEYS = ("dataset", "hflip", "dynamics", "hurst", "num_processes", "class_cond", "batch_size",
                 "seed", "t_eps", "lr", "lr_warmup", "grad_clip", "ema_halflife_kimg", "ema_rampup")


def _choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")


def build_dynamics(name: str, hurst: float = 0.9, num_processes: int = 3) -> nn.Module:
    if name in ("vp", "ve"):
        return core.make_dynamics(name)
    return core.make_dynamics(name, hurst=hurst, num_processes=num_processes)


def dynamics_label(name: str, hurst: float, num_processes: int) -> str:
    return name.upper() if name in ("vp", "ve") else f"{name.upper()}(H={hurst:g},K={num_processes})"


def dynamics_info(cfg) -> dict:
    fractional = cfg.dynamics in ("fvp", "fve")
    return {"name": cfg.dynamics, "hurst": float(cfg.hurst) if fractional else None,
            "num_processes": int(cfg.num_processes) if fractional else 0}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                       "gauss": py_state[2]}}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(i) for i in p["state"].tolist()), p["gauss"]))


def _resolve_amp(amp: str, device: torch.device) -> bool:
    if amp == "bf16" and device.type != "cuda":
        raise ValueError("--amp bf16 (mixed precision) is for CUDA devices only; use --amp off or auto on CPU")
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def make_unet_config(cfg: TrainConfig, data: ImageDataset) -> UNetConfig:
    c, h, w = data.shape
    if h != w:
        raise ValueError(f"square images expected; {data.name} has {h}x{w}")
    return unet_config(cfg.preset, image_size=h, in_channels=c,
                       num_classes=data.num_classes if cfg.class_cond else None,
                       model_channels=cfg.channels, channel_mult=cfg.channel_mult,
                       num_res_blocks=cfg.num_res_blocks, attention_resolutions=cfg.attention_resolutions,
                       dropout=cfg.dropout)


def _check_resume(state: dict, cfg: TrainConfig, ucfg: UNetConfig, fingerprint: str, model, path) -> None:
    """Everything that must match before a checkpoint may be applied (nothing is changed here)."""
    saved = state.get("config")
    if not isinstance(saved, dict) or "optimizer" not in state or "data_stream" not in state:
        raise CheckpointError(f"{path} is a weights-only checkpoint; it cannot resume training")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(cfg, k)!r}" for k in IDENTITY_KEYS
             if saved.get(k) != getattr(cfg, k)]
    if state["unet_config"] != ucfg.to_dict():
        diffs.append(f"network: checkpoint {state['unet_config']}, this run {ucfg.to_dict()}")
    if state["dataset"].get("fingerprint") != fingerprint:
        diffs.append("dataset contents differ (fingerprint)")
    if diffs:
        raise CheckpointError(f"{path} does not match this run; nothing was changed. Differences: "
                              + "; ".join(diffs))
    check_state_dict(model, state["model"], "model", path)
    check_state_dict(model, state["ema"], "EMA", path)
    if int(state["step"]) > cfg.steps:
        raise CheckpointError(f"{path} is at step {state['step']}, beyond --steps {cfg.steps}")


def load_for_sampling(path, device="cpu", weights: str = "ema"):
    """(network, dynamics, checkpoint dict) from a checkpoint, for sampling and evaluation."""
    state = load_checkpoint(path)
    try:
        ucfg = UNetConfig.from_dict(dict(state["unet_config"]))
        d = state["dynamics"]
        dyn = build_dynamics(d["name"], d.get("hurst") or 0.9, d.get("num_processes") or 0)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its network or dynamics description is invalid: {e}") from None
    net = UNet(ucfg)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw'; got {weights!r}")
    sd = state["ema" if weights == "ema" else "model"]
    check_state_dict(net, sd, weights, path)
    net.load_state_dict(sd)
    return net.to(device).eval(), dyn.to(device), state


class _StopFlag:
    """SIGTERM / SIGINT: checkpoint at the next log step and stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.raised = None

    def __call__(self, signum, frame):
        if self.raised is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name


def _truncate_jsonl(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def train(cfg: TrainConfig, log=print) -> dict:
    """Train per ``cfg``; returns a summary dict (final step, checkpoint path, loss, images/s, time) with the
    trained network and its EMA copy under ``"model"`` and ``"ema"``."""
    ctx = distributed.init(cfg.device)
    device = ctx.device
    use_amp = _resolve_amp(cfg.amp, device)
    shards = ctx.world_size * cfg.grad_accum
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world_size × grad_accum = {shards}")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"

    data = load_dataset(cfg.dataset, cfg.data_root, "train", cfg.download)
    if cfg.hflip is not None:
        data.hflip = cfg.hflip
    ucfg = make_unet_config(cfg, data)
    fingerprint = data.fingerprint()
    data = data.to(device)             # uint8 images live on the device; batches are scaled there
    torch.manual_seed(cfg.seed)
    model = UNet(ucfg).to(device)
    dyn = build_dynamics(cfg.dynamics, cfg.hurst, cfg.num_processes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMA(model, cfg.ema_halflife_kimg * 1000, cfg.ema_rampup)
    stream = BatchStream(len(data), cfg.batch_size, cfg.seed)
    step = 0

    # Resume: read and check everything first, so a bad checkpoint changes nothing.
    resume_path = None
    if cfg.resume:
        resume_path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not ckpt_path.exists():
            log(f"--resume: no checkpoint at {ckpt_path}; starting from step 0")
            resume_path = None
    elif ckpt_path.exists() and not cfg.overwrite:
        raise FileExistsError(f"{ckpt_path} exists; pass --resume to continue that run or --overwrite "
                              f"to start over in {out}")
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        _check_resume(state, cfg, ucfg, fingerprint, model, resume_path)
        try:
            trial = torch.optim.Adam(UNet(ucfg).parameters(), lr=cfg.lr)
            trial.load_state_dict(state["optimizer"])
            BatchStream(len(data), cfg.batch_size, cfg.seed).load_state_dict(state["data_stream"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{resume_path}: optimizer or data-order state does not fit: {e}") from None
        saved_shards = state.get("shards")
        saved_stats = state.get("stats") or {}
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data_stream"])
        _set_rng_state(state["rng"])
        step = int(state["step"])
        log(f"resumed from {resume_path} at step {step}")
        if saved_shards is not None and saved_shards != shards:
            log(f"note: the checkpoint used {saved_shards} shards per batch, this run uses {shards}; "
                f"the continuation is valid but not bit-identical to an uninterrupted run")

    stats = {"train_time_s": 0.0, "steps_timed": 0, "loss": float("nan")}
    if resume_path is not None:
        stats.update({k: saved_stats[k] for k in stats if k in saved_stats})
    net = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    eps_model = AutocastNet(net, use_amp)

    label = dynamics_label(cfg.dynamics, cfg.hurst, cfg.num_processes)
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "unet": ucfg.to_dict(),
                                                     "world_size": ctx.world_size}, indent=2))
        if resume_path is not None:
            _truncate_jsonl(metrics_path, step)
        elif metrics_path.exists():
            metrics_path.unlink()
        nparams = sum(p.numel() for p in model.parameters())
        log(f"training {label} on {data.name} ({len(data)} images {data.shape}), U-Net {cfg.preset} "
            f"{nparams / 1e6:.2f}M params, batch {cfg.batch_size} on {ctx.world_size} × {device}"
            f"{' (bf16 autocast)' if use_amp else ''}, steps {step}→{cfg.steps}, out {out}")

    def checkpoint_state() -> dict:
        return {"config": cfg.to_dict(), "unet_config": ucfg.to_dict(), "dynamics": dynamics_info(cfg),
                "dataset": {"name": data.name, "shape": list(data.shape), "num_classes": data.num_classes,
                            "fingerprint": fingerprint},
                "step": step, "nimg": step * cfg.batch_size, "model": model.state_dict(),
                "ema": ema.state_dict(), "optimizer": opt.state_dict(), "data_stream": stream.state_dict(),
                "rng": _rng_state(), "shards": shards, "world_size": ctx.world_size,
                "stats": {"train_time_s": train_time, "steps_timed": steps_timed, "loss": last_loss}}

    def write_grid() -> Path:
        labels = class_labels(cfg.sample_num, ucfg.num_classes)
        imgs = generate(ema.model, dyn, cfg.sample_num, data.shape, batch_size=cfg.sample_num,
                        steps=cfg.sample_steps, seed=derive_seed(cfg.seed, 0x96D), labels=labels,
                        device=device)
        return save_grid(imgs, out / "samples" / f"grid-{step:07d}.png")

    stop = _StopFlag()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):   # checkpoint, then stop, at the next log step
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:   # not the main thread
            pass

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (ctx.is_main and cfg.progress), unit="step",
               dynamic_ncols=True, desc=label)
    t_start = time.perf_counter()
    # training time and throughput accumulate over resumed segments (sampling grids and checkpoints excluded)
    train_time, steps_timed, last_loss = float(stats["train_time_s"]), int(stats["steps_timed"]), float(stats["loss"])
    imgs_per_s = steps_timed * cfg.batch_size / train_time if train_time > 0 else float("nan")
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    stopped = None
    mf = open(metrics_path, "a") if ctx.is_main else None
    try:
        model.train()
        while step < cfg.steps:
            t0 = time.perf_counter()
            index = stream.next_indices().view(shards, -1)
            opt.zero_grad(set_to_none=True)
            for a in range(cfg.grad_accum):
                j = ctx.rank * cfg.grad_accum + a
                torch.manual_seed(derive_seed(cfg.seed, step, j, 1))       # dropout
                gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, step, j, 2))
                flip_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, j, 3))
                x, y = data.batch(index[j], flip_generator=flip_gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                kw = {"y": y} if cfg.class_cond else None
                sync = nullcontext() if (not ctx.distributed or a == cfg.grad_accum - 1) else net.no_sync()
                with sync:
                    loss = core.score_matching_loss(eps_model, dyn, x, t_eps=cfg.t_eps, generator=gen,
                                                    model_kwargs=kw)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
                loss_count += 1
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            step += 1
            ema.update(model, cfg.batch_size, step * cfg.batch_size)
            train_time += time.perf_counter() - t0
            steps_timed += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = ctx.all_reduce_mean(loss_sum / max(loss_count, 1))
                last_loss = float(mean_loss)                               # one host sync per log interval
                imgs_per_s = steps_timed * cfg.batch_size / max(train_time, 1e-9)
                loss_sum.zero_()
                loss_count = 0
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{imgs_per_s:.0f}")
                if mf:
                    mf.write(json.dumps({"step": step, "nimg": step * cfg.batch_size, "loss": last_loss,
                                         "lr": lr, "img_per_s": imgs_per_s,
                                         "time_s": time.perf_counter() - t_start}) + "\n")
                    mf.flush()
                over = cfg.time_limit is not None and time.perf_counter() - t_start > 60 * cfg.time_limit
                if ctx.any(stop.raised is not None or over):
                    stopped = stop.raised or "time limit"
            if ctx.is_main and (step % cfg.sample_every == 0 or step == cfg.steps):
                path = write_grid()
                mf.write(json.dumps({"step": step, "grid": str(path)}) + "\n")
                mf.flush()
            if ctx.is_main and (step % cfg.ckpt_every == 0 or step == cfg.steps or stopped):
                save_checkpoint(checkpoint_state(), ckpt_path)
            if stopped:
                break
    finally:
        bar.close()
        if mf:
            mf.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ctx.barrier()
    if stopped and ctx.is_main:
        log(f"stopped ({stopped}) at step {step}; checkpoint {ckpt_path}; continue with --resume")
    return {"label": label, "step": step, "checkpoint": str(ckpt_path), "loss": last_loss,
            "img_per_s": imgs_per_s, "train_time_s": train_time, "stopped": stopped,
            "out": str(out), "dynamics": dynamics_info(cfg), "model": model, "ema": ema.model}


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]

