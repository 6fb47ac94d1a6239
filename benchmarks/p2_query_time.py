"""P2 — time per new query at N = 20,000: Forward-INF vs gradient-based methods and peers.

One seeded problem: 20,000 rows of 64-feature Gaussian blobs (10 classes), an MLP
64→64→10 (tanh) trained by full-batch Adam; every method scores all N rows for one new
joint query (one test sample). Per method:
- **cold**: a fresh artifact store — the query pays for every fit (Forward-INF: the base
  losses L(θ̂, ·); influence: curvature/iHVP factors; TRAK: projected train features; ...);
- **warm**: the next new queries (different samples) with the store already filled —
  only query-dependent work remains (Forward-INF: K unlearning steps + one sweep).
Times are CPU seconds with one intra-op thread (wall seconds reported beside them).
The target (Forward-INF ≥ 30× faster per new query) is read on the **warm** figures for
both sides, i.e. every method keeps whatever it can cache between queries (the fair
comparison for a service); cold ratios are reported too.

Peers (captum, dattri, kronfluence, pyDVL, traker) run on the same model weights and tensors when
they import, each in its own process (8 GiB address-space cap, 30 min limit); each
library's own fit/attribute split defines its cold and warm.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import resource
import statistics
import tempfile
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import FitContext
from attribution.methods.forward_inf_params import ForwardInfParams
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from benchmarks.cli import Options, run_study
from benchmarks.report import Report
from benchmarks.speed_common import Clock, blobs, machine, torch_threads, trained_mlp

STUDY = "p2_query_time"
TARGET = 30.0
WARM_QUERIES = 20  # timed new queries per method after the cold one (median reported)
QUERIES = 1 + WARM_QUERIES  # the first on an empty cache (cold), then WARM_QUERIES new queries (warm)
PEER_MEMORY_BYTES = 8 * 2**30  # address-space cap of each peer's process
PEER_TIMEOUT_S = 1800
BATCH = 1024
_FORWARD_INF = ForwardInfParams().for_task("classification").resolved()  # the defaults our Forward-INF rows run with

# Raw scores (normalize "none") for the gradient methods: their relative denominators are a one-off
# per-row cost (for influence one iHVP solve per training row), not a per-query one. Forward-INF runs
# its defaults (relative, normalized SGD K = 1) and raw.
RAW = {"normalize": "none"}
OURS: list[tuple[str, str, dict[str, Any]]] = [
    ("forward_inf", "forward_inf", {}),
    ("forward_inf (raw)", "forward_inf", RAW),
    ("influence (cg)", "influence", {"ihvp": "cg", "damping": 0.01, **RAW}),
    ("influence (ekfac)", "influence", {"ihvp": "ekfac", "damping": 0.01, **RAW}),
    ("tracin", "tracin", RAW),
    ("trak", "trak", RAW),
    ("gradient_similarity", "gradient_similarity", {}),
]


@dataclass
class Problem:
    module: nn.Sequential
    x: torch.Tensor  # [N, 64]
    y: torch.Tensor  # [N]
    x_test: torch.Tensor  # [QUERIES, 64]
    y_test: torch.Tensor


@dataclass
class Timed:
    """CPU seconds (this process, all threads; one intra-op thread is used) and wall seconds."""

    cold: float
    warm: float
    cold_wall: float
    warm_wall: float
    note: str = ""


def problem(n: int) -> Problem:
    x, y = blobs(n + QUERIES, seed=2)
    module = trained_mlp(x, y, hidden=(64,), steps=200)
    return Problem(module, torch.from_numpy(x[:n]), torch.from_numpy(y[:n]),
                   torch.from_numpy(x[n:]), torch.from_numpy(y[n:]))


def time_ours(p: Problem, method: str, params: dict[str, Any]) -> Timed:
    """Cold = first query on an empty store; warm = the next new query."""
    adapter = ModelAdapter(p.module, ClassificationTask())
    train = TensorTrainingSet(p.x, p.y)
    context = FitContext(fingerprint=f"p2-{method}", store=InMemoryArtifacts())
    full = {"batch_size": BATCH, **params}
    seconds, walls = [], []
    for q in range(QUERIES):
        query = Batch(p.x_test[q:q + 1], p.y_test[q:q + 1])
        with Clock() as watch:
            scores = attribute(adapter, method, full, train, context, queries=query)
        if scores.shape != (1, len(p.y)) or not torch.isfinite(scores).all():
            raise RuntimeError(f"{method}: bad scores")
        seconds.append(watch.cpu)
        walls.append(watch.wall)
    return Timed(seconds[0], statistics.median(seconds[1:]), walls[0], statistics.median(walls[1:]))


# --------------------------------------------------------------------------- peers
def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = BATCH) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def peer_captum_tracin(p: Problem) -> Timed:
    from captum.influence import TracInCPFast

    model = copy.deepcopy(p.module)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "final.pt")
        torch.save(model.state_dict(), checkpoint)

        def load(m: nn.Module, path: str) -> float:
            m.load_state_dict(torch.load(path, weights_only=True))
            return 1.0  # learning rate weight

        seconds, walls = [], []
        for q in range(QUERIES):
            with Clock() as watch:
                tracin = TracInCPFast(model, model[-1], TensorDataset(p.x, p.y), [checkpoint],
                                      checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                                      batch_size=BATCH)
                scores = tracin.influence((p.x_test[q:q + 1], p.y_test[q:q + 1]))
            if scores.shape[-1] != len(p.y):
                raise RuntimeError("captum: unexpected shape")
            seconds.append(watch.cpu)
            walls.append(watch.wall)
    return Timed(seconds[0], statistics.median(seconds[1:]), walls[0], statistics.median(walls[1:]),
                 "TracInCPFast (last layer, final checkpoint); no fit step")


def _dattri_task(model: nn.Module) -> Any:
    from dattri.task import AttributionTask

    def loss(params: dict[str, torch.Tensor], pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, target = pair
        if inputs.dim() == 1:  # one row (vmapped per-sample gradients) vs a batch
            inputs, target = inputs.unsqueeze(0), target.unsqueeze(0)
        out = torch.func.functional_call(model, params, (inputs,))
        return nn.functional.cross_entropy(out, target)

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _dattri_timed(p: Problem, make: Callable[[Any], Any], note: str, cache: bool) -> Timed:
    model = copy.deepcopy(p.module)
    seconds, walls, attributor = [], [], None
    for q in range(QUERIES):
        with Clock() as watch:
            if attributor is None:
                attributor = make(_dattri_task(model))
                if cache:
                    attributor.cache(_loader(p.x, p.y))
            scores = attributor.attribute(_loader(p.x, p.y), _loader(p.x_test[q:q + 1], p.y_test[q:q + 1]))
        if scores.shape[0] != len(p.y):
            raise RuntimeError("dattri: unexpected shape")
        seconds.append(watch.cpu)
        walls.append(watch.wall)
    return Timed(seconds[0], statistics.median(seconds[1:]), walls[0], statistics.median(walls[1:]), note)


def peer_dattri_if_cg(p: Problem) -> Timed:
    from dattri.algorithm.influence_function import IFAttributorCG

    return _dattri_timed(p, lambda task: IFAttributorCG(task=task, device="cpu", max_iter=10, regularization=0.01),
                         "IFAttributorCG (max_iter 10, λ 0.01); cache() in cold", cache=True)


def peer_dattri_tracin(p: Problem) -> Timed:
    from dattri.algorithm.tracin import TracInAttributor

    return _dattri_timed(p, lambda task: TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False,
                                                          projector_kwargs=None, device="cpu"),
                         "TracInAttributor (final checkpoint, no projection)", cache=False)


def _pydvl_timed(p: Problem, make: Callable[[nn.Module], Any], note: str) -> Timed:
    model = copy.deepcopy(p.module)
    seconds, walls, fitted = [], [], None
    for q in range(QUERIES):
        with Clock() as watch:
            if fitted is None:
                fitted = make(model).fit(_loader(p.x, p.y))
            # One call against all N rows: one iHVP solve for the query, as pyDVL's docs use it.
            scores = fitted.influences(p.x_test[q:q + 1], p.y_test[q:q + 1], p.x, p.y, mode="up")
        if scores.shape[-1] != len(p.y):
            raise RuntimeError("pyDVL: unexpected shape")
        seconds.append(watch.cpu)
        walls.append(watch.wall)
    return Timed(seconds[0], statistics.median(seconds[1:]), walls[0], statistics.median(walls[1:]), note)


def peer_pydvl_cg(p: Problem) -> Timed:
    from pydvl.influence.torch import CgInfluence

    return _pydvl_timed(p, lambda m: CgInfluence(m, nn.functional.cross_entropy, regularization=0.01, maxiter=100),
                        "CgInfluence (λ 0.01, ≤ 100 iterations)")


def peer_pydvl_ekfac(p: Problem) -> Timed:
    from pydvl.influence.torch import EkfacInfluence

    return _pydvl_timed(p, lambda m: EkfacInfluence(m, hessian_regularization=0.01), "EkfacInfluence (λ 0.01)")


def peer_kronfluence_ekfac(p: Problem) -> Timed:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class CETask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(model(inputs), targets, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return self.compute_train_loss(batch, model)

    model = prepare_model(copy.deepcopy(p.module), CETask())
    train = TensorDataset(p.x, p.y)
    seconds, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="p2", model=model, task=CETask(), cpu=True, output_dir=tmp,
                            disable_tqdm=True)
        for q in range(QUERIES):
            with Clock() as watch:
                if q == 0:
                    analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=BATCH,
                                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
                analyzer.compute_pairwise_scores(
                    scores_name=f"q{q}", factors_name="ekfac", query_dataset=TensorDataset(p.x_test[q:q + 1], p.y_test[q:q + 1]),
                    train_dataset=train, per_device_query_batch_size=1, per_device_train_batch_size=BATCH,
                    score_args=ScoreArguments(damping_factor=0.01), overwrite_output_dir=True)
                scores = analyzer.load_pairwise_scores(f"q{q}")["all_modules"]
            if scores.shape[-1] != len(p.y):
                raise RuntimeError("kronfluence: unexpected shape")
            seconds.append(watch.cpu)
            walls.append(watch.wall)
    return Timed(seconds[0], statistics.median(seconds[1:]), walls[0], statistics.median(walls[1:]),
                 "EK-FAC factors in cold (fit_all_factors)")


def peer_traker(p: Problem) -> Timed:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = copy.deepcopy(p.module)
    grad_dim = sum(t.numel() for t in model.parameters())
    seconds, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for q in range(QUERIES):
            with Clock() as watch:
                if q == 0:
                    projector = BasicProjector(grad_dim=grad_dim, proj_dim=2048, seed=0,
                                               proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32)
                    traker = TRAKer(model=model, task="image_classification", train_set_size=len(p.y), save_dir=tmp,
                                    device="cpu", projector=projector, proj_dim=2048, use_half_precision=False)
                    traker.load_checkpoint(p.module.state_dict(), model_id=0)
                    for start in range(0, len(p.y), BATCH):
                        batch = (p.x[start: start + BATCH], p.y[start: start + BATCH])
                        traker.featurize(batch=batch, num_samples=len(batch[1]))
                    traker.finalize_features()
                traker.start_scoring_checkpoint(exp_name=f"q{q}", checkpoint=p.module.state_dict(), model_id=0,
                                                num_targets=1)
                traker.score(batch=(p.x_test[q:q + 1], p.y_test[q:q + 1]), num_samples=1)
                scores = traker.finalize_scores(exp_name=f"q{q}")
            if scores.shape[0] != len(p.y):
                raise RuntimeError("traker: unexpected shape")
            seconds.append(watch.cpu)
            walls.append(watch.wall)
    return Timed(seconds[0], statistics.median(seconds[1:]), walls[0], statistics.median(walls[1:]),
                 "TRAKer, CPU BasicProjector (proj_dim 2048), features in cold")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (PEER_MEMORY_BYTES, PEER_MEMORY_BYTES))
    torch.set_num_threads(1)


def isolated(run_peer: Callable[[Problem], Timed], p: Problem) -> Timed:
    """Run one peer in a fresh process with a memory cap (a peer's blow-up fails that peer only)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_limit_memory) as pool:
        return pool.submit(run_peer, p).result(timeout=PEER_TIMEOUT_S)


PEERS: list[tuple[str, str, Callable[[Problem], Timed]]] = [
    ("captum TracIn", "captum", peer_captum_tracin),
    ("dattri IF (CG)", "dattri", peer_dattri_if_cg),
    ("dattri TracIn", "dattri", peer_dattri_tracin),
    ("kronfluence EK-FAC", "kronfluence", peer_kronfluence_ekfac),
    ("pyDVL IF (CG)", "pydvl", peer_pydvl_cg),
    ("pyDVL EK-FAC", "pydvl", peer_pydvl_ekfac),
    ("traker TRAK", "trak", peer_traker),
]


def run(options: Options) -> Report:
    n = 1_000 if options.quick else 20_000
    report = Report(STUDY, "P2 — Time per new query vs gradient methods and peers", options.quick)
    load_at_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    p = problem(n)
    with torch_threads(1):
        ours = {label: time_ours(p, method, params) for label, method, params in OURS}
    peers: dict[str, Timed] = {}
    skipped: list[str] = []
    for label, package, run_peer in PEERS:
        if options.quick:
            skipped.append(f"{label}: not run in --quick mode")
            continue
        try:
            __import__(package)
        except Exception as exc:
            skipped.append(f"{label}: `{package}` does not import here ({exc.__class__.__name__}: {exc})")
            continue
        try:
            peers[label] = isolated(run_peer, p)
        except Exception as exc:
            last = traceback.format_exception_only(exc)[-1].strip()
            skipped.append(f"{label}: failed on this problem ({last[:200]})")

    fi = ours["forward_inf"]
    rows = []
    for label, timed in [*ours.items(), *peers.items()]:
        rows.append([label, f"{timed.cold:.3f}", f"{timed.warm:.3f}", f"{timed.cold_wall:.3f}", f"{timed.warm_wall:.3f}",
                     f"{timed.cold / fi.cold:.1f}×", f"{timed.warm / fi.warm:.1f}×",
                     timed.note or ("ours" if label in ours else "")])
    report.table("CPU seconds per new query (cold: empty cache; warm: artifacts cached), wall seconds beside",
                 ["method", "cold CPU s", "warm CPU s", "cold wall s", "warm wall s", "cold / Forward-INF cold",
                  "warm / Forward-INF warm", "note"], rows)
    gradient = {k: v for k, v in ours.items() if not k.startswith("forward_inf")}
    for label, timed in gradient.items():
        ratio = timed.warm / fi.warm
        report.figure(f"{label} warm ÷ Forward-INF warm", ratio, "30–40× (IF, TracIn)", "Forward-INF paper, Table 2",
                      f"≥ {TARGET:.0f}×", ratio >= TARGET)
    slowest_if = min(gradient["influence (cg)"].warm, gradient["influence (ekfac)"].warm, gradient["tracin"].warm)
    report.figure("IF/TracIn (fastest of them) warm ÷ Forward-INF warm", slowest_if / fi.warm, "30–40×",
                  "Forward-INF paper, Table 2", f"≥ {TARGET:.0f}×", slowest_if / fi.warm >= TARGET)
    for label, timed in peers.items():
        report.figure(f"{label} warm ÷ Forward-INF warm", timed.warm / fi.warm, "—", "this run")
    for label, timed in [*ours.items(), *peers.items()]:
        report.timing(f"{label} (warm)", timed.warm, "CPU seconds, new query, artifacts cached")
    report.setup = (
        f"{n:,} training rows (64-feature Gaussian blobs, 10 classes, in memory: `TensorTrainingSet` for ours, "
        f"`TensorDataset` for peers), MLP 64→64→10 (tanh, 4,810 parameters) trained by 200 full-batch Adam steps; "
        f"batch size {BATCH}; one new joint query = one test sample; cold = the first query on an empty artifact "
        f"store (includes every fit), warm = the next new query (another sample). Our methods run through "
        f"`attribution.pipeline.attribute` with default params except influence damping 0.01 (Forward-INF "
        f"defaults on a classifier: {_FORWARD_INF.chosen_optimizer} K={_FORWARD_INF.k}, α={_FORWARD_INF.alpha:g}, "
        f"normalize {_FORWARD_INF.normalize}; influence, TracIn and TRAK with normalize none). One intra-op thread everywhere; times are CPU seconds of the process (robust "
        f"when other jobs share the machine; wall seconds in the table). The target is read on the warm times of "
        f"IF and TracIn. Warm = median of {WARM_QUERIES} timed new queries per method (each a different test "
        f"sample). pyDVL is called once per query against all N rows, i.e. one iHVP solve per query. Machine: "
        f"{machine()}; load average at the start of the run {load_at_start}."
    )
    for line in skipped:
        report.note(line)
    report.note("Peer installs (checked with `pip install --dry-run` against torch 2.13.0+cpu): captum 0.9 and dattri 0.3 "
                "install without touching torch (the `bench` extra); kronfluence 1.0.1 requires torchvision, which "
                "pulls torch 2.15 + CUDA wheels, so it is installed with `--no-deps` (plus accelerate, einops, einconv, "
                "opt-einsum) into a scratch venv; pyDVL 0.10 declares numpy<2 (this env has numpy 2.4) and needs dask, "
                "distributed, zarr<3, pandas and cvxpy: `--no-deps` into the same scratch venv, where it imports and runs; "
                "traker 0.3.2 installs with `--no-deps` and runs on CPU with its BasicProjector.")
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
