"""Compression of a trained run into a new run, with the metrics before and after.

    prune.py      magnitude pruning (layer or global), zeros written into the weights
    quantize.py   int8 weight-only quantization (per output channel), dequantized on loading
    layers.py     the layers whose weights both compress
    api.py        the prune and quantize verbs: the new run folder and the comparison
"""
