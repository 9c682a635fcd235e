"""Errors a user can act on: each carries one line of text and the exit code the CLI returns."""


class BenchError(Exception):
    """A failure the user caused or can fix; the CLI prints `error: <message>` and exits."""

    exit_code = 1


class InputError(BenchError):
    """Bad input: a model file, an option value, an unknown name. Exit code 2."""

    exit_code = 2


class ModelError(InputError):
    """The model file is missing, truncated, corrupt or of an unsupported architecture."""


class UnavailableError(BenchError):
    """A framework or device that cannot run on this host; the message says how to fix it."""

    exit_code = 3


class OutOfMemoryError(BenchError):
    """A cell that would not fit the memory it may use: its row's status is `oom`."""
