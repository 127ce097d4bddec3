"""The catalog: every SQL statement of the store, over one SQLite file (see :mod:`.sqlite_catalog`)."""

from .sqlite_catalog import (
    BLOCK_COLUMNS,
    DELETE_BLOCK,
    SCHEMA_VERSION,
    BlockRow,
    Catalog,
    now,
    schema_scripts,
)

__all__ = ["BLOCK_COLUMNS", "DELETE_BLOCK", "SCHEMA_VERSION", "BlockRow", "Catalog", "now", "schema_scripts"]
