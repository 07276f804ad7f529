"""Warning classes of fracsde.

Every warning the library raises derives from :class:`FracsdeWarning`, so a test run can
turn exactly these into errors (see ``filterwarnings`` in pyproject.toml).
"""


class FracsdeWarning(UserWarning):
    """Base class of all warnings raised by fracsde."""


class IllConditionedWarning(FracsdeWarning):
    """A linear solve was ill-conditioned; the result may be inaccurate."""
