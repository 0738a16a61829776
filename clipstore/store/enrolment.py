"""Rows of self-enrolment: one-time codes, and the reviewer factors redeeming one installs.

Works on a unit of work's connection (or a read connection), like `PrincipalRows`,
which it extends: a redemption creates no principal but rotates its key.
"""

from __future__ import annotations

import sqlalchemy as sa

from clipstore.rows import CodeRow
from clipstore.store import schema
from clipstore.store.principals import PrincipalRows

_C, _R = schema.enrolment_codes, schema.reviewers


class EnrolmentRows(PrincipalRows):
    # -- codes ---------------------------------------------------------------
    def add_code(self, code_hash: bytes, *, principal_id: str, purpose: str, created_by: str, now: float,
                 expires_at: float) -> int:
        """Store a new code; every earlier unredeemed code of the principal expires now (one live code at
        a time: a re-issued code replaces a lost one). Returns how many were replaced."""
        replaced = self._conn.execute(_C.update().where(_C.c.principal_id == principal_id,
                                                        _C.c.redeemed_at.is_(None), _C.c.expires_at > now)
                                      .values(expires_at=now)).rowcount
        self._conn.execute(_C.insert().values(code_hash=code_hash, principal_id=principal_id, purpose=purpose,
                                              created_by=created_by, created_at=now, expires_at=expires_at))
        return replaced

    def code(self, code_hash: bytes) -> CodeRow | None:
        row = self._conn.execute(sa.select(_C.c.principal_id, _C.c.purpose, _C.c.expires_at, _C.c.redeemed_at)
                                 .where(_C.c.code_hash == code_hash)).one_or_none()
        return None if row is None else CodeRow(principal_id=row.principal_id, purpose=row.purpose,
                                                expires_at=row.expires_at, redeemed_at=row.redeemed_at)

    def claim_code(self, code_hash: bytes, *, now: float) -> CodeRow | None:
        """Single use: ONE conditional UPDATE marks the code redeemed if it is unredeemed and unexpired,
        and returns it; exactly one caller, on any replica, ever gets a row back."""
        row = self._conn.execute(_C.update().where(_C.c.code_hash == code_hash, _C.c.redeemed_at.is_(None),
                                                   _C.c.expires_at > now)
                                 .values(redeemed_at=now)
                                 .returning(_C.c.principal_id, _C.c.purpose, _C.c.expires_at)).one_or_none()
        return None if row is None else CodeRow(principal_id=row.principal_id, purpose=row.purpose,
                                                expires_at=row.expires_at, redeemed_at=now)

    # -- reviewer factors ------------------------------------------------------
    def add_reviewer(self, principal_id: str, locales: tuple[str, ...], *, now: float) -> None:
        """A reviewer with no TOTP secret yet: they cannot start a session until they redeem a code."""
        self._conn.execute(_R.insert().values(
            principal_id=principal_id, locales=",".join(locales), wrapped_totp_secret=None, last_totp_step=-1,
            failed_attempts=0, locked_until=0.0, lockouts=0, created_at=now))

    def set_totp_secret(self, principal_id: str, wrapped_secret: bytes) -> None:
        # last_totp_step stays: a code of the old secret's steps can never open a session again either.
        self._conn.execute(_R.update().where(_R.c.principal_id == principal_id)
                           .values(wrapped_totp_secret=wrapped_secret))
