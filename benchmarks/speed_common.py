"""What the speed studies (P1–P6) share: synthetic data in real shards, small MLPs, a live
deployment of the service (API + RQ workers as subprocesses on loopback), latency statistics.

Data are Gaussian blobs (`blobs`: `x` `[N, F]` float32, `y` `[N]` int64, C classes), written
as `.npz` shards with string ids and read back through `loading.ShardedTrainingSet`,
exactly what a worker sweeps. Models are small tanh MLPs trained for a fixed number of
full-batch Adam steps on a seeded subset. `Deployment` runs `python -m service` and
`python -m workers` (`service.testing.ServiceProcesses`) on a bench Postgres database it
creates and a Redis database index (3–6; the test suite uses 15 and, under pytest-xdist,
15 − N), all on 127.0.0.1, and stops only the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from benchmarks.report import Report, machine_load
from service.testing import REPO_ROOT, ServiceProcesses

REPO = REPO_ROOT
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_BASE = "redis://127.0.0.1:6379"


# --------------------------------------------------------------------------- machine
def machine() -> str:
    """`"2 cores (<cpu model>), CPU only (device cpu)"` for the reports."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = f"GPU {torch.cuda.get_device_name(0)} available, not used" if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} cores ({model}), {gpu}; every figure measured on device cpu; "
            f"at the end of the run: {machine_load()} (other jobs shared the machine when it exceeds the cores)")


class Clock:
    """`with Clock() as c: ...` then `c.wall` and `c.cpu` (this process's CPU seconds, all threads)."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self.wall = self.cpu = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


# --------------------------------------------------------------------------- data and models
def blobs(n: int, *, features: int = 64, classes: int = 10, seed: int = 0, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows of a C-class Gaussian mixture (centres from `seed`): x `[n, F]` float32, y `[n]` int64."""
    centres = np.random.default_rng(1000).normal(scale=spread, size=(classes, features))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = (centres[y] + rng.normal(size=(n, features))).astype(np.float32)
    return x, y.astype(np.int64)


def mlp(features: int = 64, hidden: Sequence[int] = (64,), classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def trained_mlp(x: np.ndarray, y: np.ndarray, *, hidden: Sequence[int] = (64,), steps: int = 150,
                seed: int = 0, rows: int = 4096) -> nn.Sequential:
    """An MLP trained by `steps` full-batch Adam steps (lr 0.01) on the first `rows` rows; eval mode."""
    torch.manual_seed(seed)
    classes = int(y.max()) + 1
    model = mlp(x.shape[1], hidden, classes)
    inputs, targets = torch.from_numpy(x[:rows]), torch.from_numpy(y[:rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model.eval()


def write_shards(root: Path, x: np.ndarray, y: np.ndarray, rows_per_shard: int, *, prefix: str = "train") -> list[Path]:
    """Consecutive `.npz` shards (`x`, `y`, string `ids` "r<global index>") of `rows_per_shard` rows."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for position, start in enumerate(range(0, len(y), rows_per_shard)):
        stop = min(start + rows_per_shard, len(y))
        path = root / f"{prefix}-{position:04d}.npz"
        np.savez(path, x=x[start:stop], y=y[start:stop], ids=np.array([f"r{i}" for i in range(start, stop)]))
        paths.append(path)
    return paths


SERVICE_ARCHITECTURE = "benchmarks.speed_common:service_mlp"


def service_mlp() -> nn.Sequential:
    """The architecture the service studies register (`format: safetensors`, allowlisted entry point)."""
    return mlp(64, (64,), 10)


def save_safetensors(module: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def save_torchscript(module: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


# --------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def latency_row(name: str, seconds: Sequence[float]) -> list[str]:
    """`[name, count, p50 ms, p90 ms, p99 ms, max ms]` for a report table."""
    ms = [1000 * s for s in seconds]
    return [name, str(len(ms)), f"{percentile(ms, 50):.2f}", f"{percentile(ms, 90):.2f}",
            f"{percentile(ms, 99):.2f}", f"{max(ms):.2f}" if ms else "n/a"]


LATENCY_HEADER = ["requests", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"]

Repetitions = list[tuple[float, float]]  # (wall, CPU) seconds of each timed repetition (`Clock`)


def median_seconds(repetitions: Repetitions, *, cpu: bool = True) -> float:
    """The median CPU (or wall) seconds of the repetitions."""
    return statistics.median(cpu_s if cpu else wall_s for wall_s, cpu_s in repetitions)


def add_repetition_tables(report: Report, sides: dict[str, Repetitions], timings: dict[str, float]) -> None:
    """The two tables of the alternating-repetition studies (P1, P8): each repetition's wall / CPU
    seconds per side (`sides`: column name → repetitions), and the phase timings of the last call."""
    report.table("Repetitions (wall / CPU seconds)", ["repetition", *sides],
                 [[str(i + 1)] + [f"{w:.3f} / {c:.3f}" for w, c in row]
                  for i, row in enumerate(zip(*sides.values(), strict=True))])
    report.table("Forward-INF timings of the last call (seconds)", ["phase", "seconds"],
                 [[k, f"{v:.4f}"] for k, v in sorted(timings.items())])


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (`VmHWM`) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


# --------------------------------------------------------------------------- deployment
def fresh_database(name: str) -> str:
    """Drop and create Postgres database `name` on 127.0.0.1, migrate it; its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    from service.db.migrate import upgrade_head
    from service.settings import Settings

    if not name.startswith("attribution_bench"):
        raise ValueError("bench databases are named attribution_bench*")
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade_head(Settings(database_url=url))
    return url


def flush_redis(index: int) -> str:
    """Flush Redis database `index` (3–6 for the studies; ≥ 10 belong to the test suite's xdist workers)."""
    if not 1 <= index <= 9:
        raise ValueError("bench Redis databases are 1–9 (0 is the default one, 10–15 the test suite's)")
    from redis import Redis

    url = f"{REDIS_BASE}/{index}"
    client = Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


class Deployment(ServiceProcesses):
    """`service.testing.ServiceProcesses` on a fresh bench Postgres database and Redis index.

    `with Deployment(data_root, db="attribution_bench_p3", redis_db=3, workers=1) as d:`
    then `d.client` (an `httpx.Client` on the API), `d.register(...)`, `d.wait_final(...)`,
    `d.scores(...)`. The database is dropped, created and migrated and the Redis database
    flushed on entry. Logs go to `<data_root>/logs/`.
    """

    def __init__(self, data_root: Path, *, db: str, redis_db: int, workers: int = 1, api_processes: int = 1,
                 env: dict[str, str] | None = None, worker_threads: int | None = None) -> None:
        settings = {"DATA_ROOT": str(data_root), "DEVICE": "cpu", "ALLOWED_ARCHITECTURES": SERVICE_ARCHITECTURE, **(env or {})}
        super().__init__(settings, workers=workers, processes=api_processes, log_level="warning",
                         worker_threads=worker_threads)
        self.data_root, self.db, self.redis_db = data_root, db, redis_db

    def __enter__(self) -> Self:
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.env.update(DATABASE_URL=fresh_database(self.db), REDIS_URL=flush_redis(self.redis_db))
        return super().__enter__()

    # ----------------------------------------------------------------- API helpers
    def register(self, model_path: Path, shard_paths: Sequence[Path], task: str = "classification") -> tuple[str, str]:
        """Register a model file and a dataset of shards (files under the data root); their ids.

        `.safetensors` files are registered with the `service_mlp` architecture.
        """
        spec: dict[str, Any] = {"name": model_path.name, "uri": model_path.as_uri(), "task": task}
        if model_path.suffix == ".safetensors":
            spec.update(format="safetensors", architecture=SERVICE_ARCHITECTURE)
        model = self.client.post("/v1/models", json=spec)
        model.raise_for_status()
        dataset = self.client.post("/v1/datasets", json={"name": "train", "shards": [{"uri": p.as_uri()} for p in shard_paths]},
                                   timeout=600.0)
        dataset.raise_for_status()
        return model.json()["id"], dataset.json()["id"]

    def scores(self, query_id: str) -> np.ndarray:
        import io

        response = self.client.get(f"/v1/queries/{query_id}/scores", params={"format": "npy"})
        response.raise_for_status()
        return np.load(io.BytesIO(response.content), allow_pickle=False)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
