"""Errors of the maintenance operations; all are :class:`~bastion.errors.BastionError`.

::

    BastionError
    └── MaintenanceError            a maintenance operation refused or could not run
        ├── UnknownTableError       a table name that the database does not have
        ├── ImportFileError         an export directory or file is malformed: nothing written
        └── ImportTargetError       the target cannot take the import (not empty, other
                                    schema revision, content differs after import)
"""

from __future__ import annotations

from bastion.errors import BastionError

__all__ = [
    "ImportFileError",
    "ImportTargetError",
    "MaintenanceError",
    "UnknownTableError",
]


class MaintenanceError(BastionError):
    """A maintenance operation refused, or could not run; nothing was changed."""

    code = "maintenance_error"


class UnknownTableError(MaintenanceError):
    """A table was named that the database does not have."""

    code = "unknown_table"


class ImportFileError(MaintenanceError):
    """An export directory or one of its files is malformed; nothing was written."""

    code = "invalid_export"


class ImportTargetError(MaintenanceError):
    """The target database cannot take this import as it is; nothing was written."""

    code = "import_target_refused"
