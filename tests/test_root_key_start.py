"""The local root key file missing or replaced at start: `clipstore serve` stops with one line naming the
file and the fix, and creates nothing. Before, a missing file was silently replaced by a new root key
(which opens none of the database's keys) and the start died on an uncaught KmsDecryptError."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from clipstore.app import App
from tests.conftest import make_config

REPO = Path(__file__).parent.parent


def _serve(data: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSTORE_")}
    env.update({"CLIPSTORE_DATA_DIR": str(data), "CLIPSTORE_LISTEN": "127.0.0.1:0"})
    return subprocess.run([sys.executable, "-m", "clipstore", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_a_missing_or_foreign_root_key_file_stops_the_start_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    App(make_config(data)).close()  # a database with its keys, wrapped by root.key
    key_file = data / "root.key"
    original = key_file.read_bytes()

    key_file.unlink()
    missing = _serve(data)
    assert missing.returncode == 2, missing.stderr
    assert "root.key is missing but the database holds keys" in missing.stderr
    assert not key_file.exists()  # no new root key made in its place

    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_bytes(32))
    os.close(fd)
    foreign = _serve(data)
    assert foreign.returncode == 2, foreign.stderr
    assert "does not open this database's keys" in foreign.stderr
    assert "uncaught_exception" not in foreign.stderr

    key_file.write_bytes(original)  # the right file back: the service starts
    App(make_config(data)).close()


def test_db_upgrade_never_makes_a_new_root_key_for_a_database_that_holds_keys(tmp_path: Path) -> None:
    """Before, `clipstore db upgrade` with root.key missing made a new one and answered OK: the service
    then could open none of its keys."""
    data = tmp_path / "data"
    App(make_config(data)).close()
    (data / "root.key").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSTORE_")}
    env["CLIPSTORE_DATA_DIR"] = str(data)
    upgrade = subprocess.run([sys.executable, "-m", "clipstore", "db", "upgrade"], env=env, capture_output=True,
                             text=True, timeout=60, cwd=REPO)
    assert upgrade.returncode == 2, upgrade.stderr
    assert "root.key is missing but the database holds keys" in upgrade.stderr
    assert not (data / "root.key").exists()
