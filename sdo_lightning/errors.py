"""Errors of this package that code in more than one layer raises or catches."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite and the module was told to stop (``on_nonfinite: stop``)."""
