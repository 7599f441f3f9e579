"""The errors a user can cause, as one small hierarchy.

Everything raised for bad input, bad settings or a collection in the wrong state derives from
``ImprintError``; the ``imprint`` command turns these (and only these) into one line on stderr and
exit code 2, so anything else that escapes is a bug and shows its traceback. Each class also
derives from the built-in exception a Python caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for a missing collection...), so ``except ValueError`` keeps working.

Each class carries its own ``code`` (a stable name for programs), the ``http_status`` the server
answers it with (4xx: the client's fault; 5xx: the server's) and the CLI's ``exit_code``.
"""

from __future__ import annotations


class ImprintError(Exception):
    """Base of every user-facing error of retrieval-imprint."""

    code = "imprint_error"
    http_status = 400
    exit_code = 2


class InvalidParameterError(ImprintError, ValueError):
    """A setting (GEN/NORM/AGG parameter, index, threshold...) has a value it cannot take."""

    code = "invalid_parameter"
    http_status = 400


class DeviceError(InvalidParameterError):
    """A ``device`` that cannot be used here: an unknown name, or no GPU where one was asked for."""

    code = "device_unavailable"
    http_status = 400


class DataError(ImprintError, ValueError):
    """Input data (a file, an array, labels) cannot be used as asked; the message names the file,
    row, column, label or dimension at fault."""

    code = "invalid_data"
    http_status = 400


class SettingsClashError(ImprintError, ValueError):
    """Settings given for an existing collection differ from the ones it was created with."""

    code = "settings_clash"
    http_status = 409


class CollectionStateError(ImprintError, ValueError):
    """The collection cannot do this in its current state (empty, exact index, no model...)."""

    code = "collection_state"
    http_status = 409


class CollectionChangedError(CollectionStateError):
    """A write committed since the version being read changed the class rows it needs (a reader
    then reads the version now committed: ``Collection`` never lets it reach the caller)."""

    code = "collection_changed"
    http_status = 409


class CollectionNotFoundError(ImprintError, FileNotFoundError):
    """Nothing at the path."""

    code = "collection_not_found"
    http_status = 404


class NotACollectionError(ImprintError, ValueError):
    """The path exists but holds no collection."""

    code = "not_a_collection"
    http_status = 404


class CollectionExistsError(ImprintError, FileExistsError):
    """``create`` was pointed at a path that already holds something."""

    code = "collection_exists"
    http_status = 409


class CollectionDamagedError(ImprintError, ValueError):
    """A file the collection's database names is missing, truncated or unreadable."""

    code = "collection_damaged"
    http_status = 500


class CollectionIOError(ImprintError, OSError):
    """The collection's files could not be written (a full disk, a read-only folder); nothing
    committed was changed."""

    code = "collection_io"
    http_status = 503


class CollectionLockedError(ImprintError, RuntimeError):
    """Another process is writing to the collection."""

    code = "collection_locked"
    http_status = 409


class SchemaVersionError(ImprintError, RuntimeError):
    """The database schema is older (upgrade it) or newer (upgrade the package) than this code."""

    code = "schema_version"
    http_status = 500


class CalibrationError(DataError):
    """The calibration data cannot meet the target asked for (nothing stored was changed)."""

    code = "calibration_unreachable"
    http_status = 422


class RequestError(DataError):
    """An HTTP request the server will not answer as sent: too large, too many queries, a
    ``top`` over the cap; ``http_status`` says which."""

    code = "invalid_request"

    def __init__(self, message: str, http_status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.http_status, self.code = http_status, code


class UnauthorizedError(ImprintError, PermissionError):
    """The server needs an API key (``Authorization: Bearer <key>``) and the request had none
    or another."""

    code = "unauthorized"
    http_status = 401


class NotReadyError(ImprintError, RuntimeError):
    """The server is not ready to answer: still loading the model and the collection, or a
    dependency it needs has failed (``/health`` says which)."""

    code = "not_ready"
    http_status = 503


class ServerError(ImprintError):
    """The server refused a request or could not be reached (``client.Client``); the message says
    which, ``status`` is the HTTP status (None: no answer) and ``code`` the server's error code."""

    code = "server_error"
    http_status = 502

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code or type(self).code
