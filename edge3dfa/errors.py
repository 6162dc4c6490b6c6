"""One exception type for everything a user can get wrong: the CLI turns it into a one-line error and exit 2."""


class Edge3dfaError(Exception):
    """Bad input or missing data: a message a person can act on, never a traceback."""
