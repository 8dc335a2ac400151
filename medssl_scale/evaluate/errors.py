"""The errors a user of the evaluation stage can cause, each a one-line message."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Bad evaluation input (shapes, dtypes, parameters); the message is one line naming what to fix."""


class FractionError(EvaluationError):
    """A label fraction or validation split that cannot be drawn as asked (e.g. fewer patients than classes)."""
