"""The error types of problems a user can fix, which every layer raises and ``maskrcnn.cli`` prints as one line.

- :class:`InputError`: a bad input the package found (an annotation, a configuration value, a checkpoint
  that does not fit, a command-line option); the message names the input (file, image id, annotation id,
  key) and says what was expected. It is a ``ValueError``, so ``except ValueError`` still catches it.
- :class:`MissingPackageError`: an optional package that a chosen setting needs is not installed; the
  message names the package and how to install it (or which setting to change instead).

Any other exception is a defect of the package and keeps its traceback.
"""


class InputError(ValueError):
    """A problem with the user's input that the message names and that the user can fix."""


class MissingPackageError(ImportError):
    """An optional package is missing; the message names it and how to install it."""
