"""WORM audit export: every object new and under compliance-mode Object Lock (moto), its version id in a
manifest; verification reads the locked versions by id and fails when any export key has a second version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

from auditlog.checkpoint import Checkpoint, sign_checkpoint
from auditlog.cosignature import open_cosigned_checkpoint
from auditlog.merkle import leaf_hash, root_hash
from auditlog.witness import WitnessServer
from clipstore.app import App
from clipstore.audit.export import (
    ENTRIES_FILE,
    EXPORT_FILES,
    MANIFEST_FILE,
    ExportError,
    export_to_s3,
    manifest_bytes,
    verify_s3_export,
)
from clipstore.config import Config
from clipstore.unit import AuditRecord
from tests.test_witnessing import _config as witnessed_config
from tests.test_witnessing import log_key, witnesses  # noqa: F401 (fixtures)


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"audit-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def app(config: Config) -> Iterator[App]:
    app = App(config)
    for i in range(25):
        app.audit.append(AuditRecord(actor_id="p", actor_role="reviewer", action="clip.fetch", request_id=str(i)))
    yield app
    app.close()


def _export(app: App, s3: Any, bucket: str) -> tuple[dict[str, Any], str, str]:
    manifest, _ = export_to_s3(app.audit, s3, bucket, retention_days=30, actor_id="test", actor_role="auditor")
    return manifest, f"s3://{bucket}/{manifest['prefix']}", app.audit.signer.verifier.key_string()


def _cli_verify(location: str, vkey: str, endpoint: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clipstore", "audit", "verify", "--s3-export", location,
                           "--s3-endpoint-url", endpoint, "--key", vkey, *extra],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_every_exported_object_is_new_locked_and_named_by_version_id_in_the_manifest(
        app: App, s3: Any, bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    manifest, location, vkey = _export(app, s3, bucket)
    assert manifest["tree_size"] == 26 and set(manifest["objects"]) == set(EXPORT_FILES)
    for name, described in manifest["objects"].items():
        head = s3.head_object(Bucket=bucket, Key=manifest["prefix"] + name, VersionId=described["version_id"])
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ContentLength"] == described["bytes"]
    key = manifest["prefix"] + ENTRIES_FILE
    with pytest.raises(botocore.exceptions.ClientError) as deleted:
        s3.delete_object(Bucket=bucket, Key=key, VersionId=manifest["objects"][ENTRIES_FILE]["version_id"])
    assert deleted.value.response["Error"]["Code"] == "AccessDenied"
    (tmp_path / "manifest.json").write_bytes(manifest_bytes(manifest))
    for extra in ([], ["--manifest", str(tmp_path / "manifest.json")]):  # the bucket's copy, or the auditors'
        result = _cli_verify(location, vkey, moto_endpoint, *extra)
        assert result.returncode == 0 and result.stdout.startswith("OK size=26 "), result
        assert "s3_versions=single,locked" in result.stdout


def test_an_unreadable_export_or_manifest_is_one_line_never_a_traceback(
        app: App, s3: Any, bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    """A bucket that does not exist (or an unreachable endpoint) ended `clipstore audit verify --s3-export` in a
    botocore traceback; a manifest without its objects in a KeyError's."""
    manifest, location, vkey = _export(app, s3, bucket)
    missing = _cli_verify(f"s3://no-{bucket}/audit/1/", vkey, moto_endpoint)
    assert (missing.returncode, missing.stdout) == (2, ""), missing
    assert missing.stderr == f"ERROR cannot read s3://no-{bucket}/audit/1/: NoSuchBucket: The specified bucket " \
                             "does not exist\n"
    unreachable = _cli_verify(location, vkey, "http://127.0.0.1:1")
    assert unreachable.returncode == 2 and unreachable.stderr.startswith(f"ERROR cannot read {location}: Endpoint")
    assert "Traceback" not in unreachable.stderr
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "objects"}))
    bare = _cli_verify(location, vkey, moto_endpoint, "--manifest", str(tmp_path / "manifest.json"))
    assert (bare.returncode, bare.stdout) == (1, "FAIL s3 manifest: malformed (it must name tree_size and each "
                                                 "object's version_id and sha256)\n"), bare


def test_an_export_to_a_bucket_that_cannot_take_it_is_one_line_never_a_traceback(
        config: Config, s3: Any, moto_endpoint: str) -> None:
    """`clipstore audit export --s3-bucket` to a missing bucket, or one without Object Lock, ended in a botocore
    traceback."""
    plain = f"plain-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=plain)
    App(config).close()  # a deployment to export from
    env = {**os.environ, "CLIPSTORE_DATA_DIR": str(config.data_dir),
           **({"CLIPSTORE_DATABASE_URL": config.database_url} if config.database_url else {})}
    for bucket, says in ((f"no-{plain}", "NoSuchBucket: The specified bucket does not exist; create it with "
                                         "Object Lock"),
                         (plain, "the bucket needs versioning and Object Lock")):
        result = subprocess.run([sys.executable, "-m", "clipstore", "audit", "export", "--s3-bucket", bucket,
                                 "--s3-endpoint-url", moto_endpoint, "--retention-days", "1"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 1 and result.stderr.startswith(f"error: cannot write s3://{bucket}/audit/")
        assert says in result.stderr and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_re_signed_log_written_as_newer_versions_of_the_export_is_refused(
        app: App, s3: Any, bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    """The operator holds the signing key: it drops an entry, re-chains, re-signs, and writes the forged
    log over the export. Object Lock keeps the original version; the forgery is only a newer one."""
    manifest, location, vkey = _export(app, s3, bucket)
    entries = [json.loads(e) for e in app.audit.reader.entries(0, manifest["tree_size"])]
    del entries[3]
    forged, prev = [], "0" * 64
    for seq, entry in enumerate(entries):
        entry.update(seq=seq, prev=prev)
        forged.append(json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
        prev = leaf_hash(forged[-1]).hex()
    signer = app.audit.signer
    note = sign_checkpoint(Checkpoint(origin=signer.name, size=len(forged),
                                      root=root_hash([leaf_hash(e) for e in forged])), signer)
    s3.put_object(Bucket=bucket, Key=manifest["prefix"] + ENTRIES_FILE, Body=b"".join(e + b"\n" for e in forged))
    s3.put_object(Bucket=bucket, Key=manifest["prefix"] + "checkpoint", Body=note.encode())
    (tmp_path / "manifest.json").write_bytes(manifest_bytes(manifest))
    for extra in ([], ["--manifest", str(tmp_path / "manifest.json")]):
        result = _cli_verify(location, vkey, moto_endpoint, *extra)
        assert result.returncode == 1, result
        assert result.stdout.startswith(f"FAIL s3 {manifest['prefix']}checkpoint: 2 versions"), result.stdout


@pytest.mark.parametrize("name", [*EXPORT_FILES, MANIFEST_FILE])
@pytest.mark.parametrize("how", ["new-version", "delete-marker"])
def test_any_export_key_with_a_second_version_or_a_delete_marker_fails(
        app: App, s3: Any, bucket: str, name: str, how: str) -> None:
    manifest, location, vkey = _export(app, s3, bucket)
    key = manifest["prefix"] + name
    original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if how == "new-version":  # byte-identical: still an attempt to supersede
        s3.put_object(Bucket=bucket, Key=key, Body=original)
    else:
        s3.delete_object(Bucket=bucket, Key=key)
    code, line = verify_s3_export(s3, location, vkey, manifest=manifest)
    assert (code, line.split(" (")[0]) == (1, f"FAIL s3 {key}: 2 versions"), line


def test_the_exporter_never_adds_a_version_to_an_existing_key(app: App, s3: Any, bucket: str) -> None:
    planted = f"audit/{app.audit.reader.size() + 1:016d}/{ENTRIES_FILE}"  # where the next export goes
    s3.put_object(Bucket=bucket, Key=planted, Body=b"planted\n")
    with pytest.raises(ExportError, match="already exists"):
        export_to_s3(app.audit, s3, bucket, retention_days=30, actor_id="test", actor_role="auditor")
    assert len(s3.list_object_versions(Bucket=bucket, Prefix=planted)["Versions"]) == 1


def test_an_export_copied_without_object_lock_fails(app: App, s3: Any, bucket: str) -> None:
    manifest, _, vkey = _export(app, s3, bucket)
    copy = dict(manifest, prefix="unlocked/", objects={})
    for name in EXPORT_FILES:
        body = s3.get_object(Bucket=bucket, Key=manifest["prefix"] + name)["Body"].read()
        version = s3.put_object(Bucket=bucket, Key="unlocked/" + name, Body=body)["VersionId"]
        copy["objects"][name] = dict(manifest["objects"][name], version_id=version)
    s3.put_object(Bucket=bucket, Key="unlocked/" + MANIFEST_FILE, Body=manifest_bytes(copy))
    code, line = verify_s3_export(s3, f"s3://{bucket}/unlocked/", vkey, manifest=copy)
    assert (code, line) == (1, f"FAIL s3 unlocked/{ENTRIES_FILE}: not under compliance-mode Object Lock")


def test_an_export_carries_the_witnesses_cosigned_checkpoint(
        tmp_path: Path, database_url: str | None, witnesses: list[WitnessServer],  # noqa: F811
        s3: Any, bucket: str, moto_endpoint: str) -> None:
    app = App(witnessed_config(tmp_path, database_url, witnesses))  # type: ignore[arg-type]
    try:
        app.audit.append(AuditRecord(actor_id="p", actor_role="reviewer", action="clip.fetch"))
        manifest, _ = export_to_s3(app.audit, s3, bucket, retention_days=30, actor_id="test", actor_role="auditor",
                                   cosign=app.cosign)
        vkey = app.audit.signer.verifier.key_string()
    finally:
        app.close()
    note = s3.get_object(Bucket=bucket, Key=manifest["prefix"] + "checkpoint")["Body"].read()
    wkeys = [w.witness.signer.verifier for w in witnesses]
    _, cosigs = open_cosigned_checkpoint(note, app.audit.signer.verifier, wkeys, quorum=3)
    assert len(cosigs) == 3
    keys = [arg for k in wkeys for arg in ("--witness", k.key_string())]
    result = _cli_verify(f"s3://{bucket}/{manifest['prefix']}", vkey, moto_endpoint, *keys, "--quorum", "3")
    assert result.returncode == 0 and "witnesses=w0.test@" in result.stdout, result


def test_cli_export_writes_the_auditors_manifest_and_prints_how_to_verify(
        config: Config, bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    App(config).close()  # a deployment to export from (the CLI makes none out of an empty data dir)
    args = ["--data-dir", str(config.data_dir)]
    if not config.effective_database_url.startswith("sqlite"):
        args += ["--database-url", config.effective_database_url]
    result = subprocess.run([sys.executable, "-m", "clipstore", "audit", "export", *args, "--s3-bucket", bucket,
                             "--s3-endpoint-url", moto_endpoint, "--retention-days", "1",
                             "--manifest", str(tmp_path / "m.json")],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 0, result
    manifest = json.loads((tmp_path / "m.json").read_text())
    location = f"s3://{bucket}/{manifest['prefix']}"
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"exported {manifest['tree_size']} entries to {location} ")
    assert lines[2].startswith(f"verify with: clipstore audit verify --s3-export {location} --manifest ")
    vkey = lines[2].split("--key ")[1].strip("'")
    assert _cli_verify(location, vkey, moto_endpoint, "--manifest", str(tmp_path / "m.json")).returncode == 0
