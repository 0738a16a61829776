"""The metadata store: owns the database; other modules get repositories."""

from clipstore.store.db import Database
from clipstore.store.principals import PrincipalRepository

__all__ = ["Database", "PrincipalRepository"]
