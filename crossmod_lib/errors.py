"""One exception type for every problem a user can fix (bad input, bad config).

The command-line tool prints such an error as a single line and exits non-zero, so each message
must name the file or setting concerned and say what is wrong with it.
"""


class CrossmodError(Exception):
    """A user-facing error: the message is one line naming the file or setting and the problem."""
