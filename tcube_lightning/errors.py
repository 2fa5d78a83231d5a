"""The one exception type for bad user input: the CLI prints its message and exits, without a traceback."""


class InputError(ValueError):
    """A configuration value, file or data array is not what was expected; the message says which and why."""
