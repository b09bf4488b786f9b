"""Exceptions a user can act on: each message names the file, what is wrong and what to do."""

from __future__ import annotations


class SSCXRError(Exception):
    """Base class of every error sscxr raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(SSCXRError):
    """A configuration file or override is invalid."""


class DataError(SSCXRError):
    """Input data (a manifest, a cache, an image) is missing or malformed."""


class CheckpointError(SSCXRError):
    """A checkpoint or weight file cannot be used as asked."""
