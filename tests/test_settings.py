"""The settings registry: one definition per setting, from which parsing, the README table and
`clipstore serve --print-config` come."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from clipstore import config as cfg
from clipstore.config import BY_KEY, SETTINGS, Config, ConfigError, load, load_config, unknown_env

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-not-for-logs"


def test_readme_settings_table_is_generated_from_the_registry() -> None:
    assert cfg.settings_table_markdown() in (REPO / "README.md").read_text(), \
        "README settings table is stale: run python -m clipstore.config README.md"


def test_every_setting_has_help_and_its_own_key_variable_and_flag() -> None:
    assert all(s.help.strip() and "|" not in s.help for s in SETTINGS)
    for name, values in {"key": [s.key for s in SETTINGS], "env": [s.env for s in SETTINGS],
                         "flag": [s.flag for s in SETTINGS if s.flag]}.items():
        assert len(values) == len(set(values)), f"a {name} is used twice: {sorted(values)}"
    assert all(s.env.startswith("CLIPSTORE_") for s in SETTINGS)


def _fields(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def test_each_config_field_is_one_setting_of_the_same_type() -> None:
    """Config holds no setting of its own and no setting is lost on the way into it."""
    expected = {name: hint for name, hint in _fields(Config).items()
                if name not in {section for section, _, _ in cfg.SECTIONS.values()}}
    for section, cls, _ in cfg.SECTIONS.values():
        expected.update({f"{section}.{name}": hint for name, hint in _fields(cls).items()})
    assert sorted(cfg.attribute(s) for s in SETTINGS) == sorted(expected)
    assert not any(f.default is not dataclasses.MISSING for cls in (Config, *[c for _, c, _ in cfg.SECTIONS.values()])
                   for f in dataclasses.fields(cls)), "a default belongs in SETTINGS, not in the dataclass"
    config = load_config(env={"CLIPSTORE_S3_BUCKET": "b", "CLIPSTORE_KMS_KEY_ID": "k",
                              "CLIPSTORE_TLS_CERT_FILE": "c", "CLIPSTORE_TLS_KEY_FILE": "k"})
    for s in SETTINGS:
        value = cfg.value_of(config, s)
        if value is not None and s.key != "audit.witnesses":
            assert isinstance(value, s.type), (s.key, value)


def test_every_default_is_a_value_its_check_accepts() -> None:
    for s in SETTINGS:
        if isinstance(s.default, s.type):
            assert cfg._parse(s, s.default) == s.default, s.key


@pytest.mark.parametrize("word", ["password", "token", "secret", "credential", "api_key", "private"])
def test_a_setting_named_like_a_secret_is_marked_secret(word: str) -> None:
    assert all(s.secret for s in SETTINGS if word in s.key), f"mark secret=True: {word} settings are never printed"


def test_sources_rank_default_file_env_flag(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('listen = "127.0.0.1:1"\nshutdown_grace_s = 3\n[review]\nsample_rate = 0\ndaily_cap = 7\n')
    loaded = load(config_file=toml, env={"CLIPSTORE_LISTEN": "127.0.0.1:2", "CLIPSTORE_REVIEW_DAILY_CAP": "8"},
                  overrides={"listen": "127.0.0.1:3", "data_dir": None})
    assert loaded.config.listen == "127.0.0.1:3" and loaded.sources["listen"] == "flag"
    assert loaded.config.review_daily_cap == 8
    assert loaded.sources["review.daily_cap"] == "env CLIPSTORE_REVIEW_DAILY_CAP"
    assert loaded.config.shutdown_grace_s == 3.0 and loaded.sources["shutdown_grace_s"] == f"file {toml}"
    assert loaded.config.review_sample_rate == 0 and "data_dir" not in loaded.sources


def _serve_print_config(tmp_path: Path, toml: str, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    config_file = tmp_path / "clipstore.toml"
    config_file.write_text(toml)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPSTORE_", "XDG_"))}
    return subprocess.run([sys.executable, "-m", "clipstore", "serve", "--config", str(config_file),
                           "--print-config", *flags], env={**clean, "HOME": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=60)


def test_print_config_shows_every_setting_and_its_source_without_a_secret_and_exits_0(tmp_path: Path) -> None:
    result = _serve_print_config(
        tmp_path,
        f'database_url = "postgresql://clipstore:{PASSWORD}@db.internal/clipstore?sslpassword={PASSWORD}"\n'
        '[review]\nsample_rate = 0\n',
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
        CLIPSTORE_S3_BUCKET="clips", CLIPSTORE_S3_ENDPOINT_URL=f"http://minio:{PASSWORD}@127.0.0.1:9000",
        CLIPSTORE_AUDIT_WITNESSES=f"https://w:{PASSWORD}@w1.example w1.example+1a2b3c4d+BA")
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert not (tmp_path / "d").exists(), "--print-config must not start (or prepare) the server"
    lines = {line.lstrip("# ").split(" = ")[0]: line for line in result.stdout.splitlines()[1:]}
    assert list(lines) == [s.key for s in SETTINGS]
    assert lines["review.sample_rate"].endswith(f"= 0.0  # file {tmp_path / 'clipstore.toml'}")
    assert lines["database_url"].startswith('database_url = "postgresql://clipstore:<redacted>@db.internal/')
    assert lines["s3.endpoint_url"] == ('s3.endpoint_url = "http://minio:<redacted>@127.0.0.1:9000"  '
                                        '# env CLIPSTORE_S3_ENDPOINT_URL')
    assert lines["listen"] == 'listen = "127.0.0.1:0"  # flag'
    assert lines["review.daily_cap"] == "review.daily_cap = 1000  # default"
    assert lines["kms.key_id"] == "# kms.key_id = (unset)  # default"
    assert tomllib.loads(result.stdout)["review"]["sample_rate"] == 0  # the output is TOML


def test_print_config_refuses_a_bad_setting_like_serve(tmp_path: Path) -> None:
    result = _serve_print_config(tmp_path, "[review]\ngrant_ttl_s = 301\n")
    assert result.returncode == 2 and "review.grant_ttl_s: grants live at most 300 s, got 301" in result.stderr


@pytest.mark.parametrize(("toml", "problem"), [
    ('listen = "0.0.0.0:50051"\n', "listen: 0.0.0.0:50051 is not a loopback address and TLS is not configured"),
    ('[audit]\ntiles = "/srv/tiles"\ntiles_retain_days = 2555\n', "audit.tiles_retain_days: is S3 Object Lock"),
    ("[audit]\ntiles_retain_days = 2555\n", "audit.tiles_retain_days: is S3 Object Lock"),
])
def test_print_config_refuses_what_serve_refuses(tmp_path: Path, toml: str, problem: str) -> None:
    """A public listen address without TLS passed --print-config (exit 0) though serve refuses it; a retention
    for tiles that are not on S3 was silently ignored, leaving the operator believing them locked."""
    result = _serve_print_config(tmp_path, toml)
    assert result.returncode == 2 and problem in result.stderr, result.stderr


def test_a_clipstore_variable_that_names_no_setting_is_said_not_silently_ignored(tmp_path: Path) -> None:
    """CLIPSTORE_S3_BUKET=clips used to leave the file blob store in force without a word."""
    result = _serve_print_config(tmp_path, "", CLIPSTORE_S3_BUKET=f"clips-{PASSWORD}", CLIPSTORE_API_KEY="csk_x")
    assert result.returncode == 0 and "s3.bucket" in result.stdout
    [warning] = [json.loads(line) for line in result.stderr.splitlines()]
    assert {k: warning[k] for k in ("event", "variable", "did_you_mean", "ignored")} == {
        "event": "config.unknown_env", "variable": "CLIPSTORE_S3_BUKET", "did_you_mean": "CLIPSTORE_S3_BUCKET",
        "ignored": True}
    assert PASSWORD not in result.stderr  # the name, never the value
    assert unknown_env({"CLIPSTORE_CONFIG": "x", "CLIPSTORE_SERVER": "x", "CLIPSTORE_LISTEN": "x", "HOME": "x",
                        "CLIPSTORE_ENROLMENT_CODE": "x", "CLIPSTORE_TEST_PG": "x"}) == []


def test_a_secret_setting_is_never_printed_nor_quoted_in_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = dataclasses.replace(BY_KEY["database_url"], secret=True)
    monkeypatch.setattr(cfg, "SETTINGS", tuple(secret if s.key == secret.key else s for s in SETTINGS))
    monkeypatch.setitem(cfg.BY_KEY, secret.key, secret)
    text = cfg.describe(load(env={"CLIPSTORE_DATABASE_URL": f"postgresql://db/{PASSWORD}"}))
    assert PASSWORD not in text and 'database_url = "<redacted>"  # env CLIPSTORE_DATABASE_URL' in text
    with pytest.raises(ConfigError) as caught:
        load(env={"CLIPSTORE_DATABASE_URL": f"mysql://{PASSWORD}"})
    assert PASSWORD not in str(caught.value)


def test_review_sample_rate_0_is_accepted_from_file_env_and_flag(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[review]\nsample_rate = 0\n")
    assert load_config(config_file=toml, env={}).review_sample_rate == 0
    assert load_config(env={"CLIPSTORE_REVIEW_SAMPLE_RATE": "0"}).review_sample_rate == 0
    assert load_config(env={}, overrides={"review.sample_rate": 0}).review_sample_rate == 0
    with pytest.raises(ConfigError, match="review.daily_cap: must be positive"):
        load_config(env={"CLIPSTORE_REVIEW_DAILY_CAP": "0"})


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="review.sample_ratio: unknown setting"):
        load_config(env={}, overrides={"review.sample_ratio": 0.1})


@pytest.mark.parametrize("variable", ["CLIPSTORE_LISTEN", "CLIPSTORE_METRICS_LISTEN"])
@pytest.mark.parametrize("port", ["²", "١٢", "１２", "+1", " 1", "65536", "123456"])
def test_a_port_is_ascii_digits_within_range(variable: str, port: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"must be HOST:PORT, got '127.0.0.1:{port}'")):
        load_config(env={variable: f"127.0.0.1:{port}"})
