"""Distributed, data-parallel DCGAN training pipeline."""

__version__ = "0.1.0"
