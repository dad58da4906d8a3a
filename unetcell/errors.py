"""Errors that speak to the user: the CLI prints them in one line and exits non-zero."""

from __future__ import annotations


class UnetcellError(Exception):
    """A problem with the user's input or settings (not a bug): the message names the file
    or the setting and says how to fix it."""


class DataError(UnetcellError):
    """An image, mask or folder that cannot be used as it is."""

    @classmethod
    def collect(cls, problems: list[str], where: str, shown: int = 20) -> DataError:
        """One error for every problem found in a folder, so a user fixes them all in one go:
        the problem itself when there is one, else a count and one line per problem."""
        if len(problems) == 1:
            return cls(problems[0])
        lines = [f"{len(problems)} problems in {where}:"] + [f"  {p}" for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"  ... and {len(problems) - shown} more")
        return cls("\n".join(lines))


class ConfigError(UnetcellError):
    """A setting that is unknown, of the wrong type or out of range."""


class OutputExistsError(UnetcellError):
    """An output would overwrite something the user made; pass --overwrite to allow it."""


class TrainingStopped(UnetcellError):
    """Training stopped early (interrupted, or the loss diverged); the message says what was
    kept and how to go on."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
