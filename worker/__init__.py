"""segstream: asynchronous instance-segmentation stream worker."""

__all__ = ["__version__"]

__version__ = "0.1.0"
