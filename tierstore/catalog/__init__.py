"""The catalog: every SQL statement of the store (:mod:`.statements`), over one SQLite file.

:mod:`.sqlite_catalog` is the handle (one connection, every driver error translated in one place),
:mod:`.block_row` the row of a block, :mod:`.tier_bits` and :mod:`.tier_counters` small facts kept with it.
"""

from .block_row import NO_L3, BlockRow, L3Columns
from .sqlite_catalog import CREATING_SUFFIX, SCHEMA_VERSION, Catalog, now, schema_scripts
from .statements import BLOCK_COLUMNS, DELETE_BLOCK

__all__ = ["BLOCK_COLUMNS", "CREATING_SUFFIX", "DELETE_BLOCK", "NO_L3", "SCHEMA_VERSION", "BlockRow", "Catalog",
           "L3Columns", "now", "schema_scripts"]
