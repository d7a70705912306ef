"""Errors caused by the user's input.

Every mistake a user can make (a bad option file, a missing data folder, a weight file that does not fit)
raises a subclass of ``UserError``. Entry points turn it into one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(UserError):
    """An option file or command-line override is invalid."""


class WeightsError(UserError):
    """A weight file or checkpoint does not fit the model it should be loaded into."""


class DataError(UserError):
    """A dataset on disk is missing, incomplete or malformed."""


class OutputError(UserError):
    """An output cannot be written: a full disk, a read-only filesystem, a folder where a file should go."""
