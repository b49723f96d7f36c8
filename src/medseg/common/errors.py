"""Errors that the CLI reports as one clear line (exit code 2) rather than a traceback."""

__all__ = ["MedsegError", "IngestError", "StageInputError"]


class MedsegError(Exception):
    """Base class for expected, user-facing failures."""


class IngestError(MedsegError):
    """Nothing usable was found in the ingest source."""


class StageInputError(MedsegError):
    """A stage's input is missing or does not satisfy its contract."""
