"""WORM audit export: Object Lock (compliance) on moto, read back and verified."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import botocore.exceptions
import pytest

from auditlog.__main__ import verify_dir
from clipstore.app import App
from clipstore.audit import AuditRecord
from clipstore.audit.export import download_export, export_to_s3
from clipstore.config import Config


def test_exported_range_cannot_be_deleted_or_shortened_and_verifies_from_s3(
        config: Config, moto_endpoint: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"audit-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    app = App(config)
    try:
        for i in range(25):
            app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest", request_id=str(i)))
        base, size, versions = export_to_s3(app.audit, s3, bucket, retention_days=30, actor_id="test",
                                            actor_role="auditor")
        vkey = app.audit.signer.verifier.key_string()
    finally:
        app.close()
    assert size == 26
    key = base + "entries.jsonl"
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    with pytest.raises(botocore.exceptions.ClientError) as deleted:
        s3.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
    assert deleted.value.response["Error"]["Code"] == "AccessDenied"
    # (moto does not refuse shortening a compliance-mode retention, as S3 does; not tested here.)
    # An "overwrite" only adds a version; the locked original stays, byte for byte.
    original = s3.get_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=b"forged\n")
    assert s3.get_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])["Body"].read() == original
    s3.delete_object(Bucket=bucket, Key=key)  # only a delete marker; the locked version remains
    assert s3.get_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])["Body"].read() == original

    out = tmp_path / "from-s3"
    download_export(s3, bucket, base, out, versions)  # the locked versions, whatever came after them
    code, line = verify_dir(out, vkey, None)
    assert code == 0 and line.startswith(f"OK size={size} "), line
    s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key, "VersionId": head["VersionId"]})
    result = subprocess.run([sys.executable, "-m", "clipstore", "audit", "verify", "--s3-export",
                             f"s3://{bucket}/{base}", "--s3-endpoint-url", moto_endpoint, "--key", vkey],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 0 and result.stdout.startswith("OK size="), result.stderr
