"""The one exception type for bad input: its message names the problem and the fix."""


class InputError(Exception):
    """A bad config value, data file or output folder, found before any training."""
