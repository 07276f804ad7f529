"""fracsde: stochastic differential equations driven by fractional Brownian motion, in PyTorch."""
from ._warnings import ApproximationWarning, FracsdeWarning, IllConditionedWarning, PriorMismatchWarning
from .fbm import FractionalBrownianMotion
from .linear import LinearFractionalDynamics, VESchedule, VPSchedule
from .markov import MarkovApproxFBM, geometric_gammas, optimal_weights
from .noise import MarkovNoise
from .reverse import ReverseTimeSDE, euler_maruyama
from .rules import RATE_RULES, RateRule, kernel_projection, markov_rates, strong_error
from .sde import FractionalSDE, NonFiniteStateError, StiffnessWarning, default_method, sdeint, supported_methods
from .volterra import VolterraSDE, volterra_blocks, volterra_sdeint

try:  # the installed distribution's version (pyproject.toml); a bare source tree has no metadata
    from importlib.metadata import PackageNotFoundError as _NoMetadata
    from importlib.metadata import version as _version

    __version__ = _version("fracsde")
except _NoMetadata:
    __version__ = "0.0.0+unknown"

__all__ = [
    "FracsdeWarning",
    "IllConditionedWarning",
    "ApproximationWarning",
    "PriorMismatchWarning",
    "FractionalBrownianMotion",
    "MarkovNoise",
    "MarkovApproxFBM",
    "geometric_gammas",
    "optimal_weights",
    "RATE_RULES",
    "RateRule",
    "markov_rates",
    "strong_error",
    "kernel_projection",
    "VolterraSDE",
    "volterra_sdeint",
    "volterra_blocks",
    "FractionalSDE",
    "sdeint",
    "NonFiniteStateError",
    "StiffnessWarning",
    "supported_methods",
    "default_method",
    "LinearFractionalDynamics",
    "VPSchedule",
    "VESchedule",
    "ReverseTimeSDE",
    "euler_maruyama",
]
