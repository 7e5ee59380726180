"""Errors that are the user's to fix. Each message names the file, tensor or field and what to do."""


class SafemergeError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class ConfigError(SafemergeError, ValueError):
    """The merge config is invalid (unknown key or method, bad parameter)."""


class CheckpointError(SafemergeError):
    """A checkpoint cannot be read or is inconsistent with the others."""


class OutputExistsError(SafemergeError, FileExistsError):
    """The output path exists and --overwrite was not given."""
