"""The service side of the audit log: durable appends, proofs, checkpoints, export."""

from clipstore.audit.log import OPERATOR, SYSTEM, Actor, AuditLog, AuditRecord, AuditUnavailable, Tx

__all__ = ["OPERATOR", "SYSTEM", "Actor", "AuditLog", "AuditRecord", "AuditUnavailable", "Tx"]
