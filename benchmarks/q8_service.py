"""Q8 through the service — which training sentences taught a tiny GPT-2 a fact, asked over HTTP.

The Q8 facts and model (`benchmarks.lm_facts`: made-up countries × 4 relations, 2–5
paraphrased training sentences per fact, a 2-layer 64-wide GPT-2 trained from scratch with
5 TracIn checkpoints), handed to the product as a user would: the model and each checkpoint
saved with `save_pretrained` default settings (SDPA attention) with a word-level tokenizer
beside them, the training sentences as `.jsonl` shards (`benchmarks.lm_folder`), registered
with `python -m service` (embedded mode: SQLite and the in-process worker, started by
`service.testing.ServiceProcesses`). Each query is a held-out paraphrase of a fact as
`{"prompt": [...], "completion": [" <object>"]}` (only the object's token counts), POSTed in
`per_sample` mode; the `[Q, N]` score matrix comes back from `/scores?format=npy`.

Fair protocol (issue 12). Every method is run twice on the evaluated facts: with its
library defaults (no params; TracIn gets the registered checkpoints, which are data, not
tuning) and with the configuration that scored the best MRR on the validation facts
(disjoint from the evaluated ones) among exactly `budget` configurations per method —
the same budget for every method. The 400 facts are permuted once (seed 0): the first 50 are
evaluated, the next 50 validate (with 10, the chosen configuration saturated at validation
MRR 1.000). Metrics: MRR of the first proponent and precision@10
(`attribution.evaluation`), and the paired bootstrap over facts of the difference between
our default answer (`forward_inf`, no params) and the best other entry. Targets
(`shared/BENCHMARKS.md`): our default MRR above TracIn's and every other default; the best
Forward-INF ≥ 0.9 MRR.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution.evaluation import mean_reciprocal_rank, precision_at_k, retrieval_difference
from benchmarks.cli import Options, Stopwatch, progress, run_study
from benchmarks.lm_facts import FactCorpus, fact_corpus, train_lm
from benchmarks.lm_folder import query_samples, save_study_folders
from benchmarks.q8_service_client import CHECKPOINTS, Scored, StudyClient
from benchmarks.report import Report
from benchmarks.speed_common import machine
from service.settings import SERVICE_DIR_NAME
from service.testing import ServiceProcesses

STUDY = "q8_service"
PEER_PYTHON = "Q8_PEER_PYTHON"  # an interpreter with kronfluence installed (benchmarks/README.md)
FOLDERS = "Q8_FOLDERS"  # a directory keeping the trained folders between runs (same sizes: reused, not retrained)
PRECISION_K = 10
MRR_TARGET = 0.9
OURS = "forward_inf"
C_PROJ = "transformer.h.1.attn.c_proj"
ONE_LAYER = {"fit_batch_size": 16}
LINEAR_LAYERS = [f"transformer.h.{b}.{m}" for b in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@dataclass(frozen=True)
class Entry:
    """One method of the fair protocol: its library defaults and `budget` configurations to choose from."""

    label: str
    method: str
    defaults: dict[str, Any]
    grid: tuple[dict[str, Any], ...]


def entries(budget: int) -> list[Entry]:
    """Every method with `budget` validation configurations each (the first `budget` of its list)."""
    relative = ({"normalize": "none"}, {"normalize": "relative"})
    lists = [
        Entry("Forward-INF", "forward_inf", {}, (
            {"stop": "forgotten", "optimizer": "normalized_sgd", "steps": 20, "lr": 0.05, "normalize": "relative"},
            {"stop": "fixed", "optimizer": "normalized_sgd", "steps": 10, "lr": 0.1, "normalize": "relative"},
            {"stop": "fixed", "optimizer": "normalized_sgd", "steps": 20, "lr": 0.05, "normalize": "relative"},
            {"stop": "fixed", "optimizer": "normalized_sgd", "steps": 20, "lr": 0.05, "normalize": "relative",
             "scope": "all"},
        )),
        Entry("TracIn (5 checkpoints)", "tracin", {CHECKPOINTS: True}, (
            *({CHECKPOINTS: True, **r} for r in relative),
            *({CHECKPOINTS: True, "last_layer": True, **r} for r in relative),
        )),
        Entry("TRAK", "trak", {}, (
            *relative,
            *({"projection_dim": 8192, **r} for r in relative),
        )),
        Entry("gradient similarity", "gradient_similarity", {}, (
            {"similarity": "cosine"}, {"similarity": "dot"},
            {"similarity": "dot", "normalize": "relative"}, {"similarity": "cosine", "last_layer": True},
        )),
        # Library defaults: EK-FAC over the 8 linear (Conv1D) layers of the blocks, relative scores
        # (`influence.kronecker_scope`; before, CG on all 118k parameters, ~47 s per query).
        Entry("influence", "influence", {}, (
            {"normalize": "relative"}, {"normalize": "none"}, {"ihvp": "kfac"},
            {**ONE_LAYER, "layers": [C_PROJ], "normalize": "relative"},
        )),
        # last_layer would be ln_f (the module owning the last parameter); the tied embedding is the output layer
        Entry("TrackStar", "trackstar", {}, (
            {}, {"projection_dim": 8192}, {"layers": LINEAR_LAYERS}, {"layers": ["transformer.wte"]},
        )),
    ]
    return [Entry(e.label, e.method, e.defaults, e.grid[:budget]) for e in lists]


@dataclass
class PeerEntry:
    params: str
    validation: float | None
    scores: torch.Tensor  # [Q, N] on the evaluated facts


def run_peers(root: Path, sizes: tuple[int, int, int, int]) -> tuple[dict[str, PeerEntry], list[str]]:
    """kronfluence and Bergson on the saved folder (`benchmarks.q8_peers`) in the `Q8_PEER_PYTHON` interpreter;
    its entries and the one-line reasons of peers that did not run."""
    python = os.environ.get(PEER_PYTHON)
    reasons: list[str] = []
    if not python:
        return {}, [f"kronfluence and Bergson not run: set {PEER_PYTHON} to an interpreter that has them "
                    "(benchmarks/README.md)"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # both peers read the local folder; nothing downloads
    done = subprocess.run([python, "-m", "benchmarks.q8_peers", str(root), *map(str, sizes)], env=env,
                          capture_output=True, text=True, timeout=3600, check=False)
    path = root / "peers" / "peers.json"
    if not path.exists():
        return {}, [f"the peers failed to start: {done.stderr.strip().splitlines()[-1:]}", *reasons]
    summary = json.loads(path.read_text())
    entries = {name: PeerEntry(v["params"], v["validation"], torch.from_numpy(np.load(root / "peers" / f"{name}.npy")))
               for name, v in summary.items() if "error" not in v}
    reasons += [f"{name} failed: {v['error']}" for name, v in summary.items() if "error" in v]
    return entries, reasons


@dataclass
class Outcome:
    entry: Entry
    default: Scored
    chosen: dict[str, Any]
    validation: list[float]  # MRR of each grid configuration on the validation facts
    tuned: Scored


def describe(params: dict[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k != CHECKPOINTS}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"


def run_entry(client: StudyClient, corpus: FactCorpus, entry: Entry) -> Outcome:
    validation = query_samples(corpus, corpus.validation)
    relevant = corpus.proponents(corpus.validation)
    mrr = [mean_reciprocal_rank(client.scores(entry.method, p, validation).scores, relevant)
           for p in progress(entry.grid, f"{entry.label}: validation")]
    chosen = entry.grid[int(np.argmax(mrr))]  # ties: the earlier configuration
    evaluated = query_samples(corpus, corpus.evaluated)
    default = client.scores(entry.method, entry.defaults, evaluated)
    tuned = client.scores(entry.method, chosen, evaluated)
    return Outcome(entry, default, chosen, mrr, tuned)


def run(options: Options) -> Report:
    subjects, evaluated, validation, epochs, budget = (30, 8, 4, 60, 2) if options.quick else (100, 50, 50, 40, 4)
    report = Report(STUDY, "Q8 through the service — LM fact tracing over HTTP, fair protocol", options.quick)
    corpus = fact_corpus(subjects, evaluated, validation)
    relevant = corpus.proponents(corpus.evaluated)
    outcomes: list[Outcome] = []
    peers: dict[str, PeerEntry] = {}
    with tempfile.TemporaryDirectory(prefix="q8-service-") as tmp:
        kept = os.environ.get(FOLDERS)
        root = Path(kept) if kept else Path(tmp)  # the service's DATA_ROOT: it reads files under it only
        if not kept:  # a kept DATA_ROOT keeps the service's store: identical queries are answered from it
            shutil.rmtree(root / SERVICE_DIR_NAME, ignore_errors=True)
        sizes = {"subjects": subjects, "evaluated": evaluated, "validation": validation, "epochs": epochs, "seed": 0}
        with Stopwatch() as watch:
            folders = trained_folders(corpus, sizes, root / "q8")
        with ServiceProcesses({"DATA_ROOT": str(root)}, log_dir=root / "logs", log_level="warning") as running:
            client = StudyClient(running.client, timeout=1800.0)
            client.register(folders)
            for entry in progress(entries(budget), "methods"):
                outcomes.append(run_entry(client, corpus, entry))
        peers, reasons = run_peers(root / "q8", (subjects, evaluated, validation, budget))
    report.setup = setup_text(corpus, folders["parameters"], watch.seconds, budget, options)
    summarise(report, outcomes, peers, relevant)
    for reason in reasons:
        report.note(reason)
    return report


def trained_folders(corpus: FactCorpus, sizes: dict[str, int], root: Path) -> dict[str, Any]:
    """Train and save the study's folders under `root`, or reuse them if `root/manifest.json`
    records the same sizes (the training is seeded: the same sizes give the same model)."""
    manifest = root / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("sizes") == sizes:
        saved = json.loads(manifest.read_text())["folders"]
        return {k: [Path(p) for p in v] if k in ("checkpoints", "shards") else Path(v) if k == "model" else v
                for k, v in saved.items()}
    trained = train_lm(corpus, epochs=sizes["epochs"])
    folders = save_study_folders(corpus, trained, root)
    folders["parameters"] = trained.model.num_params
    manifest.write_text(json.dumps({"sizes": sizes, "folders": {
        k: [str(p) for p in v] if k in ("checkpoints", "shards") else str(v) if k == "model" else v
        for k, v in folders.items()}}))
    return folders


def setup_text(corpus: FactCorpus, parameters: int, train_seconds: float, budget: int, options: Options) -> str:
    proponents = corpus.proponents(corpus.evaluated).sum(dim=1).double().mean()
    return (
        f"{len(corpus.facts)} facts, N = {len(corpus.sentences)} training sentences in 2 `.jsonl` shards; "
        f"{len(corpus.evaluated)} evaluated facts ({proponents:.1f} proponents on average) and "
        f"{len(corpus.validation)} validation facts (disjoint; only for choosing configurations). Model: GPT-2 "
        f"from `GPT2Config` (2 layers, 64 wide, {parameters:,} parameters), AdamW, 5 checkpoints, "
        f"trained and saved in {train_seconds:.0f} s (0 s: reused from `{FOLDERS}`, same sizes and seeds; "
        "then entries marked '(stored)' were answered from the service's store of identical queries computed "
        "by an earlier, interrupted run of the same code: their seconds are lookups); saved with `save_pretrained` defaults (SDPA attention) with a "
        "word-level tokenizer; registered with `python -m service` (embedded: SQLite, in-process worker) and "
        "queried over HTTP with `{\"prompt\", \"completion\"}` samples in `per_sample` mode (one POST per "
        f"configuration and fact set). Tuning budget: {budget} configurations per method, chosen by validation "
        "MRR (ties: the earlier one); seeds: corpus 0, training 0, service params' seed 0. Bootstrap: 1,000 "
        f"paired resamples of the evaluated facts, 95% percentile interval. Machine: {machine()}."
    )


def summarise(report: Report, outcomes: list[Outcome], peers: dict[str, PeerEntry], relevant: torch.Tensor) -> None:
    rows, entries_by_name = [], {}
    for o in outcomes:
        for kind, scored, params in (("defaults", o.default, o.entry.defaults), ("tuned", o.tuned, o.chosen)):
            name = f"{o.entry.label}, {kind}"
            entries_by_name[name] = scored.scores
            rows.append([name, describe(params),
                         f"{max(o.validation):.3f}" if kind == "tuned" else "—",
                         f"{mean_reciprocal_rank(scored.scores, relevant):.3f}",
                         f"{precision_at_k(scored.scores, relevant, PRECISION_K):.3f}",
                         f"{scored.seconds:.1f}" + (" (stored)" if scored.cached else ""), _steps(scored)])
            report.timing(name, scored.seconds / len(scored.scores), "POST → succeeded, per fact (one per_sample "
                                                                      "query of all facts; fits included)")
    for name, peer in peers.items():
        entries_by_name[name] = peer.scores
        rows.append([name, peer.params, "—" if peer.validation is None else f"{peer.validation:.3f}",
                     f"{mean_reciprocal_rank(peer.scores, relevant):.3f}",
                     f"{precision_at_k(peer.scores, relevant, PRECISION_K):.3f}", "(in-process)", "—"])
    report.table("Every method, evaluated facts (library defaults and validation-tuned, equal budget)",
                 ["entry", "params", "validation MRR", "MRR", f"precision@{PRECISION_K}",
                  "s per POST (all facts)", "unlearning steps (mean)"], rows)
    for o in outcomes:
        report.table(f"{o.entry.label}: validation MRR of each configuration", ["params", "validation MRR"],
                     [[describe(p), f"{m:.3f}"] for p, m in zip(o.entry.grid, o.validation, strict=True)])
    ours_name = "Forward-INF, defaults"
    ours = entries_by_name[ours_name]
    mrr = {name: mean_reciprocal_rank(s, relevant) for name, s in entries_by_name.items()}
    others = {n: m for n, m in mrr.items() if n != ours_name}
    best = max(others, key=lambda n: others[n])
    for metric in ("mrr", "precision"):
        d = retrieval_difference(ours, entries_by_name[best], relevant, metric=metric,
                                 k=PRECISION_K if metric == "precision" else None)
        report.figure(f"our default − best other entry ({best}), {metric}: difference [95% interval]",
                      f"{d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}]", "—", "paired bootstrap over facts",
                      "≥ 0 or interval includes 0", d.difference >= 0 or not d.significant)
    defaults = {n: m for n, m in others.items() if n.endswith(", defaults")}
    report.figure("our default (forward_inf, no params): MRR", mrr[ours_name], "TracIn 0.166 vs Forward-INF 0.21",
                  "Forward-INF paper, Table 3", f"> every other default (best {max(defaults.values()):.3f})",
                  mrr[ours_name] > max(defaults.values()))
    tracin = mrr["TracIn (5 checkpoints), defaults"]
    report.figure("TracIn (5 checkpoints), defaults: MRR", tracin, "TracIn 0.166", "Forward-INF paper, Table 3")
    best_fi = max(mrr[ours_name], mrr["Forward-INF, tuned"])
    report.figure("best Forward-INF entry: MRR", best_fi, "—", "issue 11", f"≥ {MRR_TARGET}", best_fi >= MRR_TARGET)
    for figure in report.missed():
        report.note(f"Missed: {figure.name} = {figure.ours} (target {figure.target}).")


def _steps(scored: Scored) -> str:
    steps = scored.extras.get("unlearning_steps")
    return f"{float(np.mean(steps)):.1f}" if steps else "—"


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
