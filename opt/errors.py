"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class OptError(Exception):
    """A problem with the user's input (config, files, layout) rather than a bug.

    The CLI prints ``error: <message>`` and exits with status 2; nothing is written.
    """
