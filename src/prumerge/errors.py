"""Errors that the CLI reports as one line, with a non-zero exit and no traceback."""


class PrumergeError(Exception):
    """A problem with the user's input or environment, explained in the message."""
