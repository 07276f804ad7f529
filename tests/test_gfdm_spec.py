"""DynamicsSpec: the one text / dict / object description of GFDM dynamics."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models.gfdm.dynamics import FVE, FVP
from models.gfdm.spec import FAMILIES, DynamicsSpec


@pytest.mark.parametrize("text, label, slug, canonical", [
    ("vp", "VP", "vp", "vp"),
    ("VE", "VE", "ve", "ve"),
    ("fvp", "FVP(H=0.9,K=3)", "fvp-h-0-9-k-3", "fvp:H=0.9,K=3"),
    ("fvp:H=0.9,K=3", "FVP(H=0.9,K=3)", "fvp-h-0-9-k-3", "fvp:H=0.9,K=3"),
    (" fve : h=0.7, k=2 ", "FVE(H=0.7,K=2)", "fve-h-0-7-k-2", "fve:H=0.7,K=2"),
    ("fvp:hurst=0.7,num_processes=2", "FVP(H=0.7,K=2)", "fvp-h-0-7-k-2", "fvp:H=0.7,K=2"),
    ("fvp:H=0.9,K=3,gamma_max=10,beta_max=15", "FVP(H=0.9,K=3,gamma_max=10,beta_max=15)",
     "fvp-h-0-9-k-3-gamma-max-10-beta-max-15", "fvp:H=0.9,K=3,gamma_max=10,beta_max=15"),
    ("fvp:gamma_max=20", "FVP(H=0.9,K=3)", "fvp-h-0-9-k-3", "fvp:H=0.9,K=3"),     # a default is not shown
    ("vp:beta_max=15,t=2", "VP(beta_max=15,T=2)", "vp-beta-max-15-t-2", "vp:beta_max=15,T=2"),
    ("fve:normalize_weights=no,sigma_max=80", "FVE(H=0.9,K=3,normalize_weights=false,sigma_max=80)",
     "fve-h-0-9-k-3-normalize-weights-false-sigma-max-80", "fve:H=0.9,K=3,normalize_weights=false,sigma_max=80"),
])
def test_parse_label_slug_text(text, label, slug, canonical):
    spec = DynamicsSpec.parse(text)
    assert (spec.label, spec.slug, spec.text, str(spec)) == (label, slug, canonical, canonical)
    assert DynamicsSpec.parse(spec.text) == spec


def test_every_constructor_argument_is_held_with_its_default():
    spec = DynamicsSpec.parse("fvp:K=2")
    assert spec.to_dict() == {"family": "fvp", "hurst": 0.9, "num_processes": 2, "gamma_max": 20.0,
                              "normalize_weights": True, "beta_min": 0.1, "beta_max": 20.0, "T": 1.0,
                              "grid_size": 2048, "covariance_jitter": 0.0, "rates": "geometric",
                              "max_rate": None}
    assert DynamicsSpec.parse("fve").to_dict()["sigma_min_offset"] is False
    assert DynamicsSpec.parse("ve").to_dict() == {"family": "ve", "sigma_min": 0.01, "sigma_max": 50.0, "T": 1.0,
                                                  "grid_size": 2048}
    assert DynamicsSpec("fvp", {"H": 0.9, "K": 3}) == DynamicsSpec.parse("fvp") == DynamicsSpec("fvp")
    assert len({DynamicsSpec.parse("fvp"), DynamicsSpec.parse("fvp:H=0.9,K=3")}) == 1      # hashable, equal
    with pytest.raises(TypeError):
        DynamicsSpec.parse("fvp").kwargs["hurst"] = 0.5                                  # read-only


def test_defaults_fill_only_what_the_text_does_not_name():
    fill = {"hurst": 0.7, "num_processes": 2}
    assert DynamicsSpec.parse("fvp:gamma_max=5", defaults=fill).text == "fvp:H=0.7,K=2,gamma_max=5"
    assert DynamicsSpec.parse("fvp:H=0.5", defaults=fill).text == "fvp:H=0.5,K=2"
    assert DynamicsSpec.parse("vp", defaults=fill).text == "vp"           # vp takes no H, K: ignored
    assert DynamicsSpec.parse("fvp:K=2,gamma_max=5").format(omit=("hurst", "num_processes")) == "fvp:gamma_max=5"


@pytest.mark.parametrize("text", ["vp", "ve", "fvp:H=0.7,K=2", "fve:H=0.9,K=2",
                                  "fvp:H=0.6,K=2,gamma_max=10,normalize_weights=false,beta_min=0.2,beta_max=15,T=2",
                                  "fve:H=0.8,K=1,gamma_max=5,sigma_min=0.02,sigma_max=20",
                                  "vp:beta_max=12", "ve:sigma_max=30,T=0.5"])
def test_build_and_read_back_from_the_object(text):
    spec = DynamicsSpec.parse(text)
    dyn = spec.build()
    assert isinstance(dyn, FVP if spec.family in ("vp", "fvp") else FVE)
    assert dyn.num_processes == (spec.kwargs.get("num_processes", 0))
    assert DynamicsSpec.from_dynamics(dyn) == spec
    assert DynamicsSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    if spec.label in ("VP", "VE", "FVP(H=0.7,K=2)", "FVE(H=0.9,K=2)"):
        assert dyn.name == spec.label


@pytest.mark.skipif(not hasattr(FVP(num_processes=0, grid_size=16), "grid_size"),
                    reason="LinearFractionalDynamics does not record grid_size yet")
def test_grid_size_is_read_back_from_the_object():
    spec = DynamicsSpec.parse("fvp:H=0.7,K=2,grid_size=64")
    assert DynamicsSpec.from_dynamics(spec.build()) == spec


@pytest.mark.filterwarnings("ignore::fracsde.PriorMismatchWarning")   # FVE(H=0.9, K=3) has λ(T) = −3.8
def test_build_matches_the_constructors_bit_for_bit():
    direct = {"vp": lambda: FVP(0.9, 0), "ve": lambda: FVE(0.9, 0),
              "fvp": lambda: FVP(0.9, 3), "fve": lambda: FVE(0.9, 3)}
    for name in ("vp", "ve", "fvp", "fve"):
        ours, theirs = DynamicsSpec.parse(name).build(), direct[name]()
        assert type(ours) is type(theirs) and ours.num_processes == theirs.num_processes
        assert torch.equal(ours.weights, theirs.weights) and torch.equal(ours.gammas, theirs.gammas)
        t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
        assert torch.equal(ours.mean_coefficient(t), theirs.mean_coefficient(t))


def test_reads_the_older_checkpoint_entry():
    assert DynamicsSpec.from_dict({"name": "fvp", "hurst": 0.7, "num_processes": 2}) == DynamicsSpec.parse(
        "fvp:H=0.7,K=2")
    assert DynamicsSpec.from_dict({"name": "vp", "hurst": None, "num_processes": 0}) == DynamicsSpec.parse("vp")
    assert DynamicsSpec.from_dict({"name": "fve", "hurst": 0.9, "num_processes": 3}).label == "FVE(H=0.9,K=3)"


@pytest.mark.parametrize("text, message", [
    ("bm", "family 'bm' is not one of ('vp', 've', 'fvp', 'fve')"),
    ("fvp:0.9:3", "expected key=value items separated by commas (e.g. fvp:H=0.9,K=3); got '0.9:3'"),
    ("fvp:H=2,K=3", "H=2 is out of range: need 0 < H < 1"),
    ("fvp:H=0,K=3", "H=0 is out of range: need 0 < H < 1"),
    ("fvp:K=0", "K=0 is out of range: need K >= 1"),
    ("fvp:K=1.5", "K=1.5 is not an integer"),
    ("fvp:gamma_max=-1", "gamma_max=-1 is out of range: need gamma_max > 0"),
    ("fvp:beta_max=nan", "beta_max=nan is not a finite number"),
    ("fvp:normalize_weights=maybe", "normalize_weights=maybe is not true or false"),
    ("fvp:gamma=3", "unknown key 'gamma' for fvp; allowed: H, K, gamma_max, normalize_weights, beta_min, "
                    "beta_max, T, grid_size, covariance_jitter, rates, max_rate"),
    ("fvp:covariance_jitter=-1e-4", "covariance_jitter=-1e-4 is out of range: need covariance_jitter >= 0"),
    ("vp:H=0.5", "unknown key 'H' for vp; allowed: beta_min, beta_max, T, grid_size (H, K, gamma_max, "
                 "normalize_weights need fvp)"),
    ("ve:beta_max=3", "unknown key 'beta_max' for ve; allowed: sigma_min, sigma_max, T, grid_size"),
    ("fvp:H=0.5,hurst=0.4", "H is given twice"),
])
def test_bad_specs_name_the_key_the_allowed_set_and_the_value(text, message):
    with pytest.raises(ValueError) as e:
        DynamicsSpec.parse(text)
    assert str(e.value) == f"dynamics spec {text!r}: {message}"


def test_bad_dicts_and_objects():
    with pytest.raises(ValueError, match="needs a 'family' key"):
        DynamicsSpec.from_dict({"hurst": 0.9})
    with pytest.raises(ValueError, match="unknown key 'H' for vp"):
        DynamicsSpec.from_dict({"family": "vp", "H": 0.9})
    with pytest.raises(TypeError, match="needs FVP or FVE dynamics"):
        DynamicsSpec.from_dynamics(torch.nn.Linear(1, 1))


_VALUES = {"hurst": st.floats(0.01, 0.99), "num_processes": st.integers(1, 6),
           "gamma_max": st.floats(0.5, 1e3), "normalize_weights": st.booleans(),
           "beta_min": st.floats(1e-3, 1.0), "beta_max": st.floats(1.0, 50.0),
           "sigma_min": st.floats(1e-3, 0.1), "sigma_max": st.floats(1.0, 100.0),
           "T": st.floats(0.1, 10.0), "grid_size": st.integers(16, 4096),
           "covariance_jitter": st.floats(0.0, 1e-2), "sigma_min_offset": st.booleans(),
           "rates": st.sampled_from(("geometric", "optimal", "quadrature")),
           "max_rate": st.one_of(st.none(), st.floats(1.0, 1e6))}


@st.composite
def specs(draw):
    family = draw(st.sampled_from(tuple(FAMILIES)))
    names = list(DynamicsSpec(family).kwargs)
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    return DynamicsSpec(family, {name: draw(_VALUES[name]) for name in chosen})


@given(specs())
def test_text_and_dict_round_trip_exactly(spec):
    assert DynamicsSpec.parse(spec.text) == spec
    assert DynamicsSpec.parse(spec.label.replace("(", ":").rstrip(")").lower()) == spec
    assert DynamicsSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.slug and set(spec.slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
