"""Storage for access control and usage accounting: SQLite or PostgreSQL behind one small seam."""

from .database import Database, Dialect, Queries, StorageError, StorageUnavailable, open_database
from .keystore import KeyStore, StoredKey
from .ledger import UsageEvent, UsageLedger
from .migrations import MIGRATIONS, migrate, open_migrated
from .report import Grouping, usage_report

__all__ = [
    "MIGRATIONS",
    "Database",
    "Dialect",
    "Grouping",
    "KeyStore",
    "Queries",
    "StorageError",
    "StorageUnavailable",
    "StoredKey",
    "UsageEvent",
    "UsageLedger",
    "migrate",
    "open_database",
    "open_migrated",
    "usage_report",
]
