"""The one exception type users see: a clear, one-line message about their config or data."""


class RlhfTimeError(Exception):
    """A user-facing error (bad config, bad data, missing model). The CLI prints it as one line and exits 2."""
