"""Peer libraries as study entries: captum, dattri, kronfluence, traker, pyDVL on our tensors.

Each `Peer` scores the same trained module, checkpoints and training rows as our methods:
`scores(problem, config, x_q, y_q)` → `[Q, N]`, `self_influence(problem, config)` → `[N]`,
both with the library's own sign made "higher = the row supports the query" (every library
here already computes ⟨∇L_q, M ∇L_i⟩ with M positive semi-definite, so no flip is needed).
`default` is the library's own default configuration (only what it requires is filled in:
a summed cross-entropy loss, the checkpoints' learning rates, CPU); `grid` holds
`fair.BUDGET` configurations the fair protocol chooses among on validation points.
A peer that does not define a quantity says why in one line (`cannot`).
The peers import lazily: `available(peer)` says whether this interpreter has the package
(they are installed from the `bench` extra or a scratch venv, benchmarks/README.md).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

Config = dict[str, Any]
BATCH = 256


@dataclass
class PeerProblem:
    """A trained classifier: `module` (final model), `checkpoints` with their learning rates
    (TracIn; the last one is the final model), training rows `x` `[N, ...]`, `y` `[N]`."""

    module: nn.Module
    checkpoints: list[nn.Module]
    lrs: list[float]
    x: Tensor
    y: Tensor
    cache: dict[str, Any] = field(default_factory=dict)  # fitted peer state shared across configs

    def loader(self, x: Tensor | None = None, y: Tensor | None = None) -> DataLoader:
        xs, ys = (self.x, self.y) if x is None or y is None else (x, y)
        return DataLoader(TensorDataset(xs, ys), batch_size=BATCH, shuffle=False)

    def chosen_checkpoints(self, which: str) -> tuple[list[nn.Module], list[float]]:
        """"all" checkpoints, or the "final" model alone (with its learning rate)."""
        if which == "final":
            return [self.module], [self.lrs[-1] if self.lrs else 1.0]
        return self.checkpoints, self.lrs


Scores = Callable[[PeerProblem, Config, Tensor, Tensor], Tensor]
SelfInfluence = Callable[[PeerProblem, Config], Tensor]


@dataclass(frozen=True)
class Peer:
    label: str
    package: str
    default: Config
    grid: tuple[Config, ...]
    scores: Scores | None
    self_influence: SelfInfluence | None
    cannot: str = ""  # why a missing quantity is not run, one line


def available(peer: Peer) -> str:
    """"" when the peer's package imports here, else the reason."""
    try:
        __import__(peer.package)
    except Exception as exc:
        return f"`{peer.package}` does not import here ({exc.__class__.__name__}: {exc})"
    return ""


def _last_linear(module: nn.Module) -> str:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)][-1]


# --------------------------------------------------------------------------- captum
@contextmanager
def _captum_tracin(p: PeerProblem, config: Config) -> Iterator[Any]:
    from captum.influence import TracInCP

    modules, lrs = p.chosen_checkpoints(config["checkpoints"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, (m, lr) in enumerate(zip(modules, lrs, strict=True)):
            paths.append(str(Path(tmp) / f"c{k}.pt"))
            torch.save({"state": m.state_dict(), "lr": lr}, paths[-1])

        def load(model: nn.Module, path: str) -> float:
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["state"])
            return float(saved["lr"])

        layers = [_last_linear(p.module)] if config["layers"] == "last" else None
        yield TracInCP(copy.deepcopy(p.module), TensorDataset(p.x, p.y), paths, checkpoints_load_func=load,
                       layers=layers, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=BATCH)


def captum_scores(p: PeerProblem, config: Config, x: Tensor, y: Tensor) -> Tensor:
    with _captum_tracin(p, config) as tracin:
        return tracin.influence((x, y)).detach().float()


def captum_self(p: PeerProblem, config: Config) -> Tensor:
    with _captum_tracin(p, config) as tracin:
        return tracin.self_influence(None).detach().float().reshape(-1)


# --------------------------------------------------------------------------- dattri
def _dattri_tracin(p: PeerProblem, config: Config) -> Any:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(p.module)

    def loss(params: dict[str, Tensor], pair: tuple[Tensor, Tensor]) -> Tensor:
        inputs, target = pair
        if inputs.dim() == 1:  # one row (vmapped per-sample gradients)
            inputs, target = inputs.unsqueeze(0), target.unsqueeze(0)
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (inputs,)), target)

    modules, lrs = p.chosen_checkpoints(config["checkpoints"])
    task = AttributionTask(loss_func=loss, model=model, checkpoints=[m.state_dict() for m in modules])
    return TracInAttributor(task=task, weight_list=torch.tensor(lrs), normalized_grad=config["normalized_grad"],
                            device="cpu")


def dattri_scores(p: PeerProblem, config: Config, x: Tensor, y: Tensor) -> Tensor:
    return _dattri_tracin(p, config).attribute(p.loader(), p.loader(x, y)).T.detach().float()


def dattri_self(p: PeerProblem, config: Config) -> Tensor:
    return _dattri_tracin(p, config).self_attribute(p.loader()).detach().float().reshape(-1)


# --------------------------------------------------------------------------- kronfluence
def _kronfluence(p: PeerProblem) -> tuple[Any, str]:
    """The analyzer with EK-FAC factors fitted once per problem (they do not depend on damping)."""
    if "kronfluence" in p.cache:
        return p.cache["kronfluence"]
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class SummedCrossEntropy(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(model(inputs), targets, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return self.compute_train_loss(batch, model)

    tmp = tempfile.mkdtemp(prefix="kronfluence-")
    model = prepare_model(copy.deepcopy(p.module), SummedCrossEntropy())
    analyzer = Analyzer(analysis_name="fair", model=model, task=SummedCrossEntropy(), cpu=True, output_dir=tmp,
                        disable_tqdm=True, disable_model_save=True)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=TensorDataset(p.x, p.y), per_device_batch_size=BATCH,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    p.cache["kronfluence"] = (analyzer, tmp)
    return analyzer, tmp


def _score_args(config: Config) -> Any:
    from kronfluence.arguments import ScoreArguments

    return ScoreArguments(damping_factor=config["damping_factor"])


def kronfluence_scores(p: PeerProblem, config: Config, x: Tensor, y: Tensor) -> Tensor:
    analyzer, _ = _kronfluence(p)
    name = f"pairwise{len(p.cache)}"
    p.cache[name] = True
    analyzer.compute_pairwise_scores(scores_name=name, factors_name="ekfac", query_dataset=TensorDataset(x, y),
                                     train_dataset=TensorDataset(p.x, p.y), per_device_query_batch_size=len(y),
                                     per_device_train_batch_size=BATCH, score_args=_score_args(config),
                                     overwrite_output_dir=True)
    return analyzer.load_pairwise_scores(name)["all_modules"].float()


def kronfluence_self(p: PeerProblem, config: Config) -> Tensor:
    analyzer, _ = _kronfluence(p)
    name = f"self{len(p.cache)}"
    p.cache[name] = True
    analyzer.compute_self_scores(scores_name=name, factors_name="ekfac", train_dataset=TensorDataset(p.x, p.y),
                                 per_device_train_batch_size=BATCH, score_args=_score_args(config),
                                 overwrite_output_dir=True)
    return analyzer.load_self_scores(name)["all_modules"].float().reshape(-1)


# --------------------------------------------------------------------------- traker
def traker_scores(p: PeerProblem, config: Config, x: Tensor, y: Tensor) -> Tensor:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = copy.deepcopy(p.module)
    grad_dim = sum(t.numel() for t in model.parameters())
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=config["proj_dim"], seed=0,
                               proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(p.y), save_dir=tmp,
                        device="cpu", projector=projector, proj_dim=config["proj_dim"],
                        lambda_reg=config["lambda_reg"], use_half_precision=False)
        traker.load_checkpoint(p.module.state_dict(), model_id=0)
        for start in range(0, len(p.y), BATCH):
            batch = (p.x[start: start + BATCH], p.y[start: start + BATCH])
            traker.featurize(batch=batch, num_samples=len(batch[1]))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="fair", checkpoint=p.module.state_dict(), model_id=0,
                                        num_targets=len(y))
        traker.score(batch=(x, y), num_samples=len(y))
        out = traker.finalize_scores(exp_name="fair")
    return torch.as_tensor(out).T.float()


# --------------------------------------------------------------------------- pyDVL
def _pydvl(p: PeerProblem, config: Config) -> Any:
    from pydvl.influence.torch import DirectInfluence

    key = f"pydvl:{config['regularization']}"
    if key not in p.cache:
        model = copy.deepcopy(p.module)
        p.cache[key] = DirectInfluence(model, nn.functional.cross_entropy,
                                       regularization=config["regularization"]).fit(p.loader())
    return p.cache[key]


def pydvl_scores(p: PeerProblem, config: Config, x: Tensor, y: Tensor) -> Tensor:
    """One call (one iHVP solve) per query against all N rows, as pyDVL's docs use it."""
    fitted = _pydvl(p, config)
    return torch.cat([fitted.influences(x[q: q + 1], y[q: q + 1], p.x, p.y, mode="up").detach()
                      for q in range(len(y))]).float()


def pydvl_self(p: PeerProblem, config: Config) -> Tensor:
    """Diagonal of ⟨H⁻¹∇L_i, ∇L_i⟩: each block of rows against itself, one batched solve per block."""
    fitted = _pydvl(p, config)
    return torch.cat([torch.diagonal(fitted.influences(p.x[s: s + BATCH], p.y[s: s + BATCH], mode="up")).detach()
                      for s in range(0, len(p.y), BATCH)]).float()


def peers() -> list[Peer]:
    ckpt_layers = tuple({"checkpoints": c, "layers": layer} for c in ("all", "final") for layer in ("all", "last"))
    return [
        Peer("captum TracInCP", "captum", {"checkpoints": "all", "layers": "all"}, ckpt_layers,
             captum_scores, captum_self),
        Peer("dattri TracIn", "dattri", {"checkpoints": "all", "normalized_grad": False},
             tuple({"checkpoints": c, "normalized_grad": g} for c in ("all", "final") for g in (False, True)),
             dattri_scores, dattri_self),
        Peer("kronfluence EK-FAC", "kronfluence", {"damping_factor": None},
             tuple({"damping_factor": d} for d in (None, 1e-4, 1e-2, 1.0)), kronfluence_scores, kronfluence_self),
        Peer("traker TRAK (BasicProjector)", "trak", {"proj_dim": 2048, "lambda_reg": 0.0},
             tuple({"proj_dim": d, "lambda_reg": r} for d, r in ((2048, 0.0), (512, 0.0), (128, 0.0), (2048, 1e-2))),
             traker_scores, None, "traker scores train × target only; it has no self-influence API"),
        Peer("pyDVL influence (direct iHVP)", "pydvl", {"regularization": None},
             tuple({"regularization": r} for r in (None, 1e-3, 1e-2, 1e-1)), pydvl_scores, pydvl_self),
    ]
