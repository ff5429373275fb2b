"""Errors raised for bad input. Each names the culprit (file, row, setting) in its message."""


class GecoError(Exception):
    """Base class: a problem the user can fix, reported without a deep traceback by the CLI."""


class ConfigError(GecoError, ValueError):
    """An impossible or inconsistent setting (e.g. alpha = beta = 0, tau <= 0)."""


class DataError(GecoError):
    """A malformed split file, a missing or unreadable image, a bad dataset layout."""


class WeightsError(GecoError):
    """Backbone weights requested but not available."""


class TrackingError(GecoError):
    """The MLflow tracking server or store is unreachable or refused a call (names the URI)."""
