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


def one_line(exc: BaseException) -> str:
    """An error's message as the user should read it. A DataLoader worker's error reaches the
    main process re-raised with torch's "Caught DataError in DataLoader worker process N" and
    the worker's traceback as its message: the original message is the traceback's last line."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return text
