"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class OptError(Exception):
    """A problem with the user's input (config, files, layout) rather than a bug.

    The CLI prints ``error: <message>`` and exits with status 2; nothing is written.
    """


# The exit status of a command that refused its input: no retry can fix it, so a launcher
# that requeues failures (`opt launch slurm`) must not requeue this one.
REFUSED_EXIT = 2
