
import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fracsde.kinds import scaled_upper_gamma
from fracsde.special import gammainc, gammainc_grad_a


@given(a=st.floats(0.3, 2.5), x=st.floats(1e-3, 60.0))
@settings(max_examples=40)
def test_grad_a_matches_mpmath(a, x):
    expected = float(mpmath.diff(lambda aa: mpmath.gammainc(aa, 0, x, regularized=True), a))
    got = float(gammainc_grad_a(torch.tensor(a, dtype=torch.float64), torch.tensor(x, dtype=torch.float64)))
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-13)


def test_gammainc_gradcheck_both_arguments():
    a = torch.tensor([0.6, 1.2, 1.7], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.05, 3.0, 25.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gammainc, (a, x), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gammainc_broadcasts_and_reduces_gradient():
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    x = torch.linspace(0.1, 10, 7, dtype=torch.float64)
    gammainc(a, x).sum().backward()
    expected = gammainc_grad_a(a.detach().expand(7), x).sum()
    torch.testing.assert_close(a.grad, expected)


def test_gammainc_value_matches_torch():
    a = torch.tensor([0.5, 1.0, 1.9], dtype=torch.float64)
    x = torch.tensor([0.2, 1.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(gammainc(a, x), torch.special.gammainc(a, x))


@pytest.mark.parametrize("a", [0.55, 1.0, 1.45])
@pytest.mark.parametrize("x", [0.01, 1.0, 3.9, 4.1, 20.0, 200.0])
def test_scaled_upper_gamma_matches_mpmath(a, x):
    expected = float(mpmath.exp(x) * mpmath.gammainc(a, x, mpmath.inf, regularized=True))
    got = float(scaled_upper_gamma(torch.tensor(a, dtype=torch.float64), torch.tensor(x, dtype=torch.float64)))
    assert got == pytest.approx(expected, rel=1e-11)


def test_gammainc_broadcasts_a_batch_against_rates():
    """a (B, 1) against x (K,): the shapes of the batched MA-fBM moments; values and both gradients per element."""
    a = torch.tensor([[0.6], [1.2], [1.7]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.05, 1.0, 3.0, 25.0], dtype=torch.float64, requires_grad=True)
    out = gammainc(a, x)
    assert out.shape == (3, 4)
    w = torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4)
    (out * w).sum().backward()
    ga = torch.stack([(gammainc_grad_a(a.detach()[i].expand(4), x.detach()) * w[i]).sum() for i in range(3)])
    torch.testing.assert_close(a.grad[:, 0], ga)
    assert torch.autograd.gradcheck(gammainc, (a, x), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_scaled_upper_gamma_broadcasts():
    a = torch.tensor([[0.55], [1.0], [1.45]], dtype=torch.float64)
    x = torch.tensor([0.01, 3.9, 4.1, 200.0], dtype=torch.float64)
    out = scaled_upper_gamma(a, x)
    assert out.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert float(out[i, j]) == pytest.approx(float(scaled_upper_gamma(a[i, 0], x[j])), rel=1e-14)
