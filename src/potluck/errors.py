"""Error hierarchy. Every error carries its data and a ``hint`` saying what to do next."""

from __future__ import annotations

from typing import Any


class PotluckError(Exception):
    """Root of all potluck errors.

    ``message`` says what happened, ``hint`` what to do; extra keyword data is kept in ``data``.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, **data: Any) -> None:
        self.message = message
        self.hint = hint
        self.data = data
        super().__init__(message)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message


class UserError(PotluckError):
    """The user asked for something that cannot be done (bad arguments, unknown name, …)."""

    exit_code = 2


class FormatError(UserError):
    """A file under a tracked pattern is not a valid checkpoint (truncated, malformed, unsafe)."""


class IntegrityError(PotluckError):
    """Stored data does not match its hash, or an object is missing."""

    exit_code = 3


class CorruptObjectError(IntegrityError):
    """An object's bytes do not hash to its id."""


class MissingObjectError(IntegrityError):
    """An object referenced by a manifest is not in the store."""


class GitError(PotluckError):
    """A git subprocess failed."""


class RemoteError(PotluckError):
    """An object remote misbehaved or could not be used (redirect loop, odd answers, no space
    to receive its objects); the message names the remote's URL with its credentials left out."""
