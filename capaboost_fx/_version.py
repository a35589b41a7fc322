"""The package version (one place; io.py writes it into adapter files)."""

__version__ = "0.1.0"
