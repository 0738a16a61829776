"""`clipstore` command line: serve, principals, reviewers, audit export, verify and peer pseudonyms.

Commands that manage principals or read the log remotely speak to the API
(`clipstore.remote_cli`, `clipstore.remote`); the operator's commands that need
the database and the KMS (bootstrap, purge, key retirement, WORM export) run
locally.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import clipstore._quiet_grpc  # noqa: F401  (first of ours: before anything imports grpc)
from clipstore import __version__
from clipstore.auth import ROLES, create_principal
from clipstore.config import (
    BY_KEY,
    LOG_LEVELS,
    SETTINGS,
    Config,
    ConfigError,
    describe,
    load,
    load_config,
    unknown_env,
)
from clipstore.logs import configure_logging
from clipstore.remote import add_remote_flags
from clipstore.remote_cli import add_forensics_commands, add_principal_commands, add_reviewer_commands

EXIT_CONFIG = 2


def _setting_flag(parser: argparse.ArgumentParser, key: str, **kwargs: Any) -> None:
    """The setting's flag, its value stored under the setting's key (see `_overrides`)."""
    setting = BY_KEY[key]
    assert setting.flag is not None, key
    shown = setting.default_text or setting.default
    parser.add_argument(setting.flag, dest=key, metavar=setting.flag[2:].upper().replace("-", "_"),
                        help=f"{setting.help} (or {key}, ${setting.env}"
                             f"{'' if shown is None else f'; default {shown}'})", **kwargs)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (or $CLIPSTORE_CONFIG)")
    _setting_flag(parser, "data_dir")
    _setting_flag(parser, "database_url")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags of this command."""
    given = vars(args)
    return {s.key: given[s.key] for s in SETTINGS if s.key in given}


def _config(args: argparse.Namespace) -> Config:
    return load_config(config_file=args.config, overrides=_overrides(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from clipstore.logs import get_logger, route_uncaught_exceptions
    from clipstore.server import serve
    route_uncaught_exceptions()
    try:
        if args.print_config:
            sys.stdout.write(describe(load(config_file=args.config, overrides=_overrides(args))))
            _warn_unknown_env()
            return 0
        config = _config(args)
        configure_logging(level=config.log_level)
        _warn_unknown_env()
        return serve(config, on_ready=lambda server: _banner(server, args) if config.tls is None else None)
    except ConfigError as exc:  # one JSON line naming the setting and the fix
        get_logger("clipstore.server").error("server.start_failed", setting=exc.key, error=str(exc))
        return EXIT_CONFIG


def _warn_unknown_env() -> None:
    """A CLIPSTORE_* variable that is no setting is ignored, but said: one line each, its name (never its
    value) and the setting it most resembles."""
    from clipstore.logs import get_logger
    for name, like in unknown_env():
        get_logger("clipstore.config").warning("config.unknown_env", variable=name, ignored=True,
                                               **({"did_you_mean": like} if like else {}))


def _banner(server: object, args: argparse.Namespace) -> None:
    """Development mode (plaintext on loopback): where it listens, where the data is, what to run next."""
    import shlex

    from clipstore import __version__
    from clipstore.config import scrub
    config: Config = server.app.config  # type: ignore[attr-defined]
    host = config.listen.rpartition(":")[0]
    flags = [f"--data-dir {shlex.quote(str(config.data_dir.resolve()))}"]
    if args.config:
        flags.insert(0, f"--config {shlex.quote(str(args.config))}")
    if config.database_url:  # never its password (it may come from a file or the environment): put it back
        flags.append(f"--database-url {shlex.quote(scrub(config.database_url))}")
    print(f"clipstore {__version__} serving on {host}:{server.port} "  # type: ignore[attr-defined]
          "(development mode: plaintext, loopback only)\n"
          f"{_banner_where(config)}"
          "next: create an API key for your backend, then call the API with it:\n"
          f"  clipstore principals create --role ingest --name my-backend {' '.join(flags)}\n"
          "stop with Ctrl-C (drains in-flight calls)", flush=True)


def _banner_where(config: Config) -> str:
    """The banner's two lines on where things are: the data dir names only what it holds (with the root key in
    AWS KMS, no root key is there), and the root key line names the key in use."""
    held = [what for what, here in (("root key", config.kms is None), ("database", config.database_url is None),
                                    ("blobs", config.s3 is None)) if here]
    root = f"AWS KMS key {config.kms.key_id}" if config.kms is not None else "local file"
    return (f"  data:      {config.data_dir.resolve()} ({', '.join(held) or 'none of root key, database, blobs'})\n"
            f"  database:  {'SQLite in the data dir' if config.database_url is None else 'PostgreSQL'}; "
            f"root key: {root}; blobs: {f's3://{config.s3.bucket}' if config.s3 is not None else 'files'}\n")


def _cmd_dev_certs(args: argparse.Namespace) -> int:
    from clipstore.tls import write_dev_certs
    clients = []
    for item in args.client or [f"{role}-dev:{role}" for role in ROLES]:
        name, _, role = item.partition(":")
        if role not in ROLES or not name:
            print(f"--client takes NAME:ROLE with ROLE one of {', '.join(ROLES)}; got {item!r}", file=sys.stderr)
            return EXIT_CONFIG
        clients.append((name, role))
    for path in write_dev_certs(args.out, clients, trust_domain=args.trust_domain):
        print(path)
    print(f"serve with: clipstore serve --tls-cert {args.out}/server.pem --tls-key {args.out}/server.key "
          f"--client-ca {args.out}/ca.pem", file=sys.stderr)
    return 0


def _cmd_principals_create(args: argparse.Namespace) -> int:
    """With --server: CreatePrincipal as an admin. Without: the local bootstrap (database and KMS access),
    which is how the first admin comes to exist."""
    if args.server is not None:
        from clipstore.remote_cli import principals_create
        return principals_create(args)
    from clipstore.app import App
    from clipstore.errors import ClipstoreError
    from clipstore.principals import canonical_spiffe_id
    from clipstore.unit import OPERATOR
    config = _config(args)
    app = App(config)
    try:
        spiffe_id = canonical_spiffe_id(args.spiffe_id, role=args.role, trust_domain=config.trust_domain) \
            if args.spiffe_id else None
        principal, key = create_principal(app.principals, app.audit, role=args.role, name=args.name,
                                          actor=OPERATOR, spiffe_id=spiffe_id)
    except ClipstoreError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        app.close()
    print(f"principal_id={principal.id} role={principal.role}" + (f" spiffe_id={spiffe_id}" if spiffe_id else ""))
    if key is not None:
        print(f"api_key={key}")
        print("# the key is shown only once; send it as 'authorization: Bearer <key>'", file=sys.stderr)
    return 0


def _s3_client(endpoint_url: str | None) -> object:
    import boto3
    return boto3.client("s3", endpoint_url=endpoint_url)


def _missing_deployment(config: Config, *, root: bool = False, schema: bool = True) -> str | None:
    """Why `config` names no deployment that a server has run on, or None. A command that only reads or
    maintains one must not make a fresh one (a new root key, a new audit log and its signing key) out of a
    mistyped --data-dir: `audit export` would print a verifier key nobody should pin."""
    if root and config.kms is None and not config.root_key_file.exists():
        return f"no root key at {config.root_key_file}; give the server's --data-dir or --config"
    url = config.effective_database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return (f"no database at {url.removeprefix('sqlite:///')}; give the server's --data-dir, --database-url "
                "or --config")
    if schema and not url.startswith("sqlite"):  # a server database that clipstore never set up
        from clipstore.config import scrub
        from clipstore.store import Database
        db = Database(url, upgrade=False)
        try:
            with db.read() as conn:
                inspector = sa.inspect(conn)
                known = inspector.has_table("alembic_version") or inspector.has_table("schema_migrations")
        finally:
            db.close()
        if not known:
            return (f"no clipstore database at {scrub(url)}; give the server's --database-url (or --config), or "
                    "run clipstore db upgrade there first")
    return None


def _existing(config: Config, *, root: bool = False, schema: bool = True) -> Config | None:
    """`config` if it names an existing deployment, else None after one line on stderr. `schema=False`: a
    server database (PostgreSQL) may be empty, as `db current` reports it."""
    problem = _missing_deployment(config, root=root, schema=schema)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return None
    return config


def _cmd_audit_export(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError

    from clipstore.app import App
    from clipstore.audit.export import MANIFEST_FILE, ExportError, export_log, export_to_s3, manifest_bytes
    from clipstore.audit.witnessing import QuorumNotReached
    if (args.out is None) == (args.s3_bucket is None):
        print("give exactly one of --out DIR or --s3-bucket BUCKET", file=sys.stderr)
        return EXIT_CONFIG
    if args.server is not None:
        if args.s3_bucket is not None:
            print("a WORM export (--s3-bucket) runs where the database is; drop --server", file=sys.stderr)
            return EXIT_CONFIG
        return _fetch(args, args.out, lambda size: print(f"exported {size} entries to {args.out}"))
    config = _existing(_config(args))
    if config is None:
        return EXIT_CONFIG
    app = App(config)
    try:
        vkey = app.audit.signer.verifier.key_string()
        if args.out is not None:
            size = export_log(app.audit, args.out, actor_id="cli", actor_role="operator", cosign=app.cosign)
            print(f"exported {size} entries to {args.out}")
            print(f"verify with: auditlog verify {args.out} --key '{vkey}'")
            return 0
        try:
            manifest, manifest_version = export_to_s3(
                app.audit, _s3_client(args.s3_endpoint_url), args.s3_bucket, prefix=args.s3_prefix,
                retention_days=args.retention_days, actor_id="cli", actor_role="operator", cosign=app.cosign)
        except (ExportError, QuorumNotReached) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except BotoCoreError as exc:  # no credentials, an unreachable endpoint
            print(f"error: cannot write to s3://{args.s3_bucket}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    finally:
        app.close()
    where = f"s3://{args.s3_bucket}/{manifest['prefix']}"
    if args.manifest is not None:
        args.manifest.write_bytes(manifest_bytes(manifest))
    print(f"exported {manifest['tree_size']} entries to {where} (compliance lock until "
          f"{manifest['object_lock']['retain_until']})")
    print(f"manifest: {where}{MANIFEST_FILE} version {manifest_version}"
          + (f"; auditors' copy: {args.manifest}" if args.manifest is not None else ""))
    print(f"verify with: clipstore audit verify --s3-export {where}"
          + (f" --manifest {args.manifest}" if args.manifest is not None else "") + f" --key '{vkey}'")
    return 0


def _fetch(args: argparse.Namespace, out: Path, done: Callable[[int], None]) -> int:
    """Download a running server's log (as an auditor) into `out`; 0, or 2 if the server refused."""
    import grpc

    from clipstore.audit.export import fetch_export
    from clipstore.remote_cli import connect, refusal
    target = connect(args)
    with target.channel() as channel:
        try:
            done(fetch_export(channel, target.metadata, out))
        except grpc.RpcError as exc:
            print(f"ERROR server {target.server}: {refusal(exc)}", file=sys.stderr)
            return 2
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from auditlog.__main__ import verify_dir, witness_quorum
    from clipstore.audit.export import verify_s3_export
    args.quorum = witness_quorum(args.quorum, args.witness)
    if args.quorum > len(args.witness) or args.quorum < 0:
        print(f"--quorum {args.quorum}: give a number from 0 to the {len(args.witness)} --witness keys",
              file=sys.stderr)
        return EXIT_CONFIG
    if args.s3_export:
        try:
            manifest = json.loads(args.manifest.read_bytes()) if args.manifest is not None else None
        except (OSError, ValueError) as exc:
            print(f"ERROR cannot read --manifest {args.manifest}: {exc}", file=sys.stderr)
            return 2
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            code, line = verify_s3_export(_s3_client(args.s3_endpoint_url), args.s3_export, args.key,
                                          manifest=manifest, trusted=args.trusted_checkpoint, witnesses=args.witness,
                                          quorum=args.quorum)
        except ClientError as exc:  # no bucket, access denied, …: nothing was verified
            error = exc.response.get("Error", {})
            code, line = 2, (f"ERROR cannot read {args.s3_export}: {error.get('Code', 'error')}: "
                             f"{error.get('Message', '')}".rstrip(": "))
        except BotoCoreError as exc:  # no credentials, an unreachable endpoint
            code, line = 2, f"ERROR cannot read {args.s3_export}: {type(exc).__name__}: {exc}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if _fetch(args, Path(tmp), lambda size: None):
                return 2
            code, line = verify_dir(Path(tmp), args.key, args.trusted_checkpoint, witnesses=args.witness,
                                    quorum=args.quorum)
    print(line, file=sys.stderr if code == 2 else sys.stdout)
    return code


def _cmd_audit_peer_pseudonym(args: argparse.Namespace) -> int:
    """The pseudonym an `auth.deny_summary` entry of this deployment names ADDRESS by (`peer=pp_…`): needs
    the database and the root, as the server does; reads only (a wrong data dir gets no fresh key)."""
    from clipstore.app import private_data, root_provider
    from clipstore.peers import PEER_PSEUDONYM_KEY_NAME, PeerPseudonyms, canonical_address
    from clipstore.store import Database, migrations
    from clipstore.store.service_keys import load_service_key
    try:
        address = canonical_address(args.address)
    except ValueError as exc:
        print(f"error: {exc}; give e.g. 203.0.113.7, ipv4:203.0.113.7, 2001:db8::1 or ipv6:[2001:db8::1]",
              file=sys.stderr)
        return EXIT_CONFIG
    config = _existing(_config(args), root=True)  # root_provider would create a root key, SQLite a database
    if config is None:
        return EXIT_CONFIG
    url = config.effective_database_url
    private_data(config)
    root = root_provider(config)
    db = Database(url, upgrade=False)
    try:
        with db.read() as conn:
            revision = migrations.current(conn)
        key = load_service_key(db, root, PEER_PSEUDONYM_KEY_NAME) if revision is not None else None
    finally:
        db.close()
    if key is None:
        print("error: this database has no peer pseudonym key: no server of this release has started on it, so "
              "no entry names a peer pseudonym (check --data-dir, --database-url or --config)", file=sys.stderr)
        return 1
    print(f"peer={PeerPseudonyms(key).of(address)}")
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    from clipstore.app import App
    from clipstore.unit import OPERATOR
    config = _existing(_config(args))
    if config is None:
        return EXIT_CONFIG
    app = App(config)
    try:
        if args.dry_run:
            expired, shredded, orphans = app.clips.purge_plan()
            print(f"would purge {expired} expired clips and {shredded} clips of deleted accounts; would remove "
                  f"{orphans} orphan objects (dry run: nothing changed)")
            return 0
        purged = app.clips.purge_expired(OPERATOR)
        swept = app.clips.sweep_orphans()
    finally:
        app.close()
    print(f"purged {purged} expired clips; removed {swept} orphan objects")
    return 0


def _cmd_keys_migrate_root(args: argparse.Namespace) -> int:
    from clipstore.app import holds_keys, root_provider
    from clipstore.audit import AuditLog
    from clipstore.audit.signing import load_or_create_signer
    from clipstore.clock import SystemClock
    from clipstore.root_migration import EitherRoot, RootMigrationError, migrate_root
    from clipstore.store import Database
    from clipstore.unit import OPERATOR
    from kms import AwsKms, KmsError
    config = _existing(_config(args))
    if config is None:
        return EXIT_CONFIG
    if config.kms is not None:
        print("error: kms.key_id is already set; migrate-root moves a local root key to AWS KMS", file=sys.stderr)
        return 2
    # Not the whole App: after a run that stopped half-way the service keys may be wrapped by either root.
    db = Database(config.effective_database_url)
    try:
        old = root_provider(config, create=not holds_keys(db))  # never a new root.key for a database with keys
        new = AwsKms(args.to_kms_key_id, endpoint_url=args.kms_endpoint_url, region=args.kms_region)
        audit = AuditLog(db, load_or_create_signer(db, EitherRoot(old, new)), SystemClock(),
                         checkpoint_every_entries=config.audit_checkpoint_every_entries,
                         checkpoint_every_s=config.audit_checkpoint_every_s)
        try:
            report = migrate_root(db, old, new, audit, OPERATOR, dry_run=args.dry_run,
                                  progress=lambda line: print(line, file=sys.stderr))
        finally:
            audit.close()
    except (RootMigrationError, KmsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    done = "would be rewrapped" if args.dry_run else "rewrapped"
    for moved in report:
        print(f"{moved.kind}: {moved.moved} {done}, {moved.already} already under the KMS key")
    if args.dry_run:
        print("every key opens (dry run: nothing changed)")
    else:
        print(f"next: set kms.key_id = \"{args.to_kms_key_id}\" (CLIPSTORE_KMS_KEY_ID) and start the service; "
              "keep root.key offline until it serves, then destroy it")
    return 0


def _cmd_keys_retire(args: argparse.Namespace) -> int:
    from clipstore.app import App
    from clipstore.errors import ClipstoreError
    from clipstore.unit import OPERATOR
    config = _existing(_config(args))
    if config is None:
        return EXIT_CONFIG
    app = App(config)
    try:
        retired = app.accounts.retire_key_versions(args.account_id, args.below, OPERATOR, dry_run=args.dry_run)
    except (ClipstoreError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    finally:
        app.close()
    print(f"{'would retire' if args.dry_run else 'retired'} {retired} key versions below {args.below}"
          f"{' (dry run: nothing changed)' if args.dry_run else ''}")
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from clipstore.app import holds_keys, private_data, root_provider
    from clipstore.store import Database
    from clipstore.store.keys import SqlKekStore
    from clipstore.upgrade import finish_upgrade
    from kms import KeyRing
    config = _config(args)
    private_data(config)
    db = Database(config.effective_database_url)
    try:
        root = root_provider(config, create=not holds_keys(db))  # never a new root.key for a database with keys
        revision = finish_upgrade(db, root, KeyRing(root, SqlKekStore(db), now=time.time))
    finally:
        db.close()
    print(f"database at revision {revision} (head)")
    return 0


def _cmd_db_current(args: argparse.Namespace) -> int:
    from clipstore.app import private_data
    from clipstore.store import Database, migrations
    config = _existing(_config(args), schema=False)  # opening SQLite would create the database
    if config is None:
        return EXIT_CONFIG
    private_data(config)
    db = Database(config.effective_database_url, upgrade=False)
    try:
        with db.read() as conn:
            legacy, revision = migrations.legacy_version(conn), migrations.current(conn)
    finally:
        db.close()
    if legacy is not None:
        print(f"legacy schema_migrations version {legacy}: adopted at the next upgrade")
    elif revision is None:
        print("empty: no revision applied")
    else:
        print(f"{revision}{' (head)' if revision == migrations.HEAD else ' (upgrade pending)'}")
    return 0


def _cmd_db_history(args: argparse.Namespace) -> int:
    from clipstore.store import migrations
    for revision, description in migrations.history():
        print(f"{revision}  {description}")
    return 0


def _cmd_db_sql(args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from clipstore.store import migrations
    try:
        sql = migrations.offline_sql(start=args.start, destination=args.to)
    except CommandError as exc:  # an unknown revision, or --from after --to
        known = [revision for revision, _ in migrations.history()]
        print(f"error: {exc}; revisions are {known[0]} to {known[-1]} (clipstore db history)", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(sql)
    return 0


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: `--api-key csk_…` must not be taken for `--api-key-file` and turn a key into a
    path in an error message. (Subcommand parsers are of this class too.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clipstore", description="Encrypted voice-clip store")
    parser.add_argument("--version", action="version", version=f"clipstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server (embedded defaults with no config)")
    _add_config_flags(serve)
    for key in ("listen", "tls.cert_file", "tls.key_file", "tls.client_ca_file"):
        _setting_flag(serve, key)
    _setting_flag(serve, "log.level", choices=LOG_LEVELS)
    serve.add_argument("--print-config", action="store_true", help="print every setting, its value and where it "
                       "came from (default, file, env or flag; secrets redacted), then exit without serving")
    serve.set_defaults(func=_cmd_serve)

    certs = sub.add_parser("dev-certs", help="create a development CA, server and client certificates")
    certs.add_argument("--out", type=Path, required=True)
    certs.add_argument("--client", action="append", help="NAME:ROLE (repeatable; default one per role)")
    certs.add_argument("--trust-domain", default=BY_KEY["auth.trust_domain"].default,
                       help="of the clients' SPIFFE ids (auth.trust_domain)")
    certs.set_defaults(func=_cmd_dev_certs)

    principals = sub.add_parser("principals", help="principals of every role: create, list, disable, rotate keys")
    psub = principals.add_subparsers(dest="principals_command", required=True)
    create = psub.add_parser("create", help="create a principal and print its API key once: over the API with "
                                            "--server, else locally (the bootstrap of the first admin)")
    _add_config_flags(create)
    add_remote_flags(create)
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", required=True)
    create.add_argument("--spiffe-id", help="spiffe://<trust domain>/<role>/<name>: named by a client certificate, "
                                            "no API key")
    create.add_argument("--expires-at", help="ISO 8601 with a time zone (with --server)")
    create.set_defaults(func=_cmd_principals_create)
    add_principal_commands(psub)
    add_reviewer_commands(sub)
    add_forensics_commands(sub)

    keys = sub.add_parser("keys", help="account key versions")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    retire = ksub.add_parser("retire", help="set an account's minimum decryption version (after a rotation)")
    _add_config_flags(retire)
    retire.add_argument("--account-id", required=True)
    retire.add_argument("--below", type=int, required=True, help="retire every version below this one")
    retire.add_argument("--dry-run", action="store_true", help="check and count; change nothing")
    retire.set_defaults(func=_cmd_keys_retire)

    migrate = ksub.add_parser("migrate-root", help="rewrap every root-wrapped key under an AWS KMS key (service "
                              "stopped); resumable; then set kms.key_id", epilog="example: clipstore keys "
                              "migrate-root --to-kms-key-id alias/clipstore-root --kms-region eu-west-1")
    _add_config_flags(migrate)
    migrate.add_argument("--to-kms-key-id", required=True, help="the AWS KMS key (id, ARN or alias) to move to")
    migrate.add_argument("--kms-endpoint-url", help="a KMS-compatible endpoint (tests, local stacks)")
    migrate.add_argument("--kms-region")
    migrate.add_argument("--dry-run", action="store_true", help="check every key opens; change nothing")
    migrate.set_defaults(func=_cmd_keys_migrate_root)

    purge = sub.add_parser("purge", help="delete expired clips (object, row, wrapped key) and orphan objects")
    _add_config_flags(purge)
    purge.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    purge.set_defaults(func=_cmd_purge)

    db = sub.add_parser("db", help="metadata schema: upgrade, current revision, history, offline SQL")
    dsub = db.add_subparsers(dest="db_command", required=True)
    upgrade = dsub.add_parser("upgrade", help="upgrade to head, with the data steps that need the KMS "
                                              "(serve does this at start)")
    _add_config_flags(upgrade)
    upgrade.set_defaults(func=_cmd_db_upgrade)
    current = dsub.add_parser("current", help="the revision the database is at")
    _add_config_flags(current)
    current.set_defaults(func=_cmd_db_current)
    dsub.add_parser("history", help="every revision, oldest first").set_defaults(func=_cmd_db_history)
    sql = dsub.add_parser("sql", help="PostgreSQL DDL for a DBA to review and apply (no database needed)")
    sql.add_argument("--from", dest="start", help="revision the database is at (default: empty database)")
    sql.add_argument("--to", default="head", help="revision to reach (default: head)")
    sql.set_defaults(func=_cmd_db_sql)

    audit = sub.add_parser("audit", help="export or verify the audit log; a peer's pseudonym")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    export = asub.add_parser("export", help="write entries, a fresh checkpoint and the verifier key to a dir "
                                            "(from a running server with --server)")
    _add_config_flags(export)
    add_remote_flags(export)
    export.add_argument("--out", type=Path, help="directory to write")
    export.add_argument("--s3-bucket", help="Object Lock bucket for a WORM export (compliance mode)")
    export.add_argument("--s3-prefix", default="audit/")
    export.add_argument("--s3-endpoint-url", help="S3-compatible endpoint")
    export.add_argument("--retention-days", type=int, default=2555, help="Object Lock retention (default 7 years)")
    export.add_argument("--manifest", type=Path, help="with --s3-bucket: write the manifest (every object's version "
                                                      "id and SHA-256) here, to hand to auditors")
    export.set_defaults(func=_cmd_audit_export)
    pseudonym = asub.add_parser(
        "peer-pseudonym", help="print the pseudonym `auth.deny_summary` entries name ADDRESS by, to search the log "
        "for (needs the database and root key, as serve does)",
        epilog="example: clipstore audit peer-pseudonym 203.0.113.7 --data-dir /var/lib/clipstore "
               "(prints peer=pp_…; grep the export for it)")
    _add_config_flags(pseudonym)
    pseudonym.add_argument("address", help="IPv4 or IPv6 address, bare or as gRPC writes it (ipv4:203.0.113.7, "
                                           "ipv6:[2001:db8::1]); a port is ignored")
    pseudonym.set_defaults(func=_cmd_audit_peer_pseudonym)
    verify = asub.add_parser("verify", help="fetch a running server's log (or an S3 export) and verify it")
    add_remote_flags(verify)
    verify.add_argument("--s3-export", help="s3://BUCKET/PREFIX/SIZE/ written by audit export --s3-bucket")
    verify.add_argument("--s3-endpoint-url", help="S3-compatible endpoint")
    verify.add_argument("--key", required=True, help="verifier key string (obtained independently)")
    verify.add_argument("--trusted-checkpoint", type=Path, help="checkpoint saved earlier")
    verify.add_argument("--manifest", type=Path, help="with --s3-export: the manifest the export printed (else the "
                                                      "bucket's locked copy is used)")
    verify.add_argument("--witness", action="append", default=[], help="a witness's verifier key; repeatable")
    verify.add_argument("--quorum", type=int, default=None,
                        help="valid cosignatures required from the --witness keys (default: all of them)")
    verify.set_defaults(func=_cmd_audit_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:  # the database is down or unreachable
        from clipstore.dependencies import database_unreachable  # only here: it loads botocore
        print(database_unreachable(exc), file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
