"""The CI contracts (.ci/run) catch what they promise to: one injected violation each, on a copy of the tree."""

from __future__ import annotations

import importlib.util
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for package in ("clipstore", "kms", "auditlog"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tests").mkdir()
    for name in ("__init__.py", "import_contracts.py"):
        shutil.copy(REPO / "tests" / name, root / "tests" / name)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + "\n" + text + "\n")


def test_each_import_contract_is_kept_and_one_injected_violation_breaks_each(tmp_path: Path) -> None:
    contracts = {c["id"]: c["name"] for c in CONFIG["tool"]["importlinter"]["contracts"]}
    assert set(contracts) == {"auditlog-standalone", "domain-without-grpc", "domain-without-sql",
                              "store-without-servicers"}
    root = _copy_tree(tmp_path)
    kept = subprocess.run([BIN / "lint-imports", "--no-cache"], cwd=root, capture_output=True, text=True)
    assert kept.returncode == 0, kept.stdout[-3000:]
    _append(root / "auditlog" / "merkle.py", "import boto3  # injected: auditlog must stay stdlib + cryptography")
    _append(root / "clipstore" / "sampling.py", "import grpc  # injected")
    _append(root / "clipstore" / "grants.py", "import sqlalchemy  # injected")
    _append(root / "clipstore" / "store" / "keys.py", "from clipstore.servicers import common  # injected")
    broken = subprocess.run([BIN / "lint-imports", "--no-cache"], cwd=root, capture_output=True, text=True)
    assert broken.returncode != 0
    for name in contracts.values():
        assert f"{name} BROKEN" in broken.stdout, name
    for injected in ("auditlog.merkle imports boto3", "clipstore.sampling -> grpc", "clipstore.grants -> sqlalchemy",
                     "clipstore.store.keys -> clipstore.servicers.common"):
        assert injected in broken.stdout, injected


def _domain_modules() -> list[str]:
    """Every module under the domain-without-sql contract's sources, packages expanded."""
    contract = next(c for c in CONFIG["tool"]["importlinter"]["contracts"] if c["id"] == "domain-without-sql")
    names = []
    for name in contract["source_modules"]:
        names.append(name)
        spec = importlib.util.find_spec(name)
        assert spec is not None, name
        if spec.submodule_search_locations:
            names += [m.name for m in pkgutil.walk_packages(spec.submodule_search_locations, prefix=name + ".")]
    return names


def test_each_domain_module_loads_neither_sql_nor_grpc_at_runtime() -> None:
    """What lint-imports sees statically, in a fresh interpreter: importing a submodule also runs its
    packages' __init__, and a lazy import inside a module body counts too."""
    probe = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
             "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'grpc') "
             "or m.startswith(('clipstore.store', 'clipstore.audit', 'clipstore.servicers')))))")
    modules = _domain_modules()
    assert "clipstore.review.sessions" in modules and "clipstore.unit" in modules
    runs = {name: subprocess.Popen([sys.executable, "-c", probe, name], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for name in modules}
    loaded = {}
    for name, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, (name, err[-2000:])
        if out.strip():
            loaded[name] = out.split()
    assert loaded == {}


def test_mypy_strict_config_rejects_an_injected_type_error(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    _append(root / "auditlog" / "merkle.py", 'def _injected() -> int:\n    return "not an int"')
    result = subprocess.run([BIN / "mypy", "--no-incremental", "-p", "auditlog"], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stdout
    assert 'merkle.py' in result.stdout and "Incompatible return value type" in result.stdout


def test_coverage_below_the_floor_fails_the_run(tmp_path: Path) -> None:
    floor = CONFIG["tool"]["coverage"]["report"]["fail_under"]
    assert CONFIG["tool"]["coverage"]["run"]["branch"] is True
    (tmp_path / "pyproject.toml").write_text(f"[tool.coverage.run]\nbranch = true\n\n"
                                             f"[tool.coverage.report]\nfail_under = {floor}\n")
    (tmp_path / "third.py").write_text(  # about a third of it runs: far below any floor we would set
        "def used(x):\n    return x + 1\n\n\ndef unused(x):\n    for _ in range(3):\n        x += 1\n"
        "    if x > 10:\n        x = 0\n    return x - 1\n")
    (tmp_path / "test_third.py").write_text("import third\n\n\ndef test_used():\n    assert third.used(1) == 2\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--cov=third",
                             "test_third.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"Required test coverage of {float(floor)}% not reached" in result.stdout
