"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class ConfigError(ValueError):
    """A bad config key, value or part name. The message names it and the valid choices."""


class DataError(ValueError):
    """Unusable input data (a missing manifest, no readable sample). The message names the path."""
