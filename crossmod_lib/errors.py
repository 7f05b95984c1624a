"""One exception type for every problem a user can fix (bad input, bad config).

The command-line tool prints such an error as a single line and exits non-zero, so each message
must name the file or setting concerned and say what is wrong with it.
"""


class CrossmodError(Exception):
    """A user-facing error: the message is one line naming the file or setting and the problem."""


class NoContoursError(CrossmodError):
    """A patient folder holds an image but no contour file at all (no RTSTRUCT): an unannotated
    patient, which callers may accept. A contour file that exists but cannot be read is never
    this error (it is a plain :class:`CrossmodError`)."""
