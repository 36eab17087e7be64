"""ncl_jax: Normalized Contrastive Learning (NCL) for text-video retrieval in JAX/Flax."""

__version__ = "0.1.0"
