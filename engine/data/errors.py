"""Errors and skip reasons shared by the data modules."""
from __future__ import annotations


class DataError(ValueError):
    """A data configuration or content problem; the message names the flag or file at fault."""


class BadAudio(Exception):
    """One audio item cannot be used; ``reason`` is one of the ``SKIP_*`` constants."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Damage: counted against --max_skip_fraction.
SKIP_UNREADABLE = "unreadable"    # soundfile cannot open or decode it
SKIP_TRUNCATED = "truncated"      # fewer samples than the header / index promised
SKIP_EMPTY = "empty"              # zero samples
SKIP_NONFINITE = "nonfinite"      # NaN or inf samples
SKIP_SILENT = "silent"            # all samples equal (no signal: normalizes to zeros)
DAMAGE_REASONS = (SKIP_UNREADABLE, SKIP_TRUNCATED, SKIP_EMPTY, SKIP_NONFINITE, SKIP_SILENT)

# Deliberate filters (--min/--max_duration_in_seconds): reported, not counted as damage.
SKIP_TOO_SHORT = "too_short"
SKIP_TOO_LONG = "too_long"
FILTER_REASONS = (SKIP_TOO_SHORT, SKIP_TOO_LONG)
