"""The service's components, built once from config: the one place a backend is chosen."""

from __future__ import annotations

from pathlib import Path

from clipstore.audit import AuditLog
from clipstore.audit.signing import load_or_create_signer
from clipstore.clock import Clock, SystemClock
from clipstore.config import Config
from clipstore.store import Database, PrincipalRepository
from kms import AwsKms, KeyProvider, LocalKms


def root_provider(config: Config) -> KeyProvider:
    if config.kms is not None:
        return AwsKms(config.kms.key_id, endpoint_url=config.kms.endpoint_url, region=config.kms.region)
    return LocalKms.from_file(config.root_key_file)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


class App:
    """Stores and key providers shared by the servicers; close() releases them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        _private_dir(config.data_dir)
        self.root = root_provider(config)
        self.db = Database(config.effective_database_url)
        self.principals = PrincipalRepository(self.db)
        self.clock: Clock = SystemClock()
        self.audit = AuditLog(self.db, load_or_create_signer(self.db, self.root), self.clock,
                              checkpoint_every_entries=config.audit_checkpoint_every_entries,
                              checkpoint_every_s=config.audit_checkpoint_every_s)
        if config.s3 is None:
            _private_dir(config.blob_dir)

    def close(self) -> None:
        self.audit.close()
        self.db.close()
