"""Errors that speak to the user: the CLI prints them in one line and exits non-zero."""


class UnetcellError(Exception):
    """A problem with the user's input or settings (not a bug): the message names the file
    or the setting and says how to fix it."""


class DataError(UnetcellError):
    """An image, mask or folder that cannot be used as it is."""


class ConfigError(UnetcellError):
    """A setting that is unknown, of the wrong type or out of range."""


class OutputExistsError(UnetcellError):
    """An output would overwrite something the user made; pass --overwrite to allow it."""
