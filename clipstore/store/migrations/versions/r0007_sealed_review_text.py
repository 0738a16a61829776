"""escalating lockouts; labels and resolutions sealed under the clip's key (legacy migration 7, commit 0cb2999)

Guarded, as migration 7 was: migration 5 at that commit already created these columns.
Labels and resolutions written in clear before it are sealed by a data step
(clipstore.store.legacy) that needs the KMS.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clipstore.store.migrations._shape import has_column

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    if not has_column("reviewers", "lockouts", offline=False):
        op.add_column("reviewers", sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"))
    if not has_column("assignments", "label_ct", offline=False):
        op.add_column("assignments", sa.Column("label_ct", sa.LargeBinary, nullable=True))
    if not has_column("escalations", "resolution_ct", offline=False):
        op.add_column("escalations", sa.Column("resolution_ct", sa.LargeBinary, nullable=True))
