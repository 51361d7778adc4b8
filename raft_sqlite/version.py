"""The library version (recorded in backup manifests)."""

__version__ = "0.1.0"
