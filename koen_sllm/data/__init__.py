"""Data pipeline: ingest (read and clean) -> mix -> pack (token files) -> loader.

The steps and their rules are described in docs/data.md.
"""
from ..errors import KoenError


class DataError(KoenError, RuntimeError):
    """Unusable or missing data; the message names the file (and line) and the fix."""
