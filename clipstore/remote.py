"""How the CLI reaches a remote clipstore: one channel from flags, credentials never on the command line.

The CLI's admin and audit commands need no database and no KMS: they call the
API like any client. TLS is on when a CA file is given (or `--tls` for the
system roots); a client certificate and key make it mTLS. The API key comes
from `$CLIPSTORE_API_KEY` or `--api-key-file` (readable by its owner only),
never from argv, where `ps` and shell history would show it. Under mTLS the
certificate names the caller and no key is needed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from clipstore.auth import API_KEY_PREFIX
from clipstore.config import ConfigError, default

API_KEY_ENV = "CLIPSTORE_API_KEY"
SERVER_ENV = "CLIPSTORE_SERVER"
MAX_KEY_FILE_BYTES = 4096  # a key is ~50 bytes; anything much larger is the wrong file


@dataclass(frozen=True, kw_only=True)
class Remote:
    server: str
    channel_credentials: grpc.ChannelCredentials | None  # None: plaintext (loopback development servers)
    metadata: tuple[tuple[str, str], ...]
    server_name: str | None = None

    def channel(self) -> grpc.Channel:
        if self.channel_credentials is None:
            return grpc.insecure_channel(self.server)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(self.server, self.channel_credentials, options=options)


def add_remote_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server", f"the API key comes from ${API_KEY_ENV} or --api-key-file, "
                                                "never from the command line")
    group.add_argument("--server", default=None, help=f"HOST:PORT (or ${SERVER_ENV}; default {default('listen')})")
    group.add_argument("--ca-file", type=Path, help="CA (PEM) to verify the server with; enables TLS")
    group.add_argument("--tls", action="store_true", help="TLS with the system's root CAs")
    group.add_argument("--client-cert", type=Path, help="client certificate (PEM) for mTLS")
    group.add_argument("--client-key", type=Path, help="client private key (PEM) for mTLS")
    group.add_argument("--server-name", help="name to verify in the server certificate, if not HOST")
    group.add_argument("--api-key-file", type=Path, help="file holding the API key (mode 0600)")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path}: {exc.strerror}") from None


def _api_key(args: argparse.Namespace, env: os._Environ[str] | dict[str, str]) -> str | None:
    if args.api_key_file is not None:
        try:
            st = args.api_key_file.stat()
        except OSError as exc:
            raise ConfigError("api-key-file", f"cannot read {args.api_key_file}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            raise ConfigError("api-key-file", f"{args.api_key_file} is readable by others (mode "
                                              f"{st.st_mode & 0o777:o}); run: chmod 600 {args.api_key_file}")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError("api-key-file", f"{args.api_key_file} is {st.st_size} bytes; it should hold one key")
        key = _read(args.api_key_file, "api-key-file").decode().strip()
    else:
        key = env.get(API_KEY_ENV, "").strip()
        if not key:
            return None
    if not key.startswith(API_KEY_PREFIX):
        raise ConfigError("api-key", f"an API key starts with {API_KEY_PREFIX!r}")
    return key


def remote(args: argparse.Namespace, env: os._Environ[str] | dict[str, str] | None = None, *,
           credentials: bool = True) -> Remote:
    """The server, credentials and metadata the flags and environment name; `ConfigError` if inconsistent
    (or, with `credentials`, if they name no credential at all)."""
    env = os.environ if env is None else env
    if (args.client_cert is None) != (args.client_key is None):
        raise ConfigError("client-cert", "give both --client-cert and --client-key, or neither")
    tls = args.tls or args.ca_file is not None or args.client_cert is not None
    channel_credentials = None
    if tls:
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(args.ca_file, "ca-file") if args.ca_file else None,
            private_key=_read(args.client_key, "client-key") if args.client_key else None,
            certificate_chain=_read(args.client_cert, "client-cert") if args.client_cert else None)
    key = _api_key(args, env)
    if credentials and key is None and args.client_cert is None:
        raise ConfigError("api-key", f"no credentials: set ${API_KEY_ENV}, give --api-key-file, or use "
                                     "--client-cert/--client-key (mTLS)")
    return Remote(server=args.server or env.get(SERVER_ENV) or default("listen"),
                  channel_credentials=channel_credentials,
                  metadata=(("authorization", f"Bearer {key}"),) if key else (), server_name=args.server_name)
