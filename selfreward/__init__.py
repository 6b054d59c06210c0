"""Shared code for the self-rewarding pipeline: the stages in scripts/ import from here."""

__version__ = "0.1.0"
