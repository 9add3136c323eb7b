"""The export format: a directory of JSON Lines files, one per table, and ``manifest.json``.

::

    export/
      manifest.json          format, version, time, source backend, schema revision, and
                             per table: file, rows, sha256 (= its table digest)
      users.jsonl            one canonical JSON object per row (bastion.maintenance.codec),
      conversations.jsonl    rows in primary-key order, tables listed in foreign-key order
      ...

A file's SHA-256 is the table's digest (:func:`~bastion.maintenance.table_digests`) at export
time, so an import can check both the files and the imported content against it. The manifest
is written last: a directory without one is an unfinished export.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "MAX_LINE_BYTES",
    "MAX_MANIFEST_BYTES",
    "VERSION",
    "ExportManifest",
    "ExportedTable",
    "table_file_name",
]

FORMAT: Final = "bastion-export"
VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
MAX_MANIFEST_BYTES: Final = 1024 * 1024
MAX_LINE_BYTES: Final = 16 * 1024 * 1024
"""The longest row line an import reads (bigger rows are refused, not buffered)."""

# Table names become file names: letters, digits, _ and $ only, so no path can be smuggled in.
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


def table_file_name(table: str) -> str:
    """The file a table's rows are in: ``<table>.jsonl``."""
    return f"{table}.jsonl"


class ExportedTable(BaseModel):
    """One table of an export: its file, how many rows, and their digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    file: str
    rows: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _TABLE_NAME.fullmatch(value):
            raise ValueError(f"not a plain table name: {value[:70]!r}")
        return value

    @model_validator(mode="after")
    def _file_matches_name(self) -> ExportedTable:
        if self.file != table_file_name(self.name):
            raise ValueError(f"table {self.name} must be in {table_file_name(self.name)}")
        return self


class ExportManifest(BaseModel):
    """``manifest.json``: what an export holds and where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["bastion-export"] = FORMAT
    version: Literal[1] = VERSION
    created_at: datetime
    source_backend: Literal["sqlite", "postgresql"]
    schema_revision: list[str]
    tables: list[ExportedTable]

    @field_validator("tables")
    @classmethod
    def _unique_tables(cls, value: list[ExportedTable]) -> list[ExportedTable]:
        names = [table.name for table in value]
        if len(set(names)) != len(names):
            raise ValueError("a table is listed twice")
        return value
