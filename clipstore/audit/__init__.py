"""The service side of the audit log: durable appends, proofs, checkpoints, export."""

from clipstore.audit.log import OPERATOR, STARTUP, SYSTEM, Actor, AuditLog, AuditRecord, AuditUnavailable, Tx

__all__ = ["OPERATOR", "STARTUP", "SYSTEM", "Actor", "AuditLog", "AuditRecord", "AuditUnavailable", "Tx"]
