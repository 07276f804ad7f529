"""One description of GFDM dynamics, as text, as a dict and as the built object.

    spec = DynamicsSpec.parse("fvp:H=0.9,K=3,gamma_max=10")
    dyn = spec.build()                                  # FVP(hurst=0.9, num_processes=3, gamma_max=10.0)
    assert DynamicsSpec.from_dynamics(dyn) == spec      # read back from the built object
    assert DynamicsSpec.from_dict(spec.to_dict()) == spec
    spec.label, spec.slug, spec.text                    # "FVP(H=0.9,K=3,gamma_max=10)", "fvp-h-0-9-k-3-…", …

Text: ``family[:key=value,…]``. Families: ``vp``, ``ve`` (Brownian, K = 0) and ``fvp``, ``fve`` (fractional).
Keys are the constructor arguments of :class:`~models.gfdm.dynamics.FVP` / :class:`~models.gfdm.dynamics.FVE`
by name (``H`` and ``K`` are short for ``hurst`` and ``num_processes``; keys are case-insensitive); the
Brownian families take only the schedule's arguments (``beta_min``, ``beta_max`` or ``sigma_min``,
``sigma_max``; ``T``, ``grid_size``). A spec always holds every argument: those not given take the
constructor's default, read from its signature, so the defaults live in one place.
"""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .dynamics import FVE, FVP

__all__ = ["DynamicsSpec", "FAMILIES", "RunSpec", "RECIPE_KEYS"]

#: family name → (class, fractional?)
FAMILIES = {"vp": (FVP, False), "ve": (FVE, False), "fvp": (FVP, True), "fve": (FVE, True)}
_FRACTIONAL_ONLY = ("hurst", "num_processes", "gamma_max", "normalize_weights", "covariance_jitter", "sigma_min_offset",
                    "rates", "max_rate")
_SHORT = {"hurst": "H", "num_processes": "K"}
_NON_NEGATIVE = ("covariance_jitter",)      # 0 is the exact model
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _arguments(family: str) -> dict[str, Any]:
    """Constructor argument → default, for the arguments a family takes."""
    cls, fractional = FAMILIES[family]
    params = inspect.signature(cls).parameters
    return {name: p.default for name, p in params.items()
            if name != "self" and (fractional or name not in _FRACTIONAL_ONLY)}


def _display(name: str) -> str:
    return _SHORT.get(name, name)


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)     # exact, so that parse(text) round-trips
    return str(value)


def _coerce(value, default, key: str, where: str):
    """``value`` (text or number) as the type of ``default``, range-checked; ValueError names key and value."""
    kind = type(default)
    if key == "rates":                                        # the rate rule: a name
        from fracsde import RATE_RULES
        if str(value).strip().lower() not in RATE_RULES:
            raise ValueError(f"{where}: rates={value} is not one of {RATE_RULES}")
        return str(value).strip().lower()
    if key == "max_rate":                                     # None (no cap) or a positive number
        if value is None or str(value).strip().lower() == "none":
            return None
        kind = float
    try:
        if kind is bool:
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        if kind is int:
            number = int(value.strip()) if isinstance(value, str) else value
            if not float(number).is_integer():
                raise ValueError
            number = int(number)
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer"}.get(kind, "a finite number")
        raise ValueError(f"{where}: {key}={value} is not {expected}") from None
    if key == "H" and not 0 < number < 1:
        raise ValueError(f"{where}: H={value} is out of range: need 0 < H < 1")
    if key in _NON_NEGATIVE:
        if number < 0:
            raise ValueError(f"{where}: {key}={value} is out of range: need {key} >= 0")
        return number
    if number < 1 if kind is int else number <= 0:
        need = f"{key} >= 1" if kind is int else f"{key} > 0"
        raise ValueError(f"{where}: {key}={value} is out of range: need {need}")
    return number


def _check_family(family: str, where: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"{where}: family {family!r} is not one of {tuple(FAMILIES)}")


def _canonical(family: str, key, where: str) -> str:
    """The constructor argument that ``key`` (a name or a short name, any case) stands for."""
    defaults = _arguments(family)
    by_key = {name.lower(): name for name in defaults}
    by_key.update({short.lower(): name for name, short in _SHORT.items() if name in defaults})
    name = by_key.get(str(key).lower())
    if name is None:
        allowed = ", ".join(_display(n) for n in defaults)
        fractional_keys = {k.lower() for k in (*_FRACTIONAL_ONLY, *_SHORT.values())}
        hint = f" (H, K, gamma_max, normalize_weights need f{family})" if (
            not FAMILIES[family][1] and str(key).lower() in fractional_keys) else ""
        raise ValueError(f"{where}: unknown key {key!r} for {family}; allowed: {allowed}{hint}")
    return name


def _complete(family, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every argument of ``family``: the given ones (by name or short name) checked, the rest defaulted."""
    _check_family(family, where)
    defaults = _arguments(family)
    values = {}
    for key, value in given.items():
        name = _canonical(family, key, where)
        if name in values:
            raise ValueError(f"{where}: {_display(name)} is given twice")
        values[name] = _coerce(value, defaults[name], _display(name), where)
    return {name: values.get(name, default) for name, default in defaults.items()}


@dataclass(frozen=True)
class DynamicsSpec:
    """A family (``"vp"``, ``"ve"``, ``"fvp"``, ``"fve"``) and every constructor argument of its class.

    ``kwargs`` may be partial (and use ``H``/``K``) when constructing; it is completed with the defaults,
    checked and made read-only, so two specs of the same dynamics compare equal. The text form is accepted
    too: ``DynamicsSpec("fvp:H=0.9,K=3,gamma_max=10") == DynamicsSpec.parse("fvp:H=0.9,K=3,gamma_max=10")``.

    Args:
        family: ``"vp"``, ``"ve"``, ``"fvp"`` or ``"fve"``, or the whole text form ``"fvp:H=0.9,K=3"``.
        kwargs: constructor arguments of the family's class by name or short name (``H``, ``K``); missing ones
            take the class's defaults.

    Raises:
        ValueError: an unknown family or key, a value of the wrong type or out of range (naming it).
    """

    family: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if ":" in str(self.family):             # the text form: read as parse() reads it, with its messages
            if self.kwargs:
                raise ValueError(f"dynamics {self.family!r}: give the arguments either in the text or as kwargs, "
                                 f"not both; got kwargs {dict(self.kwargs)}")
            parsed = DynamicsSpec.parse(self.family)
            object.__setattr__(self, "family", parsed.family)
            object.__setattr__(self, "kwargs", parsed.kwargs)
            return
        family = str(self.family).strip().lower()
        object.__setattr__(self, "family", family)
        kwargs = _complete(family, dict(self.kwargs), f"dynamics {family!r}")
        object.__setattr__(self, "kwargs", MappingProxyType(kwargs))

    def __hash__(self):
        return hash(self.text)

    def __str__(self):
        return self.text

    # --------------------------------------------------------------------------------- reading
    @classmethod
    def parse(cls, text: str, defaults: Mapping[str, Any] | None = None) -> DynamicsSpec:
        """``"vp"``, ``"fvp:H=0.9,K=3"``, ``"fve:H=0.7,K=2,sigma_max=80"``, …

        ``defaults``: values (by argument name) for the arguments the text does not name, instead of the
        constructor's; those the family does not take are ignored (e.g. ``hurst`` for ``"vp"``).
        """
        where = f"dynamics spec {text!r}"
        family, _, params = str(text).strip().partition(":")
        family = family.strip().lower()
        _check_family(family, where)
        given = {}
        for item in filter(None, (part.strip() for part in params.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"{where}: expected key=value items separated by commas "
                                 f"(e.g. fvp:H=0.9,K=3); got {item!r}")
            if key.strip() in given:
                raise ValueError(f"{where}: {key.strip()} is given twice")
            given[key.strip()] = value.strip()
        named = {_canonical(family, key, where) for key in given}
        fill = {name: value for name, value in (defaults or {}).items()
                if name in _arguments(family) and name not in named}
        return cls(family, _complete(family, {**given, **fill}, where))

    @classmethod
    def from_dict(cls, d: Mapping) -> DynamicsSpec:
        """Inverse of :meth:`to_dict`; also reads the older checkpoint entry
        ``{"name": "fvp", "hurst": 0.9, "num_processes": 3}`` (``{"name": "vp", "hurst": None, …}``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a dynamics description must be a dict; got {type(d).__name__}")
        if "family" in d:
            return cls(d["family"], {k: v for k, v in d.items() if k != "family"})
        if "name" in d:                       # the entry written before DynamicsSpec existed
            family = str(d["name"]).lower()
            fractional = FAMILIES.get(family, (None, False))[1]
            keep = ("hurst", "num_processes") if fractional else ()
            return cls(family, {k: d[k] for k in keep if d.get(k) is not None})
        raise ValueError(f"a dynamics description needs a 'family' key; got keys {sorted(d)}")

    @classmethod
    def from_dynamics(cls, dyn) -> DynamicsSpec:
        """The spec of built FVP/FVE dynamics, read from its attributes (K = 0 gives vp/ve)."""
        if getattr(dyn, "family", None) not in ("FVP", "FVE"):
            raise TypeError(f"from_dynamics needs FVP or FVE dynamics; got {type(dyn).__name__}")
        family = dyn.family.lower() if dyn.num_processes else dyn.family.lower()[1:]
        return cls(family, {name: _read_attribute(dyn, name) for name in _arguments(family)})

    # --------------------------------------------------------------------------------- writing
    def build(self):
        """The dynamics (an FVP or FVE module, on the CPU)."""
        cls, fractional = FAMILIES[self.family]
        return cls(**self.kwargs) if fractional else cls(num_processes=0, **self.kwargs)

    def to_dict(self) -> dict:
        """Plain values (``{"family": "fvp", "hurst": 0.9, …}``): JSON and ``weights_only`` checkpoints."""
        return {"family": self.family, **self.kwargs}

    @property
    def fractional(self) -> bool:
        return FAMILIES[self.family][1]

    def items(self, omit=()) -> list[str]:
        """``key=value`` texts of H, K and of the arguments that differ from the constructor's defaults,
        except those named in ``omit``."""
        defaults = _arguments(self.family)
        return [f"{_display(k)}={_format(v)}" for k, v in self.kwargs.items()
                if k not in omit and (k in _SHORT or v != defaults[k])]

    def format(self, omit=()) -> str:
        """The text without the arguments in ``omit`` (they take their defaults when parsed back)."""
        items = self.items(omit)
        return self.family + (":" + ",".join(items) if items else "")

    @property
    def text(self) -> str:
        """The canonical text: ``DynamicsSpec.parse(spec.text) == spec``."""
        return self.format()

    @property
    def label(self) -> str:
        """For people: ``"VP"``, ``"FVP(H=0.9,K=3)"``, ``"FVE(H=0.7,K=2,sigma_max=80)"``."""
        items = self.items()
        return self.family.upper() + (f"({','.join(items)})" if items else "")

    @property
    def slug(self) -> str:
        """The label as a file-name part: ``"fvp-h-0-9-k-3"``."""
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


def _read_attribute(dyn, name: str):
    if name == "T":
        return dyn.horizon
    if name == "grid_size":
        return getattr(dyn, "grid_size", 2048)     # older LinearFractionalDynamics do not record it: the default
    for owner in (dyn, dyn.schedule):
        if hasattr(owner, name):
            return getattr(owner, name)
    raise TypeError(f"cannot read the argument {name!r} back from {type(dyn).__name__}")


#: the training-recipe keys a :class:`RunSpec` may set (fields of TrainConfig)
RECIPE_KEYS = ("time_sampling", "precondition", "sigma_data")


@dataclass(frozen=True)
class RunSpec:
    """A dynamics and the training recipe of one row of ``gfdm compare``: ``SPEC[@key=value;key=value]``.

    E.g. ``"fvp:H=0.9,K=3"`` (the paper's recipe), ``"fvp:H=0.9,K=3,covariance_jitter=1e-4"`` (its code's
    jitter), ``"fvp:H=0.9,K=3@precondition=edm;time_sampling=like:vp"`` (noise-aware),
    ``"vp@time_sampling=like:fvp:H=0.9,K=2"``.
    Keys after ``@``: ``time_sampling``, ``precondition``, ``sigma_data`` (``;``-separated, since specs hold commas).
    """

    dynamics: DynamicsSpec
    recipe: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "recipe", MappingProxyType(dict(self.recipe)))

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        base, at, rest = str(text).partition("@")
        recipe = {}
        if at:
            for item in filter(None, (part.strip() for part in rest.split(";"))):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq or key not in RECIPE_KEYS:
                    raise ValueError(f"run spec {text!r}: expected key=value items after '@' with keys in "
                                     f"{RECIPE_KEYS}, separated by ';'; got {item!r}")
                if key in recipe:
                    raise ValueError(f"run spec {text!r}: {key} is given twice")
                recipe[key] = float(value) if key == "sigma_data" else value.strip()
        return cls(DynamicsSpec.parse(base), recipe)

    @property
    def label(self) -> str:
        """For people: the dynamics' label and the recipe in :data:`RECIPE_KEYS` order (the training run's label)."""
        extra = ", ".join(f"{k}={self.recipe[k]}" for k in RECIPE_KEYS if k in self.recipe)
        return f"{self.dynamics.label} [{extra}]" if extra else self.dynamics.label

    @property
    def slug(self) -> str:
        extra = "-".join(re.sub(r"[^a-z0-9]+", "-", f"{k}-{v}".lower()).strip("-") for k, v in self.recipe.items())
        return f"{self.dynamics.slug}--{extra}" if extra else self.dynamics.slug

    @property
    def text(self) -> str:
        extra = ";".join(f"{k}={v}" for k, v in self.recipe.items())
        return f"{self.dynamics.text}@{extra}" if extra else self.dynamics.text

    def __hash__(self):
        return hash((self.dynamics, tuple(sorted(self.recipe.items()))))

    def __eq__(self, other):
        return (isinstance(other, RunSpec) and self.dynamics == other.dynamics
                and dict(self.recipe) == dict(other.recipe))
