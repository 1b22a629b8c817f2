"""Errors a user can act on."""


class LeukotypeError(ValueError):
    """Bad input or configuration; the message says what is wrong and how to fix it."""
