"""The metadata store: owns the database; other modules get repositories."""

from clipstore.store.db import Database
from clipstore.store.principals import Principal, PrincipalRepository

__all__ = ["Database", "Principal", "PrincipalRepository"]
