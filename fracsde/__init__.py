"""fracsde: stochastic differential equations driven by fractional Brownian motion, in PyTorch."""
from ._warnings import FracsdeWarning, IllConditionedWarning
from .fbm import FractionalBrownianMotion
from .markov import MarkovApproxFBM, geometric_gammas, optimal_weights

__version__ = "0.1.0"

__all__ = [
    "FracsdeWarning",
    "IllConditionedWarning",
    "FractionalBrownianMotion",
    "MarkovApproxFBM",
    "geometric_gammas",
    "optimal_weights",
]
