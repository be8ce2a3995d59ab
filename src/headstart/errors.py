"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(ValueError):
    """Bad input from the user: a one-line message that names the file or option and the fix.

    The CLI prints it as ``headstart: error: <message>`` and exits with code 2.
    """
