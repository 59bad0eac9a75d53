"""User-facing errors. Each message names the file, key and what was expected vs found."""

from __future__ import annotations


class VlaflowError(Exception):
    """Bad input, a missing file, a mismatch: printed by the CLI without a traceback."""


class StoreError(VlaflowError):
    """An episode store is missing, damaged, or disagrees with what was asked of it."""


class IngestError(VlaflowError):
    """A source dataset cannot be imported as it is."""


class ConfigError(VlaflowError):
    """A config field has a bad value."""
