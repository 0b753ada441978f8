"""Data pipeline: ingest (read and clean) -> mix -> pack (token files) -> loader.

The steps and their rules are described in docs/data.md.
"""


class DataError(RuntimeError):
    """Unusable or missing data; the message names the file (and line) and the fix."""
