"""Warning classes of fracsde, and where a warning should point.

Every warning the library raises derives from :class:`FracsdeWarning`, so a test run can
turn exactly these into errors (see ``filterwarnings`` in pyproject.toml).
"""


class FracsdeWarning(UserWarning):
    """Base class of all warnings raised by fracsde."""


class IllConditionedWarning(FracsdeWarning):
    """A linear solve was ill-conditioned; the result may be inaccurate."""


class ApproximationWarning(FracsdeWarning):
    """The Markov approximation of fBM is poor (large relative L2 error) for the requested H, K and rates."""


class PriorMismatchWarning(FracsdeWarning):
    """A diffusion's terminal log-SNR is so high that its data-independent prior N(0, Σ_T) is visibly wrong."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside fracsde and models/ (the user)."""
    import inspect
    import os
    roots = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + d + os.sep
                  for d in ("fracsde", "models"))
    level = 1
    here = inspect.currentframe()
    frame = here.f_back if here is not None else None      # the function that is about to warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame = frame.f_back
        level += 1
    return level
