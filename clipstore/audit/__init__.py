"""The service side of the audit log: durable appends, proofs, checkpoints, export."""

from clipstore.audit.log import AuditLog, AuditRecord, AuditUnavailable

__all__ = ["AuditLog", "AuditRecord", "AuditUnavailable"]
