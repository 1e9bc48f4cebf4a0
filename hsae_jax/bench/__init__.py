"""Benchmarks of hsae-jax: the decoder loss (``loss``) and the whole training step (``step``)."""
