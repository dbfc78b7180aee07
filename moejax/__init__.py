"""moejax: Mixture-of-Experts, mixed precision and ensembles for language models in JAX/Flax."""

__version__ = "0.1.0"
