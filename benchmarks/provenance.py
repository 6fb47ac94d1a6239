"""Which code a report measured: the `code_sha` written into every report, and its check.

`code_sha(study)` hashes (SHA-256, first 16 hex digits) the source of the modules a study
measures: the study's own module, every `benchmarks` module it imports (followed through
their imports, read statically from the source), and the whole `attribution` package (the
library under measurement; the speed studies P* also the `service`, `workers` and `loading` packages). `Report.write` records it as a `code_sha: <hex>` line; a
report measured before the line existed, or by code that is no longer there, carries
`code_sha: stale (<why>)` instead. `tests/test_reports_current.py` fails when a report's
sha differs from the current code's, and when the README quotes a figure no report holds.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
LIBRARY = ROOT / "attribution"
SERVICE = (ROOT / "service", ROOT / "workers", ROOT / "loading")  # also measured by the speed studies (P*)
STALE = "stale"
_SHA_LINE = re.compile(r"^code_sha: `?([0-9a-f]{16}|stale)`?", re.MULTILINE)


def _benchmark_imports(path: Path) -> set[str]:
    """Names of `benchmarks.<name>` modules imported by the file at `path`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                   [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        names |= {m.split(".")[1] for m in modules if m.startswith("benchmarks.") and m.count(".") == 1}
    return names


def measured_files(study: str) -> list[Path]:
    """The study module, the benchmarks modules it reaches, and every `attribution` source file."""
    seen: set[str] = set()
    todo = [study]
    while todo:
        name = todo.pop()
        if name in seen or not (BENCHMARKS / f"{name}.py").exists():
            continue
        seen.add(name)
        todo += sorted(_benchmark_imports(BENCHMARKS / f"{name}.py"))
    packages = (LIBRARY, *SERVICE) if study.startswith("p") else (LIBRARY,)
    return [BENCHMARKS / f"{n}.py" for n in sorted(seen)] + sorted(f for p in packages for f in p.rglob("*.py"))


def code_sha(study: str) -> str:
    digest = hashlib.sha256()
    for path in measured_files(study):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def recorded_sha(report_text: str) -> str | None:
    """The `code_sha` a report records (a hex digest or "stale"), None when it has none."""
    match = _SHA_LINE.search(report_text)
    return match.group(1) if match else None
