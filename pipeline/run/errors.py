"""The run's errors for the user: each message is one line."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad usage found before any work starts; the message is one line for the user."""


class ActorStartFailed(RuntimeError):
    """The model actors did not start: not in time, or their setup raised. One line for the user."""


class StagingNotListed(RuntimeError):
    """Parts this run wrote are missing from the staging listing; nothing was committed. One line for the user."""
