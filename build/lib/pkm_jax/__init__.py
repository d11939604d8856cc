"""pkm-jax: large product-key memory in pretrained language models (JAX / Flax NNX)."""

__version__ = "0.1.0"
