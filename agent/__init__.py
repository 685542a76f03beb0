"""xpu-agent: slice, enforce and pool accelerators on one node."""

__all__ = ["__version__"]

__version__ = "0.1.0"
