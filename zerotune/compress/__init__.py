"""Compression of a trained run into a new run, with the metrics before and after.

    prune.py      magnitude pruning (layer or global), zeros written into the weights
"""

from zerotune.compress.prune import prune

__all__ = ["prune"]
