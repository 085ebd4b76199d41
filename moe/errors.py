"""The one exception class for mistakes a user can fix.

:class:`UserError` is what a bad config value, path, flag or environment setting raises: the ``moe``
command prints its message as one line and exits with status 2. It subclasses ``ValueError``, so
``except ValueError`` still catches it. Anything else (a bug, a failure inside a dependency) is not
a user error: the command lets it propagate with its traceback and a non-zero exit status.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix, named in one line: printed without a traceback, exit status 2."""
