"""Errors every part may raise and the command shell reports."""


class VivaceCLIError(Exception):
    """An error the CLI reports as one line naming the problem, without a traceback."""
