"""The one exception type for user mistakes.

Anything a user can get wrong (a path, a blocksize, a recipe key) raises
``InputError`` with a one-paragraph message that names the bad value and the
valid choices. The command line prints the message without a traceback;
library callers can catch it like any ``ValueError``. ``memory`` and ``qlora``
reuse it, which is why it lives in the lowest package.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user-facing error: bad argument, bad file, bad configuration."""


def choices(values) -> str:
    """Render valid choices for an error message: ``'a', 'b' or 'c'``."""
    vals = [repr(v) if isinstance(v, str) else str(v) for v in values]
    if len(vals) <= 1:
        return "".join(vals)
    return ", ".join(vals[:-1]) + " or " + vals[-1]
