"""Errors a user can act on, and the exit codes the `qwen35` command gives them.

A `UserError` is something the person running the command got wrong or must decide: a config
key, a data file, a path, an output directory that belongs to another run. The command prints its
message alone, without a traceback (set `QWEN35_DEBUG=1` or pass `--debug` to see one), and exits
with the error's `exit_code`. Any other exception is a bug or an environment failure and keeps its
traceback (exit code 1).

`UserError` derives from `ValueError`, so code and tests that expect the project's ValueErrors for
bad input keep working when a raise site is narrowed to `UserError`.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad config, data, paths, or a refused output-directory state
EXIT_DIVERGED = 3  # training stopped after too many non-finite steps in a row
EXIT_SIGINT = 130  # stopped by SIGINT (Ctrl-C) after writing a checkpoint: 128 + 2, the shell's code
EXIT_SIGTERM = 143  # stopped by SIGTERM after writing a checkpoint: 128 + 15


class UserError(ValueError):
    """A mistake or decision for the user; printed as one message, no traceback."""

    exit_code = EXIT_USER_ERROR


class TrainingDiverged(UserError):
    """The loss or gradient norm stayed non-finite for `train.max_nonfinite_steps` steps."""

    exit_code = EXIT_DIVERGED
