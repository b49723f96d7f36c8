"""Errors that the CLI reports as one clear line (exit code 2) rather than a traceback."""

__all__ = ["MedsegError", "IngestError", "StageInputError", "one_line"]


def one_line(text: object) -> str:
    """``text`` on one line: a library's multi-line message (nibabel's "...\n - could the file be damaged?") joined
    with spaces, so a report entry, a log line and the CLI's error stay one line each."""
    return " ".join(str(text).split())


class MedsegError(Exception):
    """Base class for expected, user-facing failures; the message is kept on one line (:func:`one_line`)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(one_line(a) if isinstance(a, str) else a for a in args))


class IngestError(MedsegError):
    """Nothing usable was found in the ingest source."""


class StageInputError(MedsegError):
    """A stage's input is missing or does not satisfy its contract."""
