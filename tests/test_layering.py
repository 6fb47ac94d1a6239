"""The dependency rule, enforced by reading every module's imports with `ast`.

`attribution/` (the core library) imports no web, queue, database or settings code and no
other package of this project (pydantic, its params and fit-argument models, is allowed;
pydantic-settings is settings code); `loading/` (user files → models, shards, batches; shared by the
API and the workers) imports neither the API nor the workers; `service/` (API, database, queue)
imports nothing from `workers/` (it reaches worker code only by import path, through
`service.queue`); `workers/` never imports `service.api`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = {"fastapi", "rq", "sqlalchemy", "redis", "service", "workers", "loading",
                     "pydantic_settings", "alembic", "starlette", "uvicorn", "psycopg"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (including inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_import_scanner_sees_nested_and_from_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom service import api\ndef f():\n    import redis.client\n")
    assert imported_modules(sample) == {"os", "service", "service.api", "redis.client"}


@pytest.mark.parametrize("path", python_files("attribution"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_library_imports_no_service_code(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN_IN_CORE)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", python_files("workers") or [None], ids=lambda p: str(p.relative_to(ROOT)) if p else "none")
def test_workers_never_import_the_api(path: Path | None) -> None:
    if path is None:
        pytest.skip("workers/ has no modules yet")
    bad = sorted(m for m in imported_modules(path) if m == "service.api" or m.startswith("service.api."))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", python_files("service"), ids=lambda p: str(p.relative_to(ROOT)))
def test_service_imports_nothing_from_the_workers(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] == "workers")
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _reads_a_parameter_by_name(path: Path) -> list[int]:
    """Lines where a `params` mapping is read by key (`params.get("x")`, `params["x"]`)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            target = node.func.value
        elif isinstance(node, ast.Subscript):
            target = node.value
        if target is not None and ast.unparse(target).split(".")[-1] == "params":
            lines.append(node.lineno)
    return lines


def test_the_parameter_reader_sees_get_and_subscripts(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("a = query.params.get('auto')\nb = params['unlearning']\nc = extras.get('x')\n")
    assert _reads_a_parameter_by_name(sample) == [1, 2]


@pytest.mark.parametrize("path", python_files("workers"), ids=lambda p: str(p.relative_to(ROOT)))
def test_workers_read_no_method_parameter_by_name(path: Path) -> None:
    """How a query may run is the method's call (`AttributionMethod` traits on typed params)."""
    lines = _reads_a_parameter_by_name(path)
    assert not lines, f"{path.relative_to(ROOT)} reads params by name on lines {lines}"


FORBIDDEN_IN_LOADING = {"workers", "fastapi", "starlette", "rq", "uvicorn"}


@pytest.mark.parametrize("path", python_files("loading"), ids=lambda p: str(p.relative_to(ROOT)))
def test_loading_imports_neither_the_api_nor_the_workers(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path)
                 if m.split(".")[0] in FORBIDDEN_IN_LOADING or m == "service.api" or m.startswith("service.api."))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


FORBIDDEN_IN_CLIENT = {"attribution", "loading", "service", "workers", "torch", "fastapi", "sqlalchemy", "rq", "redis"}


@pytest.mark.parametrize("path", python_files("attribution_client"), ids=lambda p: str(p.relative_to(ROOT)))
def test_client_imports_nothing_of_the_server(path: Path) -> None:
    """The client installs and runs without the service: only httpx, pydantic, numpy, tqdm, typer."""
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN_IN_CLIENT)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
