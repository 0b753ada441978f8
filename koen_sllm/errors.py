"""One base type for the errors a user meets, and the exit code each stands for.

Every module raises its own subclass (ConfigError, CheckpointError, ...), with a
message that is one line naming the option, file or step and the fix; the
entry points (cli.train_main, the launcher) catch ``KoenError`` once and exit
with ``exit_code``: 2 for a bad option or a missing package (nothing started),
1 for a run-time failure. Standard library only: the launcher imports it.
"""
from __future__ import annotations


class KoenError(Exception):
    """A failure with a one-line message for the user; ``exit_code`` is what the process returns."""

    exit_code = 1


class UsageError(KoenError):
    """Something the user asked for cannot be done as asked (an option, a package): exit 2."""

    exit_code = 2
