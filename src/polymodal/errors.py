"""Errors a user can fix. The CLI prints them as one line and exits with status 2; an interrupted
run exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""


class ConfigError(ValueError):
    """A bad config key, value or part name. The message names it and the valid choices."""


class DataError(ValueError):
    """Unusable input data (a missing manifest, no readable sample). The message names the path."""


class RunError(RuntimeError):
    """A training run that cannot go on: its folder is in use by another process, its losses stay
    non-finite, a checkpoint cannot be written. The message names the run, step or file and what to
    do; the last checkpoint written is intact."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run, after a checkpoint of the last finished step when there
    was time for one. A ``KeyboardInterrupt``, so code that cleans up after Ctrl-C does so here too.

    Attributes:
        signum: the signal that stopped the run.
    """

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum
