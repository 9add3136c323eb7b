"""Database maintenance: integrity, digests, optimize, stats, cleanup, export/import, reset.

Every operation works on any schema: it reflects the database's own tables (leaving out
``alembic_version``) and orders them by their foreign keys. The ``bastion`` CLI and the admin
API are thin shells over these functions.
"""

from bastion.maintenance.digest import TableDigest, table_digests
from bastion.maintenance.errors import (
    ConfirmationError,
    ImportFileError,
    ImportTargetError,
    MaintenanceError,
    UnknownTableError,
)
from bastion.maintenance.integrity import IntegrityProblem, IntegrityReport, check_integrity

__all__ = [
    "ConfirmationError",
    "ImportFileError",
    "ImportTargetError",
    "IntegrityProblem",
    "IntegrityReport",
    "MaintenanceError",
    "TableDigest",
    "UnknownTableError",
    "check_integrity",
    "table_digests",
]
