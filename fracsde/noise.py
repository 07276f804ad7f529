"""Markov (OU-mixture) noise: the one interface every fractional model in fracsde is driven by.

A Markov noise is K Ornstein–Uhlenbeck processes driven by ONE Brownian motion W,

    dY_k = −γ_k Y_k dt + dW_t,     B̂_t = Σ_k ω_k Ŷ_k(t),   Ŷ = Y (type II) or Y − Y(0) (type I),

given by its rates γ, weights ω, kind (the law of Y(0): zero or stationary, see :mod:`fracsde.kinds`) and
the horizon T it was built for. :class:`MarkovNoise` holds a user-given (γ, ω); :class:`fracsde.MarkovApproxFBM`
is the one whose ω is L2-optimal for fBM of Hurst index H. :class:`fracsde.FractionalSDE`,
:class:`fracsde.LinearFractionalDynamics`, :class:`fracsde.distributions.FractionalOU` and the latent models
accept any of them.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from . import _validation as V
from .kinds import get_kind
from .numerics import is_uniform_grid, psd_factor

__all__ = ["MarkovNoise", "check_rates", "step_covariance", "cancellation", "SAMPLE_METHODS", "INNOVATION_BLOCK",
           "MAX_CANCELLATION",
           "REDUCED_PRECISION_CANCELLATION"]

#: Refuse weights whose sum Σ ω_k Y_k cancels so much that Var B̂ = ωᵀΣω loses more than 13 of float64's 16
#: digits: the ratio |ω|ᵀ|Σ||ω| / ωᵀΣω (Σ the states' covariance at the horizon) above 1e13.
MAX_CANCELLATION = 1e13

#: Sampling in float32 forms B̂ = Σ ω_k Y_k with 7 digits; above this cancellation ratio (3.5 digits lost in the
#: variance) the path is computed in float64 and cast, so no dtype returns a path its rounding has distorted.
REDUCED_PRECISION_CANCELLATION = 1e3

#: ``MarkovNoise.sample(method=...)``: one normal per step for B̂ alone, or the full OU state.
SAMPLE_METHODS = ("auto", "innovations", "state")

#: Steps per block of the innovations sampler. Each block costs one (C × C) lower-triangular product per
#: path plus a K-dim carry; C = 16–32 measured fastest on this machine (8 pays for the per-block carry
#: and small products, 64+ for the C² flops).
INNOVATION_BLOCK = 32

#: Steps per block of the joint (B̂, W) innovations sampler (2C normals per block): 8, 16 and 32 price a rough
#: Bergomi smile within 12 % of each other (benchmarks/bench_roughvol.py --sections 7; K = 16, one thread).
JOINT_INNOVATION_BLOCK = 16

#: Plans of the innovations samplers kept (module-wide, keyed by grid, rates, weights, kind and block).
_PLAN_CACHE_SIZE = 4
_PLAN_CACHE: OrderedDict = OrderedDict()


def check_rates(gammas, name: str = "gammas") -> torch.Tensor:
    """Rates as a detached float64 CPU tensor: non-empty, 1-D, finite and > 0 (else a ValueError naming them)."""
    g = torch.as_tensor(gammas, dtype=torch.float64).detach().clone().cpu()
    if g.dim() != 1 or g.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D sequence; got shape {tuple(g.shape)}")
    if not bool((g > 0).all()) or not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} must be finite and > 0; got {g.tolist()}")
    return g


def step_covariance(gammas: torch.Tensor, h) -> torch.Tensor:
    """(*h.shape, D, D) covariance of the exact OU innovations ξ_k = ∫_t^{t+h} e^{−γ_k(t+h−s)} dW_s over a step h.

    Cov(ξ_i, ξ_j) = (1 − e^{−(γ_i+γ_j)h})/(γ_i+γ_j), with the limit h where γ_i + γ_j = 0: a zero rate is the
    Brownian increment ΔW itself (Cov(ξ_k, ΔW) = (1 − e^{−γ_k h})/γ_k, Var ΔW = h). float64.
    """
    g = gammas.to(torch.float64)
    h = torch.as_tensor(h, dtype=torch.float64, device=g.device)[..., None, None]
    s = g[:, None] + g[None, :]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, -torch.expm1(-safe * h) / safe, h)


def cancellation(gammas, weights, kind: str = "type2", horizon: float = 1.0) -> float:
    """|ω|ᵀ|Σ||ω| / ωᵀΣω, Σ = Cov(Ŷ(T)) at the horizon: by how much B̂ = Σ ω_k Ŷ_k cancels (1 = not at all).

    Var B̂ computed in a floating-point format with unit round-off u is accurate to about u times this ratio
    (:data:`MAX_CANCELLATION`, :data:`REDUCED_PRECISION_CANCELLATION`). Positive weights (rough H) give 1.
    """
    w = torch.as_tensor(weights).detach().to(torch.float64).cpu()
    g = torch.as_tensor(gammas).detach().to(torch.float64).cpu()
    T = torch.tensor(float(horizon), dtype=torch.float64)
    S = get_kind(kind).state_cross_covariance(g, T, T)
    num = float(w.abs() @ S.abs() @ w.abs())
    den = float(w @ S @ w)
    if num == 0.0:                                    # ω = 0: B̂ ≡ 0, nothing cancels
        return 1.0
    return num / den if den > 0 else math.inf


def _innovation_gains(steps: torch.Tensor, gammas: torch.Tensor, weights: torch.Tensor, kind: str):
    """Kalman gains of the OU state given B̂'s past, for the steps ``steps`` (N,) from t = 0 (float64).

    The filtered state x_n (D-dim) evolves as x_{n+1} = diag(f_n) x_n + ξ_n and is read out exactly (no
    observation noise) as B̂_n = Hᵀx_n:
      * type II: x = Y, H = ω, x_0 = 0;
      * type I: x = (Y, u) with the constant u = ωᵀY(0), H = (ω, −1), rates (γ, 0) and x_0 ~ N(0, P_0),
        P_0 = Cov(Y(0), ωᵀY(0)) — so B̂_0 = Hᵀx_0 = 0 and the filter starts without an update.
    With m_n = E[x_n | B̂_1..B̂_n] and P_n its covariance, one step is
        P⁻ = f fᵀ ⊙ P_n + Q_n,   S_n = HᵀP⁻H,   g_n = P⁻H / √S_n,   P_{n+1} = P⁻ − g_n g_nᵀ,
    and the path follows from one standard normal z_n per step (innovations form):
        B̂_{n+1} = Hᵀ(f ⊙ m_n) + √S_n z_n,     m_{n+1} = f ⊙ m_n + g_n z_n      (√S_n = Hᵀg_n).
    None of this depends on the path. Returns (g (N, D), rates r (D,), read-out H (D,)) with f_n = e^{−r h_n}.
    A step whose innovation variance vanishes (S_n ≤ 1e−14 of its scale, e.g. ω = 0) gets g_n = 0.
    """
    g = gammas.to(torch.float64)
    w = weights.to(torch.float64)
    K = g.numel()
    rules = get_kind(kind)
    if rules.stationary_start:
        rates = torch.cat([g, g.new_zeros(1)])
        read = torch.cat([w, -w.new_ones(1)])
        S0 = rules.initial_covariance(g)
        s0w = S0 @ w
        P = torch.cat([torch.cat([S0, s0w[:, None]], 1), torch.cat([s0w, (w @ s0w)[None]])[None]], 0).numpy()
    else:
        rates, read = g, w
        P = np.zeros((K, K))
    s = g[:, None] + g[None, :]
    Q = (-torch.expm1(-s * steps[:, None, None]) / s).numpy()                  # OU innovation covariances
    decay = torch.exp(-steps[:, None] * rates).numpy()
    H = read.numpy()
    absH = np.abs(H)
    N, D = steps.numel(), rates.numel()
    gains = np.zeros((N, D))
    Qa = np.zeros((D, D))
    for n in range(N):                          # sequential but tiny (D ≤ K + 1); done once per grid
        Qa[:K, :K] = Q[n]
        Pm = P * np.outer(decay[n], decay[n]) + Qa
        PH = Pm @ H
        S = float(H @ PH)
        if S > 1e-14 * float(absH @ np.abs(Pm) @ absH):
            gains[n] = PH / np.sqrt(S)
            P = Pm - np.outer(gains[n], gains[n])
        else:
            P = Pm
    return torch.from_numpy(gains), rates, read


def _innovations_plan(grid: torch.Tensor, gammas: torch.Tensor, weights: torch.Tensor, kind: str,
                      block: int) -> dict:
    """Block operators of the innovations sampler on ``grid`` (float64, CPU, grid[0] = 0).

    Unrolling the innovations form of :func:`_innovation_gains` over the C steps n0..n0+C−1 of a block
    (outputs at τ_j = t_{n0+j+1}, start t_{n0}, end τ_{C−1}; all transition products are e^{−r Δt} because
    the state transition is diagonal) gives, with z the block's C normals and m = m_{n0}:
        B̂(τ_j) = Σ_{i≤j} T_{ji} z_i + Σ_d M_{jd} m_d,     T_{ji} = Σ_d H_d e^{−r_d(τ_j − τ_i)} g_{n0+i,d},
                                                        M_{jd} = H_d e^{−r_d(τ_j − t_{n0})},
        m_{n0+C} = e^{−r(τ_{C−1} − t_{n0})} ⊙ m + Σ_i R_{id} z_i,   R_{id} = e^{−r_d(τ_{C−1} − τ_i)} g_{n0+i,d}
    (T_{jj} = Hᵀg = √S). So B̂ on a block is one product of the normals with a fixed lower-triangular
    operator plus a rank-D term in the carried filter mean: the Cholesky factor of Cov(B̂) is
    semiseparable. The last block is padded with zero-gain steps. Returns float64 tensors
    ``within`` (nb, C, C + D) = [Tᵀ | R], ``rest`` (nb, D, C) = Mᵀ, ``carry_gain`` (nb, D), and ``block``.
    """
    steps = torch.diff(grid)
    gains, rates, read = _innovation_gains(steps, gammas, weights, kind)
    N, D = gains.shape
    C = max(1, min(block, N))
    nb = -(-N // C)
    pad = nb * C - N
    G = torch.cat([gains, gains.new_zeros(pad, D)]).view(nb, C, D)
    tau = torch.cat([grid[1:], grid[-1:].expand(pad)]).view(nb, C)          # output times of each block
    start = grid[torch.arange(nb) * C]
    end = tau[:, -1]
    lag = (tau[:, :, None] - tau[:, None, :]).clamp(min=0)                  # τ_j − τ_i (zero above the diagonal)
    T = torch.zeros(nb, C, C, dtype=torch.float64)
    for d in range(D):
        T += read[d] * torch.exp(-rates[d] * lag) * G[:, None, :, d]
    T = torch.tril(T)
    M = read * torch.exp(-rates * (tau - start[:, None])[..., None])       # (nb, C, D)
    R = torch.exp(-rates * (end[:, None] - tau)[..., None]) * G             # (nb, C, D)
    carry = torch.exp(-rates * (end - start)[:, None])                       # (nb, D)
    return {"within": torch.cat([T.transpose(1, 2), R], 2), "rest": M.transpose(1, 2).contiguous(),
            "carry_gain": carry, "block": C, "cast": {}}


def _joint_innovation_gains(steps: torch.Tensor, gammas: torch.Tensor, weights: torch.Tensor, kind: str):
    """Kalman gains of the OU state given the past of (B̂, W) jointly: two observations per step.

    The state is x = (Y, [u,] W) with rates (γ, [0,] 0) — W is one more component that never decays — and the
    read-out Hm (D, 2) has columns (ω, [−1,] 0) for B̂ and (0, [0,] 1) for W (u = ωᵀY(0) for type I, as in
    :func:`_innovation_gains`). One step: P⁻ = f fᵀ ⊙ P + Q, S = HmᵀP⁻Hm (2 × 2) = L Lᵀ (Cholesky, a pivot that
    vanishes to 1e−14 of its scale is dropped with its gain column), G = P⁻Hm L^{−T} (D × 2), P ← P⁻ − G Gᵀ; the
    observations follow from two normals z: (B̂, W)_{n+1} = Hmᵀ(f ⊙ m) + L z, m ← f ⊙ m + G z (HmᵀG = L).
    Returns (gains (N, D, 2), rates (D,), Hm (D, 2)) as float64 tensors.
    """
    g = gammas.to(torch.float64)
    w = weights.to(torch.float64)
    K = g.numel()
    rules = get_kind(kind)
    extra = 1 if rules.stationary_start else 0
    D = K + extra + 1
    rates = torch.cat([g, g.new_zeros(extra + 1)])
    Hm = np.zeros((D, 2))
    Hm[:K, 0] = w.numpy()
    Hm[D - 1, 1] = 1.0
    P = np.zeros((D, D))
    if extra:
        Hm[K, 0] = -1.0
        S0 = rules.initial_covariance(g).numpy()
        s0w = S0 @ w.numpy()
        P[:K, :K] = S0
        P[:K, K] = P[K, :K] = s0w
        P[K, K] = float(w.numpy() @ s0w)
    noisy = list(range(K)) + [D - 1]                                   # Y and W receive noise; u does not
    Q = step_covariance(torch.cat([g, g.new_zeros(1)]), steps).numpy()  # (N, K+1, K+1)
    decay = torch.exp(-steps[:, None] * rates).numpy()
    N = steps.numel()
    gains = np.zeros((N, D, 2))
    Qa = np.zeros((D, D))
    idx = np.ix_(noisy, noisy)
    scale = np.abs(Hm)
    for n in range(N):
        Qa[idx] = Q[n]
        Pm = P * np.outer(decay[n], decay[n]) + Qa
        PH = Pm @ Hm
        S = Hm.T @ PH
        tol = 1e-14 * (scale.T @ np.abs(Pm) @ scale)
        g0 = np.zeros(D)
        l21 = 0.0
        if S[0, 0] > tol[0, 0]:
            l11 = np.sqrt(S[0, 0])
            g0 = PH[:, 0] / l11
            l21 = S[1, 0] / l11
        g1 = np.zeros(D)
        rest = S[1, 1] - l21 * l21
        if rest > tol[1, 1]:
            g1 = (PH[:, 1] - g0 * l21) / np.sqrt(rest)
        gains[n, :, 0], gains[n, :, 1] = g0, g1
        P = Pm - np.outer(g0, g0) - np.outer(g1, g1)
    return torch.from_numpy(gains), rates, torch.from_numpy(Hm)


def _joint_innovations_plan(grid: torch.Tensor, gammas: torch.Tensor, weights: torch.Tensor, kind: str,
                            block: int, left_points: bool = False) -> dict:
    """Block operators of the joint (B̂, W) innovations sampler: :func:`_innovations_plan` with two observations
    and two normals per step, laid out time-major (paths last) for :func:`_apply_joint_innovations`.

    With z (2C, batch) a block's normals (step-major: 2i + b) and m (D, batch) the filter mean entering it,
    ``apply`` (nb, 2C + D, 2C) gives y = apply @ z whose first 2C rows, plus ``rest`` (nb, 2C, D) @ m, are the
    block's outputs — C values of B̂ then C of W at its C step ends; with ``left_points`` instead B̂ at the C
    steps' left points (the first is the read-out of m) and W's C increments — and whose last D rows, plus
    ``carry_gain`` (nb, D) ⊙ m, are the mean handed on.
    """
    steps = torch.diff(grid)
    gains, rates, Hm = _joint_innovation_gains(steps, gammas, weights, kind)
    N, D, p = gains.shape
    C = max(1, min(block, N))
    nb = -(-N // C)
    pad = nb * C - N
    G = torch.cat([gains, gains.new_zeros(pad, D, p)]).view(nb, C, D, p)
    tau = torch.cat([grid[1:], grid[-1:].expand(pad)]).view(nb, C)
    start = grid[torch.arange(nb) * C]
    end = tau[:, -1]
    lag = (tau[:, :, None] - tau[:, None, :]).clamp(min=0)                   # (nb, C_j, C_i)
    lower = torch.tril(torch.ones(C, C, dtype=torch.bool))
    T = torch.zeros(nb, C, p, C, p, dtype=torch.float64)                      # (out j, a; in i, b)
    for d in range(D):
        e = torch.exp(-rates[d] * lag) * lower                                 # (nb, C, C)
        T += e[:, :, None, :, None] * Hm[d][None, None, :, None, None] * G[:, None, None, :, d, :]
    T = T.permute(0, 2, 1, 3, 4).reshape(nb, p * C, C * p)                    # rows (a, j), columns (i, b)
    M = (Hm.T[None, :, None, :] * torch.exp(-rates * (tau - start[:, None])[..., None])[:, None]).reshape(
        nb, p * C, D)                                                          # rows (a, j)
    if left_points:
        # B̂ at step j's left point: the read-out Hm[:, 0]ᵀm for j = 0, else B̂ at the end of step j − 1; W's
        # increment: W at the step's end minus W at its start (for j = 0 the read-out Hm[:, 1]ᵀm, observed exactly)
        TB, TW, MB, MW = T[:, :C], T[:, C:], M[:, :C], M[:, C:]
        zT = TB.new_zeros(nb, 1, C * p)
        hB, hW = Hm[:, 0].expand(nb, 1, D), Hm[:, 1].expand(nb, 1, D)
        T = torch.cat([torch.cat([zT, TB[:, :-1]], 1), TW - torch.cat([zT, TW[:, :-1]], 1)], 1)
        M = torch.cat([torch.cat([hB, MB[:, :-1]], 1), MW - torch.cat([hW, MW[:, :-1]], 1)], 1)
    R = torch.exp(-rates * (end[:, None] - tau)[..., None])[:, :, None, :] * G.transpose(2, 3)    # (nb, C, p, D)
    carry = torch.exp(-rates * (end - start)[:, None])
    return {"apply": torch.cat([T, R.reshape(nb, C * p, D).transpose(1, 2)], 1).contiguous(), "rest": M.contiguous(),
            "carry_gain": carry, "block": C, "cast": {}}


def _apply_joint_innovations(ops: dict, z: torch.Tensor, first: int, carry: torch.Tensor | None,
                             y: torch.Tensor):
    """(B̂, W) outputs of the joint plan's blocks first..first+G−1, (G, 2C, batch), from their normals z
    (G, 2C, batch), into ``y`` (G, 2C + D, batch); ``carry`` (D, batch) is the mean entering block ``first`` (None:
    zero). Returns (a view of y's first 2C rows, the mean leaving the last block)."""
    G = z.shape[0]
    pC = ops["rest"].shape[1]
    gain = ops["carry_gain"][first:first + G, :, None]
    torch.bmm(ops["apply"][first:first + G], z, out=y)
    means = y.new_empty(G, gain.shape[1], y.shape[2])
    if carry is None:
        means[0].zero_()
    else:
        means[0].copy_(carry)
    for b in range(1, G):
        torch.addcmul(y[b - 1, pC:], means[b - 1], gain[b - 1], out=means[b])
    carry = torch.addcmul(y[G - 1, pC:], means[G - 1], gain[G - 1])
    out = y[:, :pC]
    out.baddbmm_(ops["rest"][first:first + G], means)
    return out, carry


def _apply_innovations(ops: dict, z: torch.Tensor, first: int = 0, carry: torch.Tensor | None = None,
                       work=None):
    """B̂ on the blocks first..first+G−1, (G, batch, C), from their normals z (G, batch, C): the plan's linear map.

    ``carry`` (batch, D) is the filter mean entering block ``first`` (None: zero, the start of the path);
    returns (B̂ on the blocks, the mean leaving the last one). One batched product gives each block's
    lower-triangular part and its contribution to the mean it hands on; G small fused ops carry the mean;
    one more batched product adds its effect. ``work``: reusable buffers (y, means, out) with ≥ G blocks.
    """
    C = ops["block"]
    G, batch = z.shape[:2]
    D = ops["carry_gain"].shape[1]
    gain = ops["carry_gain"][first:first + G]
    if work is None:
        work = (z.new_empty(G, batch, C + D), z.new_empty(G, batch, D), z.new_empty(G, batch, C))
    y, means, out = (w[:G] for w in work)
    torch.bmm(z, ops["within"][first:first + G], out=y)                      # (G, batch, C + D)
    if carry is None:
        means[0].zero_()
    else:
        means[0].copy_(carry)
    for b in range(1, G):
        torch.addcmul(y[b - 1, :, C:], means[b - 1], gain[b - 1], out=means[b])
    carry = torch.addcmul(y[G - 1, :, C:], means[G - 1], gain[G - 1])
    torch.baddbmm(y[:, :, :C], means, ops["rest"][first:first + G], out=out)
    return out, carry


#: Numbers per working buffer of the innovations sampler (the blocks of the path processed at a time): a few
#: reused ~2 MB buffers instead of full-size temporaries bound the memory (the output aside) and their page
#: faults; fewer, larger chunks keep the count of parallel regions low (each one waits on a busy host's
#: OpenMP team). 2^17 and 2^19 and unchunked measured alike with one thread; 2^17 was worst with two.
_CHUNK_ELEMS = 1 << 19


class MarkovNoise(nn.Module):
    """A Markov noise B̂ = Σ_k ω_k Ŷ_k with given rates and weights (see the module docstring).

    Args:
        gammas: (K,) OU rates, finite and > 0.
        weights: (K,) weights ω (finite).
        kind: ``"type2"`` (Y(0) = 0, B̂ = ωᵀY) or ``"type1"`` (Y(0) stationary, B̂ = ωᵀ(Y − Y(0))).
        horizon: T > 0, the interval [0, T] the noise is meant for.

    Rates and weights are float64 buffers (they move with ``.to(device)``); :attr:`gamma_max`, the largest
    rate, is derived from the rates (it sets the stiffness of any solver).

    Example:
        >>> noise = MarkovNoise([0.5, 4.0], [1.0, -0.3])
        >>> paths = noise.sample(torch.linspace(0, 1, 101), batch_size=8)   # (8, 101)
    """

    gammas: torch.Tensor
    _weights: torch.Tensor

    def __init__(self, gammas, weights, kind: str = "type2", horizon: float = 1.0):
        super().__init__()
        self.kind = V.check_kind(kind)
        self.horizon = V.check_positive_float(horizon, "horizon")
        g = check_rates(gammas)
        self.register_buffer("gammas", g)
        self._gamma_max = float(g.max())
        if weights is None:
            if type(self).weights is MarkovNoise.weights:
                raise TypeError("weights must be given (only subclasses that compute them may pass None)")
            return
        w = torch.as_tensor(weights, dtype=torch.float64).detach().clone().cpu()
        if w.shape != g.shape:
            raise ValueError(f"weights must have the shape of gammas, {tuple(g.shape)}; got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite; got {w.tolist()}")
        kappa = cancellation(g, w, self.kind, self.horizon)
        if kappa > MAX_CANCELLATION:
            raise ValueError(f"weights cancel too much to be used in float64: |w|'|S||w| / w'Sw = {kappa:.2e} > "
                             f"{MAX_CANCELLATION:.0e} (S the states' covariance at the horizon), so Var B̂ would "
                             f"lose more than 13 of 16 digits; got weights {w.tolist()}")
        self.register_buffer("_weights", w)

    # ------------------------------------------------------------------ parameters
    @property
    def num_processes(self) -> int:
        return self.gammas.numel()

    @property
    def gamma_max(self) -> float:
        """The largest rate max_k γ_k."""
        return self._gamma_max

    @property
    def weights(self) -> torch.Tensor:
        """(K,) weights ω (float64)."""
        return self._weights

    def extra_repr(self) -> str:
        return f"num_processes={self.num_processes}, kind={self.kind!r}, gamma_max={self.gamma_max:g}, " \
               f"horizon={self.horizon:g}"

    def cancellation_of(self, weights=None) -> float:
        """:func:`cancellation` of this noise (of ``weights`` instead of its own, when given)."""
        return cancellation(self.gammas, self.weights if weights is None else weights, self.kind, self.horizon)

    # ------------------------------------------------------------------ second moments
    def stationary_covariance(self) -> torch.Tensor:
        """(K, K) stationary covariance of the OU states: 1/(γ_i + γ_j)."""
        g = self.gammas.to(torch.float64)
        return 1.0 / (g[:, None] + g[None, :])

    def initial_covariance(self) -> torch.Tensor:
        """(K, K) covariance of the OU states at t = 0: zero (type II) or stationary (type I)."""
        return get_kind(self.kind).initial_covariance(self.gammas.to(torch.float64))

    def ou_covariance(self, h) -> torch.Tensor:
        """(*h.shape, K, K) covariance of the OU innovation over a step h: (1 − e^{−(γ_i+γ_j)h})/(γ_i+γ_j)."""
        return step_covariance(self.gammas, h)

    def covariance(self, s, t) -> torch.Tensor:
        """Closed-form Cov(B̂_s, B̂_t) of this noise; broadcasts s and t; float64."""
        g = self.gammas.to(torch.float64)
        s = torch.as_tensor(s, dtype=torch.float64, device=g.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=g.device)
        for name, v in (("s", s), ("t", t)):
            if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                shown = v.tolist() if v.numel() < 8 else v
                raise ValueError(f"covariance: {name} must be finite and >= 0; got {shown}")
        s, t = torch.broadcast_tensors(s, t)
        w = self.weights.to(torch.float64)
        cross = get_kind(self.kind).state_cross_covariance(g, s, t)
        cov = torch.einsum("i,...ij,j->...", w, cross, w)
        # a variance is never negative: where s = t, round-off of a cancelling sum is clipped at 0
        return torch.where(s == t, cov.clamp(min=0.0), cov)

    # ------------------------------------------------------------------ sampling
    def initial_state(self, batch_size: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """(batch, K) OU states at t = 0, drawn from :meth:`initial_covariance` (zeros for type II)."""
        V.check_batch_size(batch_size)
        dtype = V.sampling_dtypes(dtype)[1]
        device = V.check_device(device) if device is not None else self.gammas.device
        K = self.num_processes
        if not get_kind(self.kind).stationary_start:
            return torch.zeros(batch_size, K, dtype=dtype, device=device)
        L = psd_factor(self.initial_covariance().to(device))
        z = torch.randn(batch_size, K, generator=generator, dtype=dtype, device=device)
        return z @ L.to(dtype).T

    def read_out(self, states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """B̂ from OU states ``(..., K)`` and the initial states ``(..., K)``: Σ_k ω_k Ŷ_k (last axis summed)."""
        y = get_kind(self.kind).read_out(states, initial)
        return y @ self.weights.to(y.dtype)

    def sample(self, ts, batch_size: int, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device=None, return_state: bool = False, method: str = "auto",
               return_brownian: bool = False):
        """Sample B̂ on a strictly increasing grid, exact in law (no time-stepping error) for any rates and K.

        Returns ``(batch_size, len(ts))`` paths; with ``return_state=True`` also the OU states
        ``(batch_size, len(ts), K)``; with ``return_brownian=True`` also the driving Brownian motion W on the grid
        ``(batch_size, len(ts))`` (W_0 = 0; a model that drives a second process with the same or a correlated W
        needs it). Extras come in that order: ``(paths, states?, brownian?)``.

        method:
            ``"innovations"`` — one normal per step: B̂ is drawn from its own innovations form (the Kalman
            filter of the OU state given B̂'s past, whose gains do not depend on the path), as blocks of
            :data:`INNOVATION_BLOCK` steps, each one batched product with a lower-triangular operator plus
            the carried filter mean. Paths only. The gains are computed once per grid (float64) and cached.
            ``"state"`` — the full OU state: K correlated normals per step, innovations with covariance
            (1 − e^{−(γ_i+γ_j)h})/(γ_i+γ_j) (one shared Brownian motion), Y_n = e^{−γh_n} Y_{n−1} + ξ_n; with
            ``return_brownian`` the increment of W is drawn jointly (Cov(ξ_k, ΔW) = (1 − e^{−γ_k h})/γ_k).
            With ``return_brownian``, ``"innovations"`` draws (B̂, W) jointly from their two-dimensional
            innovations: two normals per step whatever K (the full state needs K + 1).
            ``"auto"`` (default) — ``"state"`` when ``return_state`` or ``return_brownian`` is set, else
            ``"innovations"``.

        dtype: float64, float32, or float16/bfloat16 (computed in float32 and cast). Where the weights cancel so
        that float32 cannot represent B̂ = Σ ω_k Y_k accurately (:meth:`cancellation_of` above
        :data:`REDUCED_PRECISION_CANCELLATION`, e.g. geometric grids with K ≥ 6 at H > ½), the path is computed in
        float64 and cast: the returned dtype is always the one asked for, never a distorted path.

        Both methods are exact on any grid; they consume the generator differently, so a seed gives different
        (equally distributed) paths under the two methods.
        """
        V.check_batch_size(batch_size)
        V.check_choice(method, "method", SAMPLE_METHODS)
        if method == "auto":
            method = "state" if (return_state or return_brownian) else "innovations"
        if return_state and method != "state":
            raise ValueError("method='innovations' draws B̂ (and W) from their own innovations, not the OU states; "
                             "use method='state' (or 'auto') with return_state=True")
        ts64, dtype, out_dtype, device = self._sampling_setup(ts, dtype, device)
        if method == "innovations":
            if return_brownian:
                paths, brownian = self._sample_innovations(ts64, batch_size, generator, dtype, device, joint=True)
                return paths.to(out_dtype), brownian.to(out_dtype)
            return self._sample_innovations(ts64, batch_size, generator, dtype, device).to(out_dtype)
        out = self._sample_state(ts64, batch_size, generator, dtype, device, return_state, return_brownian)
        return tuple(o.to(out_dtype) for o in out) if isinstance(out, tuple) else out.to(out_dtype)

    def _sampling_setup(self, ts, dtype, device):
        """(float64 grid on the device, working dtype, returned dtype, device) for the samplers."""
        dtype, out_dtype = V.sampling_dtypes(dtype)          # float16/bfloat16: computed in float32
        if dtype != torch.float64 and self.cancellation_of() > REDUCED_PRECISION_CANCELLATION:
            dtype = torch.float64
        device = V.check_device(device) if device is not None else self.gammas.device
        ts = V.as_times(ts, dtype=torch.float64)
        ts64 = ts.to(device=device, dtype=torch.float64)
        if ts.dtype != torch.float64 and ts.numel() > 2 and is_uniform_grid(ts):
            # a uniform grid given in float32/16 is uniform to its own precision: keep it uniform in float64 (one
            # step for all, the fast path) rather than inherit its rounding as 1e−8 jitter in the steps
            ts64 = ts64[0] + torch.arange(ts.numel(), dtype=torch.float64, device=device) * (
                (ts64[-1] - ts64[0]) / (ts.numel() - 1))
        return ts64, dtype, out_dtype, device

    def sample_blocks(self, ts, batch_size: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None, device=None, return_brownian: bool = False,
                      left_points: bool = False):
        """Stream B̂ (and W) over the grid in consecutive time blocks: memory independent of ``len(ts)``.

        The same sampler as ``sample(ts, ..., method="innovations")`` (exact in law on any grid), handed out a
        block at a time instead of written into one ``(batch_size, len(ts))`` tensor: each block holds at most
        about :data:`_CHUNK_ELEMS` numbers (e.g. 32 steps of 2¹³ paths with ``return_brownian``), so a payoff that
        only accumulates along the path (an average, a running maximum, a stochastic integral) needs no memory
        in the number of steps. With the same generator state, ``torch.cat`` of the blocks along dim 1 is
        ``sample(ts, ..., method="innovations")`` bit for bit.

        Args:
            ts: the grid, strictly increasing (as in :meth:`sample`).
            batch_size: number of paths.
            generator: a ``torch.Generator`` for reproducible paths.
            dtype: as in :meth:`sample`.
            device: where the blocks are made (default: the noise's).
            return_brownian: also stream the driving Brownian motion W.
            left_points: with ``return_brownian`` and ts[0] = 0: blocks of the ``len(ts) − 1`` steps instead of the
                grid points — per step, B̂ at its left point and W's increment over it (what a left-point scheme
                for a process driven by B̂ and a Brownian motion correlated with W consumes; the increments come
                from the float64 plan, not from differences of rounded W values).

        Returns:
            An iterator of ``(start, paths)`` — or ``(start, paths, brownian)`` with ``return_brownian`` — where
            ``paths`` and ``brownian`` are ``(batch_size, c)`` tensors of B̂ and W on ``ts[start:start + c]`` (with
            ``left_points``: B̂ at ``ts[start:start + c]`` and W(ts[j + 1]) − W(ts[j]) for those j); the blocks cover
            the grid in order from ``start = 0``. Each block is a new tensor (it stays valid after the next one)
            and may be a transposed view of time-major storage.

        Raises:
            ValueError: ``left_points`` without ``return_brownian``, or with ts[0] ≠ 0 (when called, before any
                block is drawn).

        Example:
            >>> noise = MarkovNoise([0.5, 4.0], [1.0, -0.3])
            >>> ts = torch.linspace(0, 1, 1001)
            >>> area = sum(b[:, :-1].sum(1) for _, b in noise.sample_blocks(ts, 4))   # no (4, 1001) tensor
        """
        V.check_batch_size(batch_size)
        ts64, dtype, out_dtype, device = self._sampling_setup(ts, dtype, device)
        if left_points and not return_brownian:
            raise ValueError("left_points=True streams B̂ at the steps' left points with W's increments; it needs "
                             "return_brownian=True")
        if left_points and not bool(ts64[0] == 0):
            raise ValueError(f"left_points=True needs a grid starting at 0 (its steps are the steps of ts); got "
                             f"ts[0] = {float(ts64[0]):g}")
        # checked above when called, streamed below when iterated
        return self._stream_blocks(ts64, batch_size, generator, dtype, out_dtype, device, return_brownian,
                                   left_points)

    def _stream_blocks(self, ts64, batch_size, generator, dtype, out_dtype, device, return_brownian, left_points):
        offset = 1 if (bool(ts64[0] == 0) and not left_points) else 0
        first = True
        for s0, _, parts in self._innovation_blocks(ts64, batch_size, generator, dtype, device,
                                                    joint=return_brownian, fresh=True, left_points=left_points):
            if first and offset:                                                 # B̂_0 = 0 (and W_0 = 0)
                parts = [torch.cat([x.new_zeros(batch_size, 1), x], dim=1) for x in parts]
            start = 0 if first else s0 + offset
            first = False
            parts = [x.to(out_dtype) for x in parts]
            yield (start, *parts)
        if first and offset:                                                     # a grid of one point, t = 0
            z = torch.zeros(batch_size, 1, dtype=out_dtype, device=device)
            yield (0, z, z.clone()) if return_brownian else (0, z)

    def _sample_innovations(self, ts64, batch_size, generator, dtype, device, joint: bool = False):
        """B̂ from one normal per step (``joint``: (B̂, W) from two), by the block operators of
        :func:`_innovations_plan` / :func:`_joint_innovations_plan` (see there)."""
        p = 2 if joint else 1
        offset = 1 if bool(ts64[0] == 0) else 0
        out = torch.empty(p, batch_size, ts64.numel(), dtype=dtype, device=device)
        if offset:
            out[:, :, 0] = 0.0                                                  # B̂_0 = 0 (and W_0 = 0)
        for s0, s1, parts in self._innovation_blocks(ts64, batch_size, generator, dtype, device, joint):
            for a, part in enumerate(parts):
                out[a, :, offset + s0:offset + s1].copy_(part)
        if joint:
            return out[0], out[1]
        return out[0]

    def _innovation_blocks(self, ts64, batch_size, generator, dtype, device, joint: bool = False,
                           fresh: bool = False, left_points: bool = False):
        """Yield (s0, s1, parts): per observation (B̂; with ``joint`` also W), its values at the ends of steps
        s0..s1−1 of ``ts64`` (counting the steps after t = 0 when ts64[0] = 0) — or, ``left_points``, B̂ at their
        left points and W's increments — as (batch_size, s1 − s0) tensors, a chunk of g ≤ G plan blocks at a time
        (G bounded by :data:`_CHUNK_ELEMS`). The parts view a reused buffer, or (``fresh``) a new one per chunk."""
        p = 2 if joint else 1
        n_steps = ts64.numel() - (1 if bool(ts64[0] == 0) else 0)
        if n_steps <= 0:
            return
        ops = self._innovation_operators(ts64, dtype, device, joint, left_points)
        D = ops["carry_gain"].shape[1]
        C = ops["block"]
        nb = ops["rest"].shape[0]
        G = max(1, min(nb, _CHUNK_ELEMS // (batch_size * p * C)))             # blocks per chunk
        carry = None
        if joint:
            z = torch.empty(G, p * C, batch_size, dtype=dtype, device=device)
            y = z.new_empty(G, p * C + D, batch_size)
        else:
            z = torch.empty(G, batch_size, C, dtype=dtype, device=device)
            work = (z.new_empty(G, batch_size, C + D), z.new_empty(G, batch_size, D), z.new_empty(G, batch_size, C))
        for first in range(0, nb, G):
            g = min(G, nb - first)
            s0 = first * C
            s1 = min(s0 + g * C, n_steps)
            torch.randn(z[:g].shape, generator=generator, dtype=dtype, device=device, out=z[:g])
            if joint:
                if fresh:
                    y = z.new_empty(G, p * C + D, batch_size)
                out, carry = _apply_joint_innovations(ops, z[:g], first, carry, y[:g])       # (g, 2C, batch)
                if g == 1:
                    parts = [out[0, a * C:(a + 1) * C].T for a in range(p)]
                else:
                    parts = [out[:, a * C:(a + 1) * C].reshape(g * C, batch_size).T for a in range(p)]
            else:
                if fresh:
                    work = (work[0], work[1], z.new_empty(G, batch_size, C))
                blocks, carry = _apply_innovations(ops, z[:g], first, carry, work)   # (g, batch, C)
                parts = [blocks[0] if g == 1 else blocks.transpose(0, 1).reshape(batch_size, g * C)]
            yield s0, s1, [x[:, :s1 - s0] for x in parts]

    def _innovation_operators(self, ts64, dtype, device, joint: bool = False, left_points: bool = False) -> dict:
        """The block operators for this grid, rates, weights and dtype, built once and cached for every noise
        (:data:`_PLAN_CACHE_SIZE` plans: a model that builds a new noise per call reuses the plan of the last)."""
        g = self.gammas.detach().to(torch.float64).cpu()
        w = self.weights.detach().to(torch.float64).cpu()
        grid = ts64.detach().cpu()
        if bool(grid[0] > 0):
            grid = torch.cat([grid.new_zeros(1), grid])
        block = JOINT_INNOVATION_BLOCK if joint else INNOVATION_BLOCK
        key = (grid.numpy().tobytes(), g.numpy().tobytes(), w.numpy().tobytes(), self.kind, block, joint, left_points)
        cache = _PLAN_CACHE
        plan = cache.get(key)
        if plan is None:
            if joint:
                plan = _joint_innovations_plan(grid, g, w, self.kind, block, left_points)
            else:
                plan = _innovations_plan(grid, g, w, self.kind, block)
            cache[key] = plan
            while len(cache) > _PLAN_CACHE_SIZE:
                cache.popitem(last=False)
        cache.move_to_end(key)
        cast = plan["cast"].get((dtype, device))
        if cast is None:
            # entries below the dtype's smallest normal number are flushed to 0 (they weigh < 1e−38 of a path in
            # float32): a denormal in an operator slows every product with it (benchmarks/bench_roughvol.py
            # --sections 7: the float32 joint plan at 2048 steps has 128; unflushed, its products ran 1.05–1.36×
            # slower)
            tiny = torch.finfo(dtype).tiny
            cast = {name: torch.where(x.abs() < tiny, 0.0, x).to(device=device, dtype=dtype)
                    for name, x in plan.items() if isinstance(x, torch.Tensor)}
            cast["block"] = plan["block"]
            plan["cast"][(dtype, device)] = cast
        return cast

    def _sample_state(self, ts64, batch_size, generator, dtype, device, return_state, return_brownian=False):
        """The full-state sampler: K correlated normals per step (see :meth:`sample`, method ``"state"``).

        With ``return_brownian`` the state carries W as one more component of rate 0 (decay 1, innovation ΔW).
        """
        prepend = bool(ts64[0] > 0)
        grid = torch.cat([ts64.new_zeros(1), ts64]) if prepend else ts64
        g = self.gammas.to(device=device, dtype=torch.float64)
        K = g.numel()
        if return_brownian:
            g = torch.cat([g, g.new_zeros(1)])
        D = g.numel()

        y0 = self.initial_state(batch_size, generator, dtype, device)
        n_steps = grid.numel() - 1
        # Layout (time, D, batch): each step of the recursion is one fused kernel on a contiguous
        # (D, batch) slab (a Python loop launches one op per step and never syncs with the host).
        # Normals are drawn block by block into one reused, cache-sized buffer and mixed into
        # correlated innovations directly inside the state buffer: no full-size temporaries, whose
        # page faults (measured here) cost more than the arithmetic.
        states = torch.empty(grid.numel(), D, batch_size, dtype=dtype, device=device)
        states[0, :K] = y0.T
        if return_brownian:
            states[0, K] = 0.0
        if n_steps > 0:
            h = torch.diff(grid)
            h_mean = h.mean()
            uniform = is_uniform_grid(grid)
            if uniform:
                L_host = psd_factor(step_covariance(g, h_mean)).tolist()          # one factor, all steps
                decay = torch.exp(-h_mean * g).to(dtype)[None, :, None].expand(n_steps, D, 1)
            else:
                L = psd_factor(step_covariance(g, h)).to(dtype)                  # (n, D, D)
                decay = torch.exp(-h[:, None, None] * g[:, None]).to(dtype)      # (n, D, 1)
            # blocks of <= 2^15 elements per op: below ATen's parallel grain, so these small ops never wait on
            # an OpenMP team (on a busy host that wait dominated: 0.6 s instead of 0.04 s per call)
            block = max(1, min(n_steps, (1 << 15) // batch_size))
            noise = torch.empty(block, D, batch_size, dtype=dtype, device=device)
            for start in range(1, n_steps + 1, block):
                stop = min(start + block, n_steps + 1)
                z = torch.randn(noise.shape, generator=generator, dtype=dtype, device=device, out=noise)
                z = z[:stop - start]
                out = states[start:stop]
                if uniform:   # D^2 scalar multiply-adds on cache-resident slabs
                    for i in range(D):
                        torch.mul(z[:, 0], L_host[i][0], out=out[:, i])
                        for j in range(1, D):
                            if L_host[i][j] != 0.0:        # Cholesky factors are lower triangular
                                out[:, i].add_(z[:, j], alpha=L_host[i][j])
                else:
                    torch.matmul(L[start - 1:stop - 1], z, out=out)
                for n in range(start, stop):
                    torch.addcmul(states[n], states[n - 1], decay[n - 1], out=states[n])

        states = states[1:] if prepend else states                                # (N, D, batch)
        y = get_kind(self.kind).read_out(states[:, :K], y0.T)
        w = self.weights.detach().to(dtype)
        paths = torch.mul(y[:, 0].T, w[0])
        for k in range(1, K):
            paths.add_(y[:, k].T, alpha=float(w[k]))
        out = [paths]
        if return_state:
            out.append(states[:, :K].permute(2, 0, 1).contiguous())
        if return_brownian:
            out.append(states[:, K].T.contiguous())
        return tuple(out) if len(out) > 1 else paths
