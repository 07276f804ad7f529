"""The ε-network for images: a guided-diffusion-style U-Net.

``UNet(config)(u, t, y=None)`` maps the GFDM network input ``u`` (same shape as an image,
``(batch, C, H, W)``) and the diffusion time ``t`` (``(batch,)``, in (0, 1]) to a prediction of ε of
the same shape as ``u``. Optional class labels ``y`` (``(batch,)`` int64) condition the network; the
extra embedding row ``num_classes`` stands for "no label", so a class-conditional net can still be
sampled unconditionally.

Building blocks: sinusoidal time embedding → MLP; residual blocks with GroupNorm, SiLU, dropout and the
embedding added between the two convolutions; multi-head self-attention at chosen resolutions; strided
convolutions down, nearest-neighbour + convolution up; skip connections by concatenation. Output and
residual-branch convolutions start at zero, so an untrained net predicts ε = 0 (loss ≈ 1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "UNet", "PRESETS", "unet_config", "AutocastNet"]


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 8
    in_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.0
    num_classes: int | None = None
    head_channels: int = 64          # heads = channels // head_channels (at least one)
    norm_groups: int = 32            # GroupNorm uses gcd(norm_groups, channels) groups
    time_scale: float = 1000.0       # t in (0, 1] is embedded as t * time_scale

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks", "head_channels",
                     "norm_groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be an integer >= 1; got {v!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty tuple of integers >= 1; "
                             f"got {self.channel_mult}")
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} cannot be halved {levels - 1} times "
                             f"(channel_mult {self.channel_mult} has {levels} levels); use fewer levels")
        bad = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not reached by this U-Net; "
                             f"its resolutions are {self.resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {self.dropout}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or self.num_classes < 1):
            raise ValueError(f"num_classes must be None or an integer >= 1; got {self.num_classes!r}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2 ** i for i in range(len(self.channel_mult)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown U-Net config keys {unknown}")
        return cls(**d)


# Presets. The "paper" ones follow GFDM's budget (reference sheet §4); the attention resolution of the
# MNIST net is not given there, so 7x7 is our choice. Dropout 0.1 on CIFAR-10 follows DDPM/score_sde.
PRESETS: dict[str, UNetConfig] = {
    # CPU presets for the 8x8 digits (resolutions 8, 4): "tiny" for tests, "small" for `gfdm compare`.
    "digits-tiny": UNetConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
                              num_res_blocks=1, attention_resolutions=(), norm_groups=8),
    "digits-small": UNetConfig(image_size=8, in_channels=1, model_channels=32, channel_mult=(1, 2),
                               num_res_blocks=1, attention_resolutions=(4,), norm_groups=8),
    "digits": UNetConfig(image_size=8, in_channels=1, model_channels=64, channel_mult=(1, 2, 2),
                         num_res_blocks=2, attention_resolutions=(4,)),
    # 28x28 (MNIST, Fashion-MNIST): a CPU/quick-GPU size and the paper's MNIST size.
    "mnist-small": UNetConfig(image_size=28, in_channels=1, model_channels=32, channel_mult=(1, 2, 2),
                              num_res_blocks=1, attention_resolutions=(7,), norm_groups=8),
    "mnist": UNetConfig(image_size=28, in_channels=1, model_channels=64, channel_mult=(1, 2, 4),
                        num_res_blocks=3, attention_resolutions=(7,)),
    # The paper's CIFAR-10 net: 128 channels, 4 res blocks, mult (1,2,2,2), attention at 8x8.
    "cifar10": UNetConfig(image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                          num_res_blocks=4, attention_resolutions=(8,), dropout=0.1),
}


def unet_config(preset: str, *, image_size: int | None = None, in_channels: int | None = None,
                num_classes: int | None = None, **overrides) -> UNetConfig:
    """A preset with the data's shape and any non-None overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    base = PRESETS[preset]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if image_size is not None:
        changes["image_size"] = image_size
    if in_channels is not None:
        changes["in_channels"] = in_channels
    changes["num_classes"] = num_classes
    return replace(base, **changes)


def _zero_init(layer: nn.Conv2d) -> None:
    """Weight and bias 0: the layer starts as the zero map (a residual branch starts as the identity)."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _groups(channels: int, wanted: int) -> int:
    return math.gcd(channels, wanted)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (cos, sin) of scaled times ``t`` of shape (batch,) → (batch, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        _zero_init(self.conv2)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            self.heads = 1
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        _zero_init(self.proj)

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Sequence(nn.ModuleList):
    """Layers that all take (x, emb)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, g = c.model_channels, c.norm_groups
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Row num_classes is the "no label" token.
        self.label_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None

        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(cur, mult * ch, emb_dim, c.dropout, g)]
                cur = mult * ch
                if res in c.attention_resolutions:
                    layers.append(Attention(cur, c.head_channels, g))
                self.down.append(Sequence(layers))
                skips.append(cur)
            if level < len(c.channel_mult) - 1:
                self.down.append(Sequence([Downsample(cur)]))
                skips.append(cur)
                res //= 2
        self.middle = Sequence([ResBlock(cur, cur, emb_dim, c.dropout, g), Attention(cur, c.head_channels, g),
                                ResBlock(cur, cur, emb_dim, c.dropout, g)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(cur + skips.pop(), mult * ch, emb_dim, c.dropout, g)]
                cur = mult * ch
                if res in c.attention_resolutions:
                    layers.append(Attention(cur, c.head_channels, g))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(Upsample(cur))
                    res *= 2
                self.up.append(Sequence(layers))
        self.norm_out = nn.GroupNorm(_groups(cur, g), cur)
        self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)
        _zero_init(self.conv_out)

    def forward(self, u: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if u.dim() != 4 or u.shape[1] != c.in_channels or u.shape[-1] != c.image_size \
                or u.shape[-2] != c.image_size:
            raise ValueError(f"UNet expects input of shape (batch, {c.in_channels}, {c.image_size}, "
                             f"{c.image_size}); got {tuple(u.shape)}")
        t = t.reshape(-1).expand(u.shape[0]) if t.numel() == 1 else t.reshape(-1)
        emb = self.time_mlp(timestep_embedding(t * c.time_scale, c.model_channels).to(u.dtype))
        if self.label_emb is not None:
            if y is None:                        # row num_classes: "no label"
                assert c.num_classes is not None     # label_emb exists only with num_classes
                y = torch.full((u.shape[0],), c.num_classes, dtype=torch.long, device=u.device)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("labels y were given to a U-Net built without class conditioning "
                             "(num_classes=None)")
        h = self.conv_in(u)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutocastNet(nn.Module):
    """Runs a network under bf16 autocast (CUDA) and hands the input's dtype back, so only the network,
    not the GFDM maths around it (covariances, solver updates), runs in reduced precision."""

    def __init__(self, net: nn.Module, enabled: bool = True):
        super().__init__()
        self.net, self.enabled = net, enabled

    def forward(self, u, t, **kw):
        if not self.enabled:
            return self.net(u, t, **kw)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = self.net(u, t, **kw)
        return out.to(u.dtype)
