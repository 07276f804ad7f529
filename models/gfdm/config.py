"""The configuration of a training run: one dataclass, the single source of its settings.

The flags of ``gfdm train`` (and the training flags of ``gfdm compare``) are generated from the fields of
:class:`TrainConfig` (their metadata holds the help text, the group and any argparse detail), config files
(``--config``) use the field names, and checkpoints and the run's ``config.json`` store
:meth:`TrainConfig.to_dict`. :meth:`TrainConfig.from_dict` reads those back, older names included.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .data import DATASETS, datasets_help
from .spec import DynamicsSpec
from .unet import PRESETS

__all__ = ["TrainConfig", "IDENTITY_KEYS", "NETWORK_KEYS", "AMP_CHOICES", "RENAMED", "RECORDED", "settings_only"]

AMP_CHOICES = ("auto", "bf16", "off")
#: older field name → its name now (read from old checkpoints and config files)
RENAMED = {"sample_steps": "grid_steps"}
#: keys a run writes into its config.json for the record; not settings, ignored when read back
RECORDED = ("unet", "world_size")


def _option(group: str):
    """A field factory for one flag group: ``default``, ``help`` and argparse details (``choices``, ``nargs``,
    ``metavar``, ``type``, ``const``, …; callables are evaluated when the parser is built)."""
    def option(default, help, **argparse):
        return field(default=default, metadata={"group": group, "help": help, "argparse": argparse})
    return option


_data, _dynamics, _network, _optimisation, _run = map(_option, ("data", "dynamics", "network", "optimisation",
                                                                "run"))


def _float_or_none(text):
    return None if str(text).lower() in ("none", "off") else float(text)


@dataclass
class TrainConfig:
    # data
    dataset: str = _data("digits", datasets_help, choices=lambda: tuple(DATASETS))
    data_root: str | None = _data(None, "folder with the dataset files (default: $GFDM_DATA, then standard places)")
    download: bool = _data(False, "download with torchvision into --data-root")
    hflip: bool | None = _data(None, "random horizontal flips (default: as the paper, CIFAR-10 only)")
    # dynamics: `dynamics` is a DynamicsSpec text; H and K come from `hurst`, `num_processes` unless it names
    # them (after __post_init__ it never does: they are moved into those two fields)
    dynamics: str = _dynamics("fvp", "vp/ve: Brownian (Song et al.); fvp/fve: fractional (GFDM); or a full "
                                     "spec, e.g. fvp:H=0.9,K=3,gamma_max=10 (any argument of FVP/FVE)",
                              metavar="SPEC")
    hurst: float = _dynamics(0.9, "Hurst index H of fvp/fve")
    num_processes: int = _dynamics(3, "number K of OU processes of fvp/fve")
    covariance_jitter: float = _dynamics(0.0, "fvp/fve: 0 = exact; 1e-4 = the official GFDM code's jitter on "
                                              "Sigma_YY (paper-compatible mode, docs/gfdm.md)")
    # network (None: take the preset's value)
    preset: str = _network("digits-small", "U-Net size (the flags below override single fields)",
                           choices=lambda: tuple(PRESETS))
    channels: int | None = _network(None, "base channels (default: preset)")
    channel_mult: tuple[int, ...] | None = _network(None, "per-level multipliers (default: preset)", nargs="+")
    num_res_blocks: int | None = _network(None, "residual blocks per level (default: preset)")
    attention_resolutions: tuple[int, ...] | None = _network(
        None, "resolutions with self-attention; none for no attention (default: preset)", nargs="*")
    dropout: float | None = _network(None, "dropout (default: preset)")
    class_cond: bool = _network(False, "condition on class labels")
    # optimisation
    batch_size: int = _optimisation(128, "global batch (all processes)")
    steps: int = _optimisation(2000, "optimizer steps")
    lr: float = _optimisation(1e-3, "Adam learning rate (1e-3 suits the default digits-small/digits-tiny runs; "
                                          "the paper used 2e-4 on CIFAR-10, 1e-4 on MNIST)")
    lr_warmup: int = _optimisation(100, "linear warm-up steps")
    grad_clip: float = _optimisation(1.0, "gradient-norm clip (0: off)")
    grad_accum: int = _optimisation(1, "micro-batches per step and process")
    ema_halflife_kimg: float = _optimisation(25.0, "EMA half-life in thousands of training images "
                                                   "(0.9999/step at batch 128 ≈ 887)")
    ema_rampup: float | None = _optimisation(0.05, "half-life at most this fraction of images seen ('none': off)",
                                             type=_float_or_none)
    t_eps: float = _optimisation(1e-5, "smallest diffusion time in training")
    time_sampling: str = _optimisation("uniform", "training times: uniform (the paper), log-snr[:LO,HI], edm, or "
                                                  "like:SPEC (the log-SNR law another dynamics has, e.g. like:vp)",
                                       metavar="RULE")
    precondition: str = _optimisation("none", "network parameterisation: none (eps = net(u, t), the paper) or "
                                              "edm (unit-variance input, c_noise(log-SNR), EDM scalings and "
                                              "loss weight)", choices=("none", "edm"))
    sigma_data: float = _optimisation(0.5, "data std assumed by --precondition edm")
    amp: str = _optimisation("auto", "bf16 autocast of the network (auto: on CUDA only; CPU runs in float32)",
                             choices=AMP_CHOICES)
    seed: int = _optimisation(0, "seed of weights, data order and noise")
    # run
    out: str = _run("runs/gfdm", "output folder (checkpoint.pt, metrics.jsonl, samples/)")
    device: str = _run("auto", "auto, cpu, cuda, cuda:1, …")
    resume: str | None = _run(None, "continue from CHECKPOINT (no value: OUT/checkpoint.pt if it exists)",
                              nargs="?", const="auto", metavar="CHECKPOINT")
    overwrite: bool = _run(False, "start over even if OUT holds a checkpoint")
    log_every: int = _run(50, "steps between metrics lines")
    ckpt_every: int = _run(500, "steps between checkpoints")
    sample_every: int = _run(1000, "steps between sample grids")
    sample_num: int = _run(64, "images in a training sample grid")
    grid_steps: int = _run(200, "sampler steps (network evaluations) of the training image grids")
    sampler: str = _run("sde", "sampler of the training image grids (models.gfdm.SAMPLERS)",
                        choices=lambda: _sampler_names())
    grid: str | None = _run(None, "time grid of that sampler: uniform, log-snr, edm (default: the sampler's)",
                            choices=("uniform", "log-snr", "edm"))
    time_limit: float | None = _run(None, "minutes of wall time, then checkpoint and stop")
    progress: bool = _run(True, "progress bar")

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(int(i) for i in v))
        _choice(self.dataset, "dataset", tuple(DATASETS))
        _choice(self.preset, "preset", tuple(PRESETS))
        _choice(self.amp, "amp", AMP_CHOICES)
        spec = DynamicsSpec.parse(self.dynamics)           # the family, and a clear error for a bad text
        if spec.fractional:
            if not 0 < self.hurst < 1:
                raise ValueError(f"hurst must lie in (0, 1); got {self.hurst}")
            if self.num_processes < 1:
                raise ValueError(f"num_processes must be >= 1 for {spec.family} (use vp/ve for "
                                 f"Brownian diffusion); got {self.num_processes}")
            spec = self.dynamics_spec()
            self.hurst, self.num_processes = spec.kwargs["hurst"], spec.kwargs["num_processes"]
            self.covariance_jitter = spec.kwargs["covariance_jitter"]
        elif self.covariance_jitter:
            raise ValueError(f"covariance_jitter applies to fvp/fve; got {self.covariance_jitter} for {spec.family}")
        self.dynamics = spec.format(omit=("hurst", "num_processes", "covariance_jitter"))
        check_time_sampling(self.time_sampling)
        _choice(self.precondition, "precondition", ("none", "edm"))
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0; got {self.sigma_data}")
        for name in ("batch_size", "steps", "grad_accum", "log_every", "ckpt_every", "sample_every",
                     "sample_num", "grid_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        for name in ("lr", "t_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("grad_clip", "ema_halflife_kimg", "lr_warmup"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 minutes (or none); got {self.time_limit}")

    def dynamics_spec(self) -> DynamicsSpec:
        """The dynamics this run trains: ``dynamics`` with H and K from ``hurst`` and ``num_processes``."""
        defaults = {"hurst": self.hurst, "num_processes": self.num_processes}
        if DynamicsSpec.parse(self.dynamics).fractional:
            defaults["covariance_jitter"] = self.covariance_jitter
        return DynamicsSpec.parse(self.dynamics, defaults=defaults)

    def with_dynamics(self, spec: DynamicsSpec, **changes) -> TrainConfig:
        """A copy that trains ``spec`` (H and K of a Brownian spec leave ``hurst``, ``num_processes`` as they are)."""
        values = {**self.to_dict(), "dynamics": spec.text, **changes}
        return TrainConfig(**values)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def defaults(cls) -> dict:
        """Field name → default value."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From :meth:`to_dict`, a checkpoint's ``"config"`` or a run's ``config.json`` (older field names are
        renamed, the keys a run records beside its settings are skipped, any other unknown key is an error)."""
        return cls(**normalize_keys(d))


def settings_only(d: dict) -> dict:
    """``d`` with dashes in keys as underscores, older names renamed and the recorded keys dropped."""
    renamed = ((RENAMED.get(k.replace("-", "_"), k.replace("-", "_")), v) for k, v in d.items())
    return {k: v for k, v in renamed if k not in RECORDED}


def normalize_keys(d: dict) -> dict:
    """:func:`settings_only`, and an error naming any key that is not a TrainConfig field."""
    names = {f.name for f in fields(TrainConfig)}
    out = settings_only(d)
    unknown = sorted(set(out) - names)
    if unknown:
        raise ValueError(f"unknown TrainConfig keys {unknown}; allowed: {sorted(names)}")
    return out


# Settings a resumed run must share with its checkpoint (anything else may change, e.g. more steps).
IDENTITY_KEYS = ("dataset", "hflip", "dynamics", "hurst", "num_processes", "class_cond", "batch_size",
                 "seed", "t_eps", "lr", "lr_warmup", "grad_clip", "ema_halflife_kimg", "ema_rampup",
                 "covariance_jitter", "time_sampling", "precondition", "sigma_data")


#: the settings that define the network (its shape): fixed for a run, like IDENTITY_KEYS
NETWORK_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata["group"] == "network")


def _sampler_names():
    from .sampling import SAMPLERS
    return tuple(SAMPLERS)


def check_time_sampling(rule: str) -> str:
    """The syntax of a time-sampling rule (its λ range is checked against the dynamics when a run starts)."""
    name, _, arg = str(rule).partition(":")
    if name == "like" and arg:
        DynamicsSpec.parse(arg)            # a clear error naming the bad spec
    elif not ((name in ("uniform", "edm") and not arg) or name == "log-snr"):
        raise ValueError(f"time_sampling must be uniform, log-snr, log-snr:LO,HI, edm or like:SPEC; got {rule!r}")
    return rule


def _choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
