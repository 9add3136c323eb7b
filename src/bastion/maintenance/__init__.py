"""Database maintenance: integrity, digests, optimize, stats, cleanup, export/import, reset.

Every operation works on any schema: it reflects the database's own tables (leaving out
``alembic_version``) and orders them by their foreign keys. The ``bastion`` CLI and the admin
API are thin shells over these functions.
"""

from bastion.maintenance.cleanup import purge_soft_deleted
from bastion.maintenance.digest import TableDigest, table_digests
from bastion.maintenance.errors import (
    ImportFileError,
    ImportTargetError,
    MaintenanceError,
    UnknownTableError,
)
from bastion.maintenance.export import export_database
from bastion.maintenance.export_format import ExportedTable, ExportManifest
from bastion.maintenance.import_ import ImportResult, import_database, read_manifest
from bastion.maintenance.integrity import IntegrityProblem, IntegrityReport, check_integrity
from bastion.maintenance.optimize import OptimizeResult, optimize
from bastion.maintenance.progress import NoProgress, Progress
from bastion.maintenance.reset import database_name, reset_database
from bastion.maintenance.stats import DatabaseStats, IndexStats, TableStats, collect_stats

__all__ = [
    "DatabaseStats",
    "ExportManifest",
    "ExportedTable",
    "ImportFileError",
    "ImportResult",
    "ImportTargetError",
    "IndexStats",
    "IntegrityProblem",
    "IntegrityReport",
    "MaintenanceError",
    "NoProgress",
    "OptimizeResult",
    "Progress",
    "TableDigest",
    "TableStats",
    "UnknownTableError",
    "check_integrity",
    "collect_stats",
    "database_name",
    "export_database",
    "import_database",
    "optimize",
    "purge_soft_deleted",
    "read_manifest",
    "reset_database",
    "table_digests",
]
