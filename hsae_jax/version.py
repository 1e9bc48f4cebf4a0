"""The version of hsae-jax."""

__version__ = "0.1.0"
