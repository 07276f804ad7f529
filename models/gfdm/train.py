"""Training loop for image score networks: one process or many (torchrun), resumable bit for bit.

Randomness is a function of ``(seed, step, shard)``: each global batch (indices from a
:class:`~models.gfdm.data.BatchStream`) is cut into ``world_size × grad_accum`` shards, and shard ``j``
draws its diffusion times, noise, flips and dropout from generators seeded with ``(seed, step, j)``.
Hence a resumed run repeats the uninterrupted one exactly on CPU, and 2 processes × 1 shard equal
1 process × 2 accumulated shards up to float summation order. Gradients are averaged over shards.

:func:`train` reads as its four parts: :func:`_setup` (data, network, dynamics, optimiser),
:func:`_resume` (check a checkpoint, then apply it), :func:`_train_step` (one optimiser step) and the
log-and-save part of the loop (:func:`_log`, :func:`_write_grid`, :func:`_checkpoint_state`); :func:`_stop_on_signals`
turns SIGTERM / SIGINT into a checkpoint and a clean stop. The run folder is locked for the whole run
(:func:`models.gfdm.runfiles.run_lock`), every file in it is written atomically, and a run whose loss or weights
become non-finite stops with :class:`TrainingDiverged` before it writes anything non-finite.
"""
from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import models.gfdm as core  # the GFDM core (dynamics, loss, samplers); attribute access at call time
from fracsde.linear import LinearFractionalDynamics

from . import distributed
from .checkpoint import (
    CheckpointError,
    check_output_path,
    check_state_dict,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import IDENTITY_KEYS, NETWORK_KEYS, TrainConfig, normalize_keys
from .data import BatchStream, ImageDataset, load_dataset
from .ema import EMA
from .generate import class_labels, derive_seed, generate, save_grid
from .loss import check_t_eps
from .precondition import make_eps_model
from .runfiles import check_unlocked, run_lock, sweep_temporaries, write_text
from .spec import DynamicsSpec, RunSpec
from .time_sampling import TimeSampler
from .unet import AutocastNet, UNet, UNetConfig, unet_config

__all__ = ["TrainConfig", "train", "make_unet_config", "TrainingDiverged"]


class TrainingDiverged(ValueError):
    """The loss or the parameters became NaN or infinite; the last finite checkpoint is kept."""


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


# ------------------------------------------------------------------------------------------------ setup
@dataclass
class _Run:
    """Everything one training run holds; ``step`` and the timing fields advance as it trains."""

    cfg: TrainConfig
    ctx: distributed.Context
    use_amp: bool
    shards: int                   # world_size × grad_accum pieces of each global batch
    out: Path
    data: ImageDataset            # on the device
    fingerprint: str
    unet_config: UNetConfig
    model: nn.Module
    dyn: LinearFractionalDynamics
    dynamics: dict                # DynamicsSpec dict read from the built dynamics (the checkpoint's entry)
    label: str
    opt: torch.optim.Optimizer
    ema: EMA
    stream: BatchStream
    time_sampler: TimeSampler     # training times (checked against the dynamics' λ range at set-up)
    step: int = 0
    train_time: float = 0.0       # training seconds and steps, summed over resumed segments
    steps_timed: int = 0
    last_loss: float = float("nan")
    first_bad: torch.Tensor | None = None   # on the device: the first step whose loss was non-finite (0: none)
    bad_loss: torch.Tensor | None = None    # ... and that loss
    saved_step: int | None = None           # step of the last checkpoint written (or resumed from)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def images_per_s(self) -> float:
        return self.steps_timed * self.cfg.batch_size / self.train_time if self.train_time > 0 else float("nan")


def _setup(cfg: TrainConfig) -> _Run:
    ctx = distributed.init(cfg.device)
    use_amp = _resolve_amp(cfg.amp, ctx.device)
    shards = ctx.world_size * cfg.grad_accum
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world_size × grad_accum = {shards}")
    data = load_dataset(cfg.dataset, cfg.data_root, "train", cfg.download)
    if cfg.batch_size > len(data):     # before anything is allocated: such a batch repeats images and may not fit
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the training set of {data.name} ({len(data)} "
                         f"images); use --batch-size <= {len(data)}")
    if cfg.hflip is not None:
        data.hflip = cfg.hflip
    ucfg = make_unet_config(cfg, data)
    _check_memory(cfg, ucfg, data.shape, ctx.device)
    fingerprint = data.fingerprint()
    data = data.to(ctx.device)             # uint8 images live on the device; batches are scaled there
    torch.manual_seed(cfg.seed)
    model = UNet(ucfg).to(ctx.device)
    dyn = cfg.dynamics_spec().build().to(ctx.device)
    check_t_eps(cfg.t_eps, dyn.horizon)
    spec = DynamicsSpec.from_dynamics(dyn)
    time_sampler = TimeSampler(dyn, cfg.time_sampling, cfg.t_eps, torch.float32)   # a bad λ range fails here
    defaults = TrainConfig.defaults()
    recipe = {k: getattr(cfg, k) for k in ("time_sampling", "precondition", "sigma_data")
              if getattr(cfg, k) != defaults[k]}
    return _Run(cfg=cfg, ctx=ctx, use_amp=use_amp, shards=shards, out=Path(cfg.out), data=data,
                fingerprint=fingerprint, unet_config=ucfg, model=model, dyn=dyn, dynamics=spec.to_dict(),
                label=RunSpec(spec, recipe).label, opt=torch.optim.Adam(model.parameters(), lr=cfg.lr),
                ema=EMA(model, cfg.ema_halflife_kimg * 1000, cfg.ema_rampup),
                stream=BatchStream(len(data), cfg.batch_size, cfg.seed), time_sampler=time_sampler)


def _check_memory(cfg: TrainConfig, ucfg: UNetConfig, shape, device: torch.device) -> None:
    """Refuse a network or a training sample grid that cannot fit in the device's memory, before allocating:
    the network is built on the 'meta' device (shapes only) to count its parameters."""
    with torch.device("meta"):
        params = sum(p.numel() for p in UNet(ucfg).parameters())
    # float32 weights, EMA copy, gradients and Adam's two moments
    distributed.check_fits(params * 4 * 5, device, f"the U-Net of --channels {ucfg.model_channels} "
                           f"({params / 1e6:.4g}M parameters, with its EMA copy, gradients and Adam state)",
                           "use a smaller --channels or --preset")
    pixels = math.prod(shape)
    # the grid sampler holds x and K OU states per image, a few work arrays of each, and the float images
    distributed.check_fits(cfg.sample_num * pixels * 4 * (cfg.num_processes + 2) * 4, device,
                           f"a training sample grid of --sample-num {cfg.sample_num} images",
                           "use a smaller --sample-num (64 fill a grid)")


# ----------------------------------------------------------------------------------------------- resume
def _resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from (None: start at step 0), checked before any work: the output folder must
    be writable, a run is never overwritten by accident, and an explicit ``--resume`` needs its checkpoint."""
    out = check_output_path(cfg.out, "--out")
    ckpt_path = out / "checkpoint.pt"
    if not cfg.resume:
        if ckpt_path.exists() and not cfg.overwrite:
            raise FileExistsError(f"{ckpt_path} exists; pass --resume to continue that run or --overwrite "
                                  f"to start over in {out}")
        own = [str(out / name) for name in ("config.json", "metrics.jsonl", "samples") if (out / name).exists()]
        if own and not ckpt_path.exists() and not cfg.overwrite:
            raise FileExistsError(f"{out} holds {', '.join(own)} but no checkpoint (not a run this command can "
                                  f"continue); pass --overwrite to replace them or choose another --out")
        return None
    path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        where = "no checkpoint at" if not path.exists() else "a folder, not a checkpoint file:"
        raise FileNotFoundError(f"--resume: {where} {path}; nothing to continue (leave out --resume to start "
                                f"a new run, or pass --resume CHECKPOINT)")
    return path


def _check_resume(state: dict, run: _Run, path) -> None:
    """Everything that must match before a checkpoint may be applied (nothing is changed here)."""
    cfg, ucfg = run.cfg, run.unet_config
    saved = state.get("config")
    if not isinstance(saved, dict) or "optimizer" not in state or "data_stream" not in state:
        raise CheckpointError(f"{path} is a weights-only checkpoint; it cannot resume training")
    defaults = TrainConfig.defaults()          # keys an older checkpoint lacks had their default then
    diffs = [f"{k}: checkpoint {saved.get(k, defaults[k])!r}, this run {getattr(cfg, k)!r}" for k in IDENTITY_KEYS
             if saved.get(k, defaults[k]) != getattr(cfg, k)]
    if not diffs:     # same settings, yet the built dynamics may differ (e.g. a changed constructor default)
        try:
            saved_spec = DynamicsSpec.from_dict(state["dynamics"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its dynamics description is invalid: {e}") from None
        if saved_spec.to_dict() != run.dynamics:
            diffs.append(f"dynamics: checkpoint {saved_spec.to_dict()}, this run {run.dynamics}")
    if state["unet_config"] != ucfg.to_dict():
        diffs.append(f"network: checkpoint {state['unet_config']}, this run {ucfg.to_dict()}")
    if state["dataset"].get("fingerprint") != run.fingerprint:
        diffs.append("dataset contents differ (fingerprint)")
    if diffs:
        raise CheckpointError(f"{path} does not match this run; nothing was changed. Differences: "
                              + "; ".join(diffs))
    _check_config_file(run.out / "config.json", saved, path)
    check_state_dict(run.model, state["model"], "model", path)
    check_state_dict(run.model, state["ema"], "EMA", path)
    if int(state["step"]) > cfg.steps:
        raise CheckpointError(f"{path} is at step {state['step']}, beyond --steps {cfg.steps}")
    try:
        trial = torch.optim.Adam(UNet(ucfg).parameters(), lr=cfg.lr)
        trial.load_state_dict(state["optimizer"])
        BatchStream(len(run.data), cfg.batch_size, cfg.seed).load_state_dict(state["data_stream"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer or data-order state does not fit: {e}") from None


def _check_config_file(config_path: Path, saved: dict, ckpt_path) -> None:
    """The checkpoint is the source of truth of a run's settings; its folder's config.json is a copy for people.
    A copy that disagrees with it on what defines the run (an edited file, or a checkpoint swapped in from
    another run) is refused, naming the keys, instead of being silently overwritten."""
    if not config_path.is_file():
        return
    try:
        copy = normalize_keys({k: v for k, v in json.loads(config_path.read_text()).items()})
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{config_path} cannot be read ({e}); the checkpoint {ckpt_path} holds the run's "
                              f"settings: delete or restore config.json to resume") from None
    defaults = TrainConfig.defaults()
    keys = [k for k in (*IDENTITY_KEYS, *NETWORK_KEYS) if k in copy and k in defaults]
    differ = [f"{k}: config.json {copy[k]!r}, checkpoint {saved.get(k, defaults[k])!r}" for k in keys
              if _plain(copy[k]) != _plain(saved.get(k, defaults[k]))]
    if differ:
        raise CheckpointError(f"{config_path} disagrees with {ckpt_path} ({'; '.join(differ)}); the checkpoint is the "
                              f"source of truth of a run's settings: restore config.json (or delete it: it is "
                              f"rewritten at the next checkpoint), or resume from the right checkpoint")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _resume(run: _Run, path: Path, log) -> None:
    """Read and check everything first (a bad checkpoint changes nothing), then apply it."""
    state = load_checkpoint(path)
    _check_resume(state, run, path)
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.opt.load_state_dict(state["optimizer"])
    run.stream.load_state_dict(state["data_stream"])
    set_rng_state(state["rng"])
    run.step = int(state["step"])
    stats = state.get("stats") or {}
    run.train_time = float(stats.get("train_time_s", 0.0))
    run.steps_timed = int(stats.get("steps_timed", 0))
    run.last_loss = float(stats.get("loss", float("nan")))
    run.saved_step = run.step
    log(f"resumed from {path} at step {run.step}")
    saved_shards = state.get("shards")
    if saved_shards is not None and saved_shards != run.shards:
        log(f"note: the checkpoint used {saved_shards} shards per batch, this run uses {run.shards}; "
            f"the continuation is valid but not bit-identical to an uninterrupted run")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop the lines of a metrics log past ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    write_text(path, "".join(x + "\n" for x in keep))


#: what gfdm writes into a run folder besides checkpoint.pt and config.json (relative glob patterns); a new run
#: in the folder (--overwrite) removes these of the previous run, and nothing else
_RUN_ARTEFACTS = ("metrics.jsonl", "samples/grid-*.png", "eval-*.json", "samples-*/grid.png", "samples-*/samples.npz",
                  "samples-*/samples.eval.json")


def _remove_previous_artefacts(out: Path) -> None:
    for pattern in _RUN_ARTEFACTS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()
    for folder in [out / "samples", *out.glob("samples-*")]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _write_config(run: _Run) -> None:
    """config.json beside the checkpoint; written after each checkpoint (atomically), so the two always match."""
    write_text(run.out / "config.json", json.dumps({**run.cfg.to_dict(), "unet": run.unet_config.to_dict(),
                                                   "world_size": run.ctx.world_size}, indent=2))


def _prepare_output(run: _Run, resumed: bool, log) -> Path:
    """The folder, the metrics log (cut back to the checkpoint, or new: a previous run's artefacts are removed;
    its checkpoint and config.json stay until this run's first checkpoint replaces them) and the opening log line."""
    cfg, out, metrics_path = run.cfg, run.out, run.out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if resumed:
        _truncate_jsonl(metrics_path, run.step)
    else:
        _remove_previous_artefacts(out)
    nparams = sum(p.numel() for p in run.model.parameters())
    log(f"training {run.label} on {run.data.name} ({len(run.data)} images {run.data.shape}), U-Net {cfg.preset} "
        f"{nparams / 1e6:.2f}M params, batch {cfg.batch_size} on {run.ctx.world_size} × {run.ctx.device}"
        f"{' (bf16 autocast)' if run.use_amp else ''}, steps {run.step}→{cfg.steps}, out {out}")
    return metrics_path


# ------------------------------------------------------------------------------------------------- step
def _train_step(run: _Run, net: nn.Module, eps_model, loss_sum: torch.Tensor) -> float:
    """One optimiser step on the next global batch (this rank's shards, accumulated); returns the lr.
    ``loss_sum`` accumulates the shard losses on the device (no host sync here)."""
    cfg, ctx, device = run.cfg, run.ctx, run.ctx.device
    index = run.stream.next_indices().view(run.shards, -1)
    run.opt.zero_grad(set_to_none=True)
    for micro in range(cfg.grad_accum):
        shard = ctx.rank * cfg.grad_accum + micro
        torch.manual_seed(derive_seed(cfg.seed, run.step, shard, 1))       # dropout
        noise_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, run.step, shard, 2))
        flip_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, run.step, shard, 3))
        x, y = run.data.batch(index[shard], flip_generator=flip_gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        model_kwargs = {"y": y} if cfg.class_cond else None
        last = not ctx.distributed or micro == cfg.grad_accum - 1
        with nullcontext() if last else net.no_sync():  # type: ignore[operator]                   # all-reduce on the last shard only
            loss = core.score_matching_loss(eps_model, run.dyn, x, t_eps=cfg.t_eps, generator=noise_gen,
                                            model_kwargs=model_kwargs, time_sampling=run.time_sampler,
                                            check_finite=False)       # 8-bit images: finite, no host sync
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
        _note_non_finite(run, loss.detach())
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = cfg.lr * min(1.0, (run.step + 1) / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr
    for group in run.opt.param_groups:
        group["lr"] = lr
    run.opt.step()
    run.step += 1
    run.ema.update(run.model, cfg.batch_size, run.step * cfg.batch_size)
    return lr


def _note_non_finite(run: _Run, loss: torch.Tensor) -> None:
    """Remember (on the device, no host sync) the first step whose loss is NaN or infinite, and that loss."""
    if run.first_bad is None:
        run.first_bad = torch.zeros((), dtype=torch.int64, device=loss.device)
        run.bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
    first_bad, bad_loss = run.first_bad, run.bad_loss
    assert bad_loss is not None
    new = (first_bad == 0) & ~torch.isfinite(loss)
    run.first_bad = torch.where(new, run.step + 1, first_bad)
    run.bad_loss = torch.where(new, loss, bad_loss)


def _check_finite(run: _Run) -> None:
    """Stop with :class:`TrainingDiverged` if a loss since the start, or a weight now, is non-finite (two host
    syncs: called at log steps and before anything is written, never per step)."""
    first_bad = int(run.first_bad) if run.first_bad is not None else 0
    weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all())
    if not run.ctx.any(first_bad > 0 or not weights_ok):
        return
    cfg = run.cfg
    bad = float(run.bad_loss) if run.bad_loss is not None else math.nan
    what = (f"loss {bad} at step {first_bad}" if first_bad else
            f"the weights became non-finite by step {run.step} (last logged loss {run.last_loss:.4g})")
    kept = (f"the last finite checkpoint (step {run.saved_step}) is kept in {run.ckpt_path}"
            if run.saved_step is not None else "no checkpoint was written")
    raise TrainingDiverged(f"training diverged: {what}; {kept}, nothing non-finite was written. Try a smaller --lr "
                           f"(now {cfg.lr:g}), --grad-clip 1 (now {cfg.grad_clip:g}) or a longer --lr-warmup "
                           f"(now {cfg.lr_warmup})")


# -------------------------------------------------------------------------------------- log and save
def _checkpoint_state(run: _Run) -> dict:
    data = run.data
    return {"config": run.cfg.to_dict(), "unet_config": run.unet_config.to_dict(), "dynamics": run.dynamics,
            "dataset": {"name": data.name, "shape": list(data.shape), "num_classes": data.num_classes,
                        "fingerprint": run.fingerprint},
            "step": run.step, "nimg": run.step * run.cfg.batch_size, "model": run.model.state_dict(),
            "ema": run.ema.state_dict(), "optimizer": run.opt.state_dict(), "data_stream": run.stream.state_dict(),
            "rng": rng_state(), "shards": run.shards, "world_size": run.ctx.world_size,
            "stats": {"train_time_s": run.train_time, "steps_timed": run.steps_timed, "loss": run.last_loss}}


def _write_grid(run: _Run) -> Path:
    cfg = run.cfg
    labels = class_labels(cfg.sample_num, run.unet_config.num_classes)
    eps_model = make_eps_model(run.ema.model, run.dyn, cfg.precondition, cfg.sigma_data)
    images = generate(eps_model, run.dyn, cfg.sample_num, run.data.shape, batch_size=cfg.sample_num,
                      steps=cfg.grid_steps, seed=derive_seed(cfg.seed, 0x96D), labels=labels,
                      method=cfg.sampler, grid=cfg.grid,
                      device=run.ctx.device)
    assert images is not None                       # one process (the grid is written by the main rank only)
    return save_grid(images, run.out / "samples" / f"grid-{run.step:07d}.png")


def _log(run: _Run, metrics_file, loss_mean: torch.Tensor, lr: float, elapsed: float) -> None:
    """End of a log interval: the mean loss comes to the host (one sync per interval) and, on rank 0
    (``metrics_file`` is None on the others), a metrics line is written."""
    run.last_loss = float(loss_mean)
    _check_finite(run)
    if metrics_file:
        _append(metrics_file, {"step": run.step, "nimg": run.step * run.cfg.batch_size, "loss": run.last_loss,
                               "lr": lr, "img_per_s": run.images_per_s, "time_s": elapsed})


def _append(metrics_file, record: dict) -> None:
    """One line of metrics.jsonl, flushed; a failed write names the file (a cut line is dropped on --resume)."""
    try:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    except OSError as e:
        raise OSError(e.errno, e.strerror, metrics_file.name) from None


@contextmanager
def _stop_on_signals():
    """Yields a flag whose ``raised`` becomes the signal's name on SIGTERM / SIGINT (the loop then checkpoints
    and stops at its next log step); a second Ctrl-C stops at once. The old handlers come back on exit."""
    flag = _StopFlag()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, flag)
        except ValueError:   # not the main thread: no handlers, no graceful stop
            pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _StopFlag:
    def __init__(self):
        self.raised = None

    def __call__(self, signum, frame):
        if self.raised is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, log=print) -> dict:
    """Train per ``cfg``; returns a summary dict (final step, checkpoint path, loss, images/s, time) with the
    trained network and its EMA copy under ``"model"`` and ``"ema"``. Raises :class:`TrainingDiverged` at the
    first non-finite loss or weight (keeping the last finite checkpoint)."""
    check_unlocked(cfg.out)                  # another process's run: say so before anything else
    resume_path = _resume_path(cfg)
    run = _setup(cfg)
    if resume_path is not None:
        _resume(run, resume_path, log)
    with run_lock(run.out, "train", log=log):
        sweep_temporaries(run.out, ("checkpoint.pt", "config.json", "metrics.jsonl"))
        sweep_temporaries(run.out / "samples", ("grid-*.png",))
        return _train(run, resume_path, log)


def _train(run: _Run, resume_path: Path | None, log) -> dict:
    """The training loop of :func:`train`, in its locked run folder."""
    from tqdm.auto import tqdm

    cfg, ctx = run.cfg, run.ctx
    net = run.model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(run.model, device_ids=[ctx.device.index]
                                                  if ctx.device.type == "cuda" else None)
    eps_model = make_eps_model(AutocastNet(net, run.use_amp), run.dyn, cfg.precondition, cfg.sigma_data)
    metrics_path = _prepare_output(run, resume_path is not None, log) if ctx.is_main else None

    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (ctx.is_main and cfg.progress), unit="step",
               dynamic_ncols=True, desc=run.label)
    t_start = time.perf_counter()
    loss_sum, loss_count = torch.zeros((), device=ctx.device), 0     # over the shards of one log interval
    stopped = None
    metrics_file = open(metrics_path, "a") if metrics_path is not None else None
    try:
        with _stop_on_signals() as stop:
            run.model.train()
            while run.step < cfg.steps:
                t0 = time.perf_counter()       # training time excludes sample grids and checkpoints
                lr = _train_step(run, net, eps_model, loss_sum)
                loss_count += cfg.grad_accum
                run.train_time += time.perf_counter() - t0
                run.steps_timed += 1
                bar.update(1)
                step = run.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    _log(run, metrics_file, ctx.all_reduce_mean(loss_sum / max(loss_count, 1)), lr,
                         time.perf_counter() - t_start)
                    loss_sum.zero_()
                    loss_count = 0
                    bar.set_postfix(loss=f"{run.last_loss:.4f}", img_s=f"{run.images_per_s:.0f}")
                    over = cfg.time_limit is not None and time.perf_counter() - t_start > 60 * cfg.time_limit
                    if ctx.any(stop.raised is not None or over):
                        stopped = stop.raised or "time limit"
                grid_now = step % cfg.sample_every == 0 or step == cfg.steps
                save_now = step % cfg.ckpt_every == 0 or step == cfg.steps or stopped
                if grid_now or save_now:
                    _check_finite(run)              # on every rank: nothing non-finite is sampled or saved
                if ctx.is_main and grid_now:
                    _append(metrics_file, {"step": step, "grid": str(_write_grid(run))})
                if ctx.is_main and save_now:
                    save_checkpoint(_checkpoint_state(run), run.ckpt_path)
                    _write_config(run)
                    run.saved_step = step
                if stopped:
                    break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    ctx.barrier()
    if stopped and ctx.is_main:
        log(f"stopped ({stopped}) at step {run.step}; checkpoint {run.ckpt_path}; continue with --resume")
    return {"label": run.label, "step": run.step, "checkpoint": str(run.ckpt_path), "loss": run.last_loss,
            "img_per_s": run.images_per_s, "train_time_s": run.train_time, "stopped": stopped,
            "out": str(run.out), "dynamics": run.dynamics, "model": run.model, "ema": run.ema.model}
