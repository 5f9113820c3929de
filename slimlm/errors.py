"""The one exception type that speaks to the user.

Anything raised as `SlimlmError` is a problem with the input (a missing file, a bad
recipe, an unsupported model), not a bug: the CLI prints its message as one sentence
and exits non-zero without a traceback. Every other exception is a bug and keeps its
traceback.
"""


class SlimlmError(Exception):
    """A user-facing error: the message names the input and what to do about it."""
