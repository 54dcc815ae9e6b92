"""Checkpoint post-processing service for PyTorch."""

__version__ = "0.1.0"
