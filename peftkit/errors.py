"""Errors that mean "the user's input is wrong": the CLI prints them on one line, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data, arguments, files). The message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a recipe, reported together."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = len(self.problems)
        head = "invalid recipe: " if count == 1 else f"invalid recipe ({count} problems): "
        super().__init__(head + "; ".join(self.problems))


class RunError(Exception):
    """A run that cannot go on for a reason other than bad input: training diverged, the disk
    is full, a signal stopped it. The CLI prints one line and no traceback (`--debug` shows
    it); exit code 1, or 128 + N for signal N. `resumable` runs end with a complete
    checkpoint, and the CLI adds the command that continues them."""

    exit_code = 1
    resumable = False
