"""The one error type of `embedrpc prepare`."""

from __future__ import annotations


class PrepareError(Exception):
    """A model that cannot be prepared, or one that failed validation; the message says why."""
