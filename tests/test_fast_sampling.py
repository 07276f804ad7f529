"""MarkovNoise.sample by the innovations form: one normal per step, exact in law, on any grid."""
import pytest
import torch

from fracsde import MarkovApproxFBM, MarkovNoise
from fracsde.noise import _PLAN_CACHE, _PLAN_CACHE_SIZE, INNOVATION_BLOCK, _apply_innovations
from stats_helpers import assert_covariance_matches

F64 = torch.float64


def _noise(kind, K):
    # H = 0.3 for K = 5: at H = 0.7, K = 5 the weights are fine too, but 0.3 adds a rough case
    return MarkovApproxFBM(0.7 if K < 5 else 0.3, K, kind=kind)


GRIDS = {
    # 200 steps = 6 full blocks of 32 and a partial one: exercises the carried filter mean
    "uniform": torch.linspace(0, 1, 201, dtype=F64),
    "uniform_offset": torch.linspace(0.25, 1.5, 150, dtype=F64),          # first step from 0 differs
    "nonuniform": torch.sort(torch.rand(120, generator=torch.Generator().manual_seed(0), dtype=F64) * 2)[0],
    "fine": torch.linspace(0, 0.05, 601, dtype=F64),                        # γ_max h = 1.7e−3: Q nearly rank one
}


def _implied_covariance(noise, ts):
    """Cov of the sampled paths implied by the sampler's linear map (paths = L z): L Lᵀ, exact arithmetic aside."""
    ops = noise._innovation_operators(ts, F64, torch.device("cpu"))
    nb, C = ops["rest"].shape[0], ops["block"]
    n = nb * C
    basis = torch.eye(n, dtype=F64).view(n, nb, C).transpose(0, 1)          # z = e_i for "path" i
    L_T = _apply_innovations(ops, basis)[0].transpose(0, 1).reshape(n, n)   # row i: L e_i
    offset = 1 if float(ts[0]) == 0 else 0
    L_T = L_T[:, :ts.numel() - offset]
    return L_T.T @ L_T, offset


@pytest.mark.filterwarnings("ignore::fracsde.ApproximationWarning")   # includes K = 1 on purpose
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_sampler_operator_reproduces_the_closed_form_covariance(kind, K, grid):
    """Deterministic: the map z -> path is L with L Lᵀ = Cov(B̂) on the grid. Tolerance: float64 round-off of
    the Riccati recursion and of the type I reference (which subtracts stationary terms ~1/(2γ_min) = 10 to get
    covariances ~1e−2 near 0); measured <= 2e−10 relative on these grids, far below any sampling error."""
    noise = _noise(kind, K)
    ts = GRIDS[grid]
    implied, offset = _implied_covariance(noise, ts)
    t = ts[offset:]
    ref = noise.covariance(t[:, None], t[None, :])
    assert float((implied - ref).abs().max()) <= 1e-8 * float(ref.abs().max())


@pytest.mark.filterwarnings("ignore::fracsde.ApproximationWarning")   # includes K = 1 on purpose
@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_sample_covariance_matches_closed_form(kind, K, grid):
    """Statistical: 20 000 float64 paths; the empirical covariance at 9 times spread over the grid lies within
    Bonferroni-corrected z standard errors √((C_ss C_tt + C_st²)/n) of the closed form (stats_helpers)."""
    noise = _noise(kind, K)
    ts = GRIDS[grid]
    x = noise.sample(ts, 20_000, generator=torch.Generator().manual_seed(10 * K + len(grid)), dtype=F64)
    assert x.shape == (20_000, ts.numel())
    idx = torch.linspace(0, ts.numel() - 1, 9).round().long()
    idx = idx[ts[idx] > 0]                                                   # B̂_0 = 0 has no variance
    t = ts[idx]
    assert_covariance_matches(x[:, idx], noise.covariance(t[:, None], t[None, :]))
    if float(ts[0]) == 0:
        assert bool((x[:, 0] == 0).all())


def test_float32_paths_match_closed_form():
    """float32 operators: the same covariance test (cast round-off ~1e−7 is far below the 1/√n error)."""
    noise = MarkovApproxFBM(0.7, 3)
    ts = torch.linspace(0, 1, 1025)
    x = noise.sample(ts, 20_000, generator=torch.Generator().manual_seed(3))
    assert x.dtype == torch.float32
    idx = torch.tensor([1, 64, 256, 700, 1024])
    t = ts[idx].double()
    assert_covariance_matches(x[:, idx], noise.covariance(t[:, None], t[None, :]))


def test_deterministic_under_a_seed():
    noise = MarkovApproxFBM(0.7, 3, kind="type1")
    ts = torch.linspace(0, 1, 100)
    a = noise.sample(ts, 5, generator=torch.Generator().manual_seed(7))
    b = noise.sample(ts, 5, generator=torch.Generator().manual_seed(7))
    c = noise.sample(ts, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(1)
    d = noise.sample(ts, 5)
    torch.manual_seed(1)
    assert torch.equal(d, noise.sample(ts, 5))


def test_one_normal_per_step():
    """The generator advances by exactly batch × (steps rounded up to whole blocks) normals."""
    noise = MarkovApproxFBM(0.7, 3)
    n_steps = 3 * INNOVATION_BLOCK
    gen = torch.Generator().manual_seed(0)
    noise.sample(torch.linspace(0, 1, n_steps + 1), 4, generator=gen, dtype=F64)
    ref = torch.Generator().manual_seed(0)
    torch.randn(4 * n_steps, generator=ref, dtype=F64)
    assert torch.equal(torch.randn(3, generator=gen, dtype=F64), torch.randn(3, generator=ref, dtype=F64))


def test_state_method_keeps_the_full_state_sampler():
    """method='state' is the full-state sampler: its paths equal ωᵀY of the states it returns, same stream."""
    noise = MarkovApproxFBM(0.6, 3, kind="type1")
    ts = torch.linspace(0, 1, 40, dtype=F64)
    paths = noise.sample(ts, 6, generator=torch.Generator().manual_seed(2), dtype=F64, method="state")
    again, states = noise.sample(ts, 6, generator=torch.Generator().manual_seed(2), dtype=F64, return_state=True)
    assert torch.equal(paths, again)
    torch.testing.assert_close(paths, (states - states[:, :1]) @ noise.weights)
    with pytest.raises(ValueError, match="return_state"):
        noise.sample(ts, 2, return_state=True, method="innovations")
    with pytest.raises(ValueError, match="method"):
        noise.sample(ts, 2, method="cholesky")


def test_edge_grids_and_degenerate_weights():
    noise = MarkovApproxFBM(0.7, 2)
    assert torch.equal(noise.sample(torch.tensor([0.0]), 3), torch.zeros(3, 1))
    one = noise.sample(torch.tensor([0.5], dtype=F64), 20_000, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert_covariance_matches(one, noise.covariance(torch.tensor([[0.5]]), torch.tensor([[0.5]])))
    silent = MarkovNoise([1.0, 3.0], [0.0, 0.0])                  # ω = 0: B̂ ≡ 0, no division by a zero variance
    assert torch.equal(silent.sample(torch.linspace(0, 1, 50), 2), torch.zeros(2, 50))


def test_operators_follow_a_learnable_hurst():
    """The cached operators are keyed by the weights: after H changes, the sampler has the new law."""
    noise = MarkovApproxFBM(0.6, 3, learnable_hurst=True)
    ts = torch.linspace(0, 1, 65, dtype=F64)
    _implied_covariance(noise, ts)
    with torch.no_grad():
        noise.hurst_logit.fill_(torch.logit(torch.tensor(0.85, dtype=F64)))
    implied, offset = _implied_covariance(noise, ts)
    ref = noise.covariance(ts[1:, None], ts[None, 1:]).detach()
    assert float((implied - ref).abs().max()) <= 1e-8 * float(ref.abs().max())
    assert len(_PLAN_CACHE) <= _PLAN_CACHE_SIZE


def test_chunked_sampling_equals_one_pass():
    """The sampler works on cache-sized chunks of blocks, carrying the filter mean across chunks: the same
    paths as applying the map to all blocks at once with the same normals."""
    import fracsde.noise as noise_module

    noise = MarkovApproxFBM(0.7, 3, kind="type1")
    ts = torch.linspace(0, 1, 300, dtype=F64)
    full = noise.sample(ts, 7, generator=torch.Generator().manual_seed(9), dtype=F64)
    old = noise_module._CHUNK_ELEMS
    try:
        noise_module._CHUNK_ELEMS = 7 * INNOVATION_BLOCK * 2              # two blocks per chunk
        chunked = noise.sample(ts, 7, generator=torch.Generator().manual_seed(9), dtype=F64)
    finally:
        noise_module._CHUNK_ELEMS = old
    ops = noise._innovation_operators(ts, F64, torch.device("cpu"))
    nb, C = ops["rest"].shape[0], ops["block"]
    z = torch.randn(nb, 7, C, generator=torch.Generator().manual_seed(9), dtype=F64)
    one_pass = _apply_innovations(ops, z)[0].transpose(0, 1).reshape(7, nb * C)[:, :ts.numel() - 1]
    torch.testing.assert_close(full[:, 1:], one_pass, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked[:, 1:], one_pass, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- streamed blocks
@pytest.mark.parametrize("brownian", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("grid", ["from0", "after0", "point"])
@pytest.mark.parametrize("batch", [3, 3000])
def test_sample_blocks_concatenate_to_sample_bit_for_bit(brownian, dtype, grid, batch):
    from fracsde import markov_rates
    rule = markov_rates(0.1, 8, rates="optimal")
    noise = MarkovNoise(rule.rates, rule.weights)
    ts = {"from0": torch.linspace(0, 1, 301), "after0": torch.linspace(0.1, 1, 77), "point": torch.zeros(1)}[grid]
    whole = noise.sample(ts, batch, generator=torch.Generator().manual_seed(1), method="innovations",
                         return_brownian=brownian, dtype=dtype)
    blocks = list(noise.sample_blocks(ts, batch, generator=torch.Generator().manual_seed(1),
                                      return_brownian=brownian, dtype=dtype))
    starts = [b[0] for b in blocks]
    widths = [b[1].shape[1] for b in blocks]
    assert starts == [sum(widths[:i]) for i in range(len(widths))] and sum(widths) == ts.numel()
    for a, part in enumerate(whole if brownian else (whole,)):
        streamed = torch.cat([b[1 + a] for b in blocks], dim=1)
        assert streamed.dtype == dtype and torch.equal(streamed, part)


def test_sample_blocks_memory_does_not_grow_with_the_steps():
    from fracsde.noise import _CHUNK_ELEMS
    noise = MarkovNoise([0.5, 4.0, 40.0], [1.0, -0.3, 0.1])
    batch = 1 << 12
    for n_steps in (64, 4096):
        widths = [b[1].shape[1] for b in noise.sample_blocks(torch.linspace(0, 1, n_steps + 1), batch,
                                                              return_brownian=True, left_points=True)]
        assert sum(widths) == n_steps and 2 * batch * max(widths) <= _CHUNK_ELEMS


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_left_point_blocks_are_the_grid_values_and_increments(dtype):
    """left_points: B̂ at each step's left point and W's increment over it — the same random numbers as the grid
    values, so equal to them up to the dtype's rounding (the increments come from the float64 plan)."""
    from fracsde import markov_rates
    rule = markov_rates(0.1, 16, rates="optimal")
    noise = MarkovNoise(rule.rates, rule.weights)
    ts = torch.linspace(0, 1, 700, dtype=F64)
    for batch in (3, 3000):
        points = list(noise.sample_blocks(ts, batch, generator=torch.Generator().manual_seed(2), return_brownian=True,
                                          dtype=dtype))
        steps = list(noise.sample_blocks(ts, batch, generator=torch.Generator().manual_seed(2), return_brownian=True,
                                         dtype=dtype, left_points=True))
        bhat, w = (torch.cat([b[a] for b in points], 1).double() for a in (1, 2))
        left, dw = (torch.cat([b[a] for b in steps], 1).double() for a in (1, 2))
        eps = torch.finfo(dtype).eps
        assert left.shape == dw.shape == (batch, ts.numel() - 1)
        assert float((left - bhat[:, :-1]).abs().max()) <= 64 * eps * float(bhat.abs().max())
        assert float((dw - w.diff(dim=1)).abs().max()) <= 64 * eps * float(w.abs().max())


def test_left_points_refuse_what_they_cannot_do():
    noise = MarkovNoise([0.5, 4.0], [1.0, -0.3])
    # refused when called, before any block is drawn (not at the first next())
    with pytest.raises(ValueError, match="return_brownian=True"):
        noise.sample_blocks(torch.linspace(0, 1, 5), 2, left_points=True)
    with pytest.raises(ValueError, match=r"ts\[0\] = 0.5"):
        noise.sample_blocks(torch.linspace(0.5, 1, 5), 2, return_brownian=True, left_points=True)
    with pytest.raises(ValueError, match="batch_size"):
        noise.sample_blocks(torch.linspace(0, 1, 5), 0)


def test_cast_operators_have_no_denormals():
    """Operator entries below float32's smallest normal are flushed to 0 (a denormal slows every product with it)."""
    from fracsde import markov_rates
    rule = markov_rates(0.07, 16, rates="optimal", horizon=0.25)
    noise = MarkovNoise(rule.rates, rule.weights, horizon=0.25)
    ts = torch.linspace(0, 0.25, 2049, dtype=F64)
    tiny = torch.finfo(torch.float32).tiny
    below = 0
    for joint in (False, True):
        ops = noise._innovation_operators(ts, torch.float32, torch.device("cpu"), joint)
        ops64 = noise._innovation_operators(ts, torch.float64, torch.device("cpu"), joint)
        for name in ("rest", "carry_gain", "apply" if joint else "within"):
            x = ops[name]
            assert not bool(((x != 0) & (x.abs() < tiny)).any()), name
            below += int(((ops64[name] != 0) & (ops64[name].abs() < tiny)).sum())
    assert below > 0                                  # the case has such entries: the check is not vacuous
