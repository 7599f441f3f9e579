"""The errors a user can cause, as one small hierarchy.

Everything raised for bad input, bad settings or a collection in the wrong state derives from
``ImprintError``; the ``imprint`` command turns these (and only these) into one line on stderr and
exit code 2, so anything else that escapes is a bug and shows its traceback. Each class also
derives from the built-in exception a Python caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for a missing collection...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class ImprintError(Exception):
    """Base of every user-facing error of retrieval-imprint."""


class InvalidParameterError(ImprintError, ValueError):
    """A setting (GEN/NORM/AGG parameter, index, threshold...) has a value it cannot take."""


class DeviceError(InvalidParameterError):
    """A ``device`` that cannot be used here: an unknown name, or no GPU where one was asked for."""


class DataError(ImprintError, ValueError):
    """Input data (a file, an array, labels) cannot be used as asked; the message names the file,
    row, column, label or dimension at fault."""


class SettingsClashError(ImprintError, ValueError):
    """Settings given for an existing collection differ from the ones it was created with."""


class CollectionStateError(ImprintError, ValueError):
    """The collection cannot do this in its current state (empty, exact index, no model...)."""


class CollectionNotFoundError(ImprintError, FileNotFoundError):
    """Nothing at the path."""


class NotACollectionError(ImprintError, ValueError):
    """The path exists but holds no collection."""


class CollectionExistsError(ImprintError, FileExistsError):
    """``create`` was pointed at a path that already holds something."""


class CollectionDamagedError(ImprintError, ValueError):
    """A file the collection's database names is missing, truncated or unreadable."""


class CollectionIOError(ImprintError, OSError):
    """The collection's files could not be written (a full disk, a read-only folder); nothing
    committed was changed."""


class CollectionLockedError(ImprintError, RuntimeError):
    """Another process is writing to the collection."""


class SchemaVersionError(ImprintError, RuntimeError):
    """The database schema is older (upgrade it) or newer (upgrade the package) than this code."""
