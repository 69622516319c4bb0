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
