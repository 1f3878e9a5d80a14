"""jaxlm: train and study decoder-only language models in JAX."""

__version__ = "0.1.0"
