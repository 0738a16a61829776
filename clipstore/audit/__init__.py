"""The service side of the audit log: durable appends, proofs, checkpoints, export.

The unit-of-work types a request hands it (`Actor`, `AuditRecord`, `Tx`) are in
`clipstore.unit`, which loads no database driver, so the domain can use them.
"""

from clipstore.audit.log import AuditLog, AuditUnavailable

__all__ = ["AuditLog", "AuditUnavailable"]
