"""zerotune: develop neural networks and language models from scratch and fine-tune them."""

__version__ = "0.1.0"
