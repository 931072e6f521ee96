"""Dual-delivery SMTP relay."""

__version__ = "0.1.0"
