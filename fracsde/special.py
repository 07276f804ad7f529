"""Special functions with the gradients torch lacks.

``torch.special.gammainc`` has no derivative in its first argument ("the derivative for
'igamma: input' is not implemented"), yet the MA-fBM weights depend on the Hurst index
exactly through that argument. :func:`gammainc` below is a drop-in replacement whose
backward pass is complete.

Derivative in ``a``: with the series P(a, x) = Σ_n x^{a+n} e^{-x} / Γ(a+n+1),

    ∂P/∂a = Σ_n  x^{a+n} e^{-x} / Γ(a+n+1) · (log x − ψ(a+n+1)),

summed in log-space for stability. The terms peak near n ≈ x and decay faster than
geometrically beyond it, so ``x + 12√x + 40`` terms reach float64 round-off.
"""
from __future__ import annotations

import math

import torch

__all__ = ["gammainc", "gammainc_grad_a"]


def gammainc_grad_a(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∂P(a, x)/∂a for a > 0, x ≥ 0, elementwise with broadcasting (computed by series)."""
    a, x = torch.broadcast_tensors(a, x)
    # Q(a, x) = 1 − P ~ x^{a−1} e^{−x}/Γ(a) underflows float64 past x ≈ 745 + (a−1) log x: there ∂P/∂a = 0 (the
    # optimal Markov rates reach x = γT ~ 1e27, where the series would need ~1e27 terms)
    far = x > _FAR + 2.0 * a.abs() * torch.log1p(x.abs()).clamp(max=200.0)
    x_all = x
    x = torch.where(far, torch.zeros_like(x), x)
    xmax = float(x.detach().max()) if x.numel() else 0.0
    n_terms = int(xmax + 12.0 * math.sqrt(xmax) + 40)
    n = torch.arange(n_terms, dtype=a.dtype, device=a.device)
    a_ = a.unsqueeze(-1)
    x_ = x.unsqueeze(-1)
    positive = x_ > 0
    safe_x = torch.where(positive, x_, torch.ones_like(x_))
    log_x = torch.log(safe_x)
    log_term = (a_ + n) * log_x - safe_x - torch.lgamma(a_ + n + 1)
    grad = (torch.exp(log_term) * (log_x - torch.digamma(a_ + n + 1))).sum(-1)
    return torch.where((x > 0) & ~far, grad, torch.zeros_like(grad)) if x_all.numel() else grad


#: beyond x ≈ this (plus the x^{a−1} factor) the upper incomplete gamma is below float64's smallest number
_FAR = 760.0


class _GammaInc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x):
        ctx.save_for_backward(a, x)
        return torch.special.gammainc(a, x)

    @staticmethod
    def backward(ctx, grad_out):
        a, x = ctx.saved_tensors
        grad_a = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_a = grad_out * gammainc_grad_a(a, x)
            grad_a = _unbroadcast(grad_a, a.shape)
        if ctx.needs_input_grad[1]:
            # ∂P/∂x = x^{a-1} e^{-x} / Γ(a)
            safe_x = torch.where(x > 0, x, torch.ones_like(x))
            dens = torch.exp((a - 1) * torch.log(safe_x) - safe_x - torch.lgamma(a))
            dens = torch.where(x > 0, dens, torch.zeros_like(dens))
            grad_x = _unbroadcast(grad_out * dens, x.shape)
        return grad_a, grad_x


def _unbroadcast(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def gammainc(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Regularised lower incomplete gamma P(a, x), differentiable in both arguments."""
    a = torch.as_tensor(a)
    x = torch.as_tensor(x, dtype=a.dtype if a.is_floating_point() else None, device=a.device)
    if not a.is_floating_point():
        a = a.to(x.dtype)
    return _GammaInc.apply(a, x)
