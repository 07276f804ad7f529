"""Models composed from the fracsde library (``models.gfdm``: generative fractional diffusion)."""
