"""repro: one workflow that reproduces six ML papers end to end."""

__version__ = "0.1.0"
