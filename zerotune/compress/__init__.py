"""Compression of a trained run into a new run, with the metrics before and after.

    prune.py      magnitude pruning (layer or global), zeros written into the weights
    quantize.py   int8 weight-only quantization (per output channel), dequantized on loading
    base.py       what both share: the model (LoRA merged), the layers, the new run, the comparison
"""

from zerotune.compress.prune import prune
from zerotune.compress.quantize import quantize

__all__ = ["prune", "quantize"]
