"""The one exception type users see: a clear, one-line message about their config or data."""


class RlhfTimeError(Exception):
    """A user-facing error (bad config, bad data, missing model). The CLI prints it as one line and exits 2."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal (SIGTERM, SIGINT, SIGUSR1) after writing a checkpoint; the CLI exits with exit_code."""

    def __init__(self, message: str, exit_code: int, checkpoint=None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint
