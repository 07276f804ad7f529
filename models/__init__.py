"""Models composed from the fracsde library (``models.gfdm``: generative fractional diffusion; ``models.roughvol``:
rough Bergomi and rough Heston; ``models.cli_types``: argparse types their command lines share)."""
