"""Q8 — language-model tracing: which training sentences taught a tiny GPT-2 the fact a query states?

Synthetic facts (`benchmarks.lm_facts`): 100 made-up countries × 4 relations (capital,
language, currency, region), each fact stated by 2–5 paraphrased training sentences — its
proponents — among ~1,400 (quick: 30 countries, ~430 sentences). A 2-layer, 64-wide
Hugging Face GPT-2 built from its config is trained from scratch on them (AdamW, 5 TracIn
checkpoints). A query is a held-out paraphrase of a fact (a template used for other facts,
never for this one: not a copy of a training sentence) whose loss counts only the object
token. Every method scores 50 evaluated queries against every training sentence
(`per_sample=True`); `attribution.evaluation` gives the MRR of the first proponent and
precision@k with k = the fact's number of proponents. No method is tuned here (each runs
its library defaults or a fixed named variant; Forward-INF `auto` chooses label-free): the
tuned comparison, the best of the same number of configurations per method on validation
facts, is `q8_service.py`'s fair protocol. Speed: one new query at a
time on a fitted method (median of 3), as queries per minute. Targets (the Forward-INF
paper's Table 3, MT5 on FTRACE-TREx: MRR 0.21 vs TracIn 0.166, 4× the queries per
minute): Forward-INF MRR above TracIn's and ≥ 4× TracIn's queries per minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attribution.evaluation import mean_reciprocal_rank, precision_at_k
from attribution.methods.base import FitContext
from attribution.tasks import CausalLMTask
from benchmarks.cli import Options, Stopwatch, progress, run_study
from benchmarks.common import fit_context
from benchmarks.lm_facts import (
    MAX_STATEMENTS,
    MIN_STATEMENTS,
    TEMPLATES,
    FactCorpus,
    TrainedLM,
    fact_corpus,
    train_lm,
)
from benchmarks.plots import labelled_points
from benchmarks.report import Report, format_value
from benchmarks.runner import Variant, describe, scores

STUDY = "q8_lm_tracing"
SPEED_QUERIES = 3
PAPER = "Forward-INF paper, Table 3 (MT5, FTRACE-TREx)"
PAPER_MRR = {"Forward-INF": 0.21, "TracIn": 0.166}
SPEED_TARGET = 4.0
COSTLY_QUERIES = 3


def variants(quick: bool) -> list[Variant]:
    relative = {"normalize": "relative"}
    costly = [  # one CG solve per query over all parameters (> 1 minute each on 2 cores): full mode only
        # raw scores: relative ones would need one CG solve per training row for the denominators
        Variant("Forward-INF, Newton step (CG)", "forward_inf", {"unlearning": "newton", "normalize": "none"},
                one_query_at_a_time=True,
                max_queries=COSTLY_QUERIES),
    ]
    return [
        Variant("Forward-INF, library defaults", "forward_inf"),
        Variant("Forward-INF, relative", "forward_inf", relative),
        Variant("Forward-INF, auto (self-retrieval)", "forward_inf", {"auto": True}),
        # library defaults on a causal LM above 20k parameters: EK-FAC over the blocks' Conv1D layers
        Variant("influence, library defaults (EK-FAC)", "influence"),
        *([] if quick else costly),
        Variant("TracIn (5 checkpoints)", "tracin"),
        Variant("TracIn, relative", "tracin", relative),
        Variant("TRAK", "trak"),
        Variant("TRAK, relative", "trak", relative),
        Variant("gradient cosine", "gradient_similarity"),
        Variant("gradient dot product", "gradient_similarity", {"similarity": "dot"}),
    ]


@dataclass
class Result:
    variant: Variant
    params: dict[str, Any]
    mrr: float
    precision: float
    queries: int
    seconds: float  # one new query, fitted artifacts reused


class Contexts:
    """One `FitContext` per method (or shared `Variant.context`), so variants share fitted artifacts."""

    def __init__(self, trained: TrainedLM) -> None:
        self.trained = trained
        self.by_name: dict[str, FitContext] = {}

    def __call__(self, variant: Variant) -> FitContext:
        name = variant.context or variant.method
        if name not in self.by_name:
            trajectory = self.trained.trajectory if variant.method == "tracin" else None
            self.by_name[name] = fit_context(f"q8:{name}", trajectory, CausalLMTask())
        return self.by_name[name]


def query_scores(contexts: Contexts, corpus: FactCorpus, variant: Variant, params: dict[str, Any],
                 facts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scores `[Q, N]` of the queries of `facts`: one batched call, or one call per query for the
    costly variants (then also their seconds per query)."""
    model, context = contexts.trained.model, contexts(variant)
    if not variant.one_query_at_a_time:
        return scores(model, variant.method, params, corpus.train, context, corpus.queries(facts)).scores, float("nan")
    runs = [scores(model, variant.method, params, corpus.train, context, corpus.queries(facts[k: k + 1]))
            for k in range(len(facts))]
    warm = runs[1:] or runs  # the first query of a method pays its fit
    return torch.cat([r.scores for r in runs]), float(np.median([r.seconds for r in warm]))


def single_query_seconds(contexts: Contexts, corpus: FactCorpus, variant: Variant, params: dict[str, Any]) -> float:
    """Median seconds of one new query on the variant's already fitted context."""
    model, context = contexts.trained.model, contexts(variant)
    return float(np.median([
        scores(model, variant.method, params, corpus.train, context, corpus.queries(corpus.evaluated[k: k + 1])).seconds
        for k in range(SPEED_QUERIES)
    ]))


def evaluate(contexts: Contexts, corpus: FactCorpus, variant: Variant) -> tuple[Result, str]:
    """The variant's MRR, precision@k and seconds per new query; and its params column."""
    params = variant.params
    facts = corpus.evaluated[: variant.max_queries] if variant.max_queries else corpus.evaluated
    score, seconds = query_scores(contexts, corpus, variant, params, facts)
    if not variant.one_query_at_a_time:
        seconds = single_query_seconds(contexts, corpus, variant, params)
    relevant = corpus.proponents(facts)
    result = Result(variant, params, mean_reciprocal_rank(score, relevant), precision_at_k(score, relevant),
                    len(facts), seconds)
    chosen = describe(variant.method, params)
    auto = contexts(variant).extras.get("auto") if variant.params.get("auto") else None
    if auto:
        chosen += f" → chose {auto}"
    return result, chosen


def headline(report: Report, results: dict[str, Result]) -> None:
    """Forward-INF (auto, defaults, relative) vs TracIn's better variant, MRR and queries/min."""
    tracin = max((results[k] for k in ("TracIn (5 checkpoints)", "TracIn, relative")), key=lambda r: r.mrr)
    report.figure(f"TracIn MRR ({tracin.variant.label}: the better TracIn variant on the evaluated facts)",
                  tracin.mrr, f"TracIn {PAPER_MRR['TracIn']}", PAPER)
    for label in ("Forward-INF, auto (self-retrieval)", "Forward-INF, library defaults", "Forward-INF, relative"):
        ours = results[label]
        report.figure(f"{label}: MRR", ours.mrr, f"Forward-INF {PAPER_MRR['Forward-INF']}", PAPER,
                      f"> TracIn ({tracin.mrr:.3f})", ours.mrr > tracin.mrr)
    label = "Forward-INF, library defaults"
    ratio = tracin.seconds / results[label].seconds
    report.figure(f"queries per minute, {label} ÷ {tracin.variant.label}", f"{ratio:.1f}×", "4×", PAPER,
                  f"≥ {SPEED_TARGET:.0f}×", ratio >= SPEED_TARGET)


def explain(report: Report, results: dict[str, Result]) -> None:
    """Notes: the first-order comparisons that explain the ranking, the gaps."""
    mrr = {label: r.mrr for label, r in results.items()}
    report.note(
        "Forward-INF's causal-LM defaults (`ForwardInfParams.for_task`: K = 20 normalised ascent steps of α = 0.05, "
        "relative scores; `relative` alone gets the same) "
        f"score MRR {mrr['Forward-INF, library defaults']:.3f}; their first-order limit (one small step) is the "
        f"gradient cosine, {mrr['gradient cosine']:.3f}. TracIn sums the dot product over 5 checkpoints taken while "
        f"the facts were being learnt: {mrr['TracIn (5 checkpoints)']:.3f} raw, {mrr['TracIn, relative']:.3f} "
        f"relative, against the final checkpoint's dot product alone ({mrr['gradient dot product']:.3f}). Every "
        "method but TracIn sees only the final model.")
    for figure in report.missed():
        report.note(f"Missed: {figure.name} = {format_value(figure.ours)} (target {figure.target}).")


def run(options: Options) -> Report:
    subjects, evaluated = (30, 8) if options.quick else (100, 50)
    epochs = 60 if options.quick else 40
    report = Report(STUDY, "Q8 — Language-model tracing (facts learnt by a tiny GPT-2)", options.quick)
    corpus = fact_corpus(subjects, evaluated, 0)
    with Stopwatch() as watch:
        trained = train_lm(corpus, epochs=epochs)
    proponents = corpus.proponents(corpus.evaluated).sum(dim=1).double()
    report.setup = (
        f"{subjects} made-up countries × {len(TEMPLATES)} relations ({', '.join(TEMPLATES)}) = {len(corpus.facts)} "
        f"facts; each stated by {MIN_STATEMENTS}–{MAX_STATEMENTS} of its relation's 6 paraphrase templates "
        f"(N = {len(corpus.train)} training sentences, word-level vocabulary of {len(corpus.vocab)}, "
        f"{corpus.length} tokens per padded row). Languages, currencies and regions are shared by many countries, "
        "so sentences with the query's object and relation but another subject are distractors. A query is a "
        "held-out template stating the fact (used for other facts, never for this one), its loss only the object "
        f"token. {evaluated} evaluated facts ({proponents.mean():.1f} proponents on average); "
        "no method is tuned here (`q8_service.py` tunes every method on validation facts). Model: Hugging Face GPT-2 from `GPT2Config` "
        f"(2 layers, 64 wide, 4 heads, default (SDPA) attention, no dropout; {trained.model.num_params:,} parameters), "
        f"AdamW lr 3e-3, batches of 64, {epochs} epochs, 5 evenly spaced checkpoints for TracIn "
        f"({watch.seconds:.0f} s); final mean training loss {trained.train_loss:.3f} per token (subjects are "
        f"unpredictable), evaluated queries answered correctly (object = top next token): "
        f"{trained.query_accuracy:.0%}. Each method scores the evaluated queries against every training sentence "
        "through `attribution.pipeline.attribute(..., per_sample=True)`; "
        "`attribution.evaluation.mean_reciprocal_rank` (MRR of the first proponent) and `precision_at_k` "
        "(k = the fact's number of proponents) score the rankings. Influence's library defaults (P > 20,000 "
        "parameters on a causal LM): EK-FAC over the 8 `Conv1D` layers of the blocks, relative scores. The "
        "Newton-step Forward-INF (CG over every parameter) solves one CG system per query, so it runs one query at "
        f"a time on the first {COSTLY_QUERIES} evaluated queries only"
        f"{' (skipped in quick mode)' if options.quick else ''}. Seconds per query: one new query at a time on a fitted method (median of "
        f"{SPEED_QUERIES}; the one-at-a-time runs for the costly variants), artifacts (curvature, features, cached "
        "losses, `auto`'s choice) reused; queries per minute = 60 ÷ that."
    )
    contexts = Contexts(trained)
    rows, points, results = [], [], {}
    for variant in progress(variants(options.quick), "methods"):
        result, chosen = evaluate(contexts, corpus, variant)
        results[variant.label] = result
        rows.append([variant.label, chosen, f"{result.mrr:.3f}", f"{result.precision:.3f}", str(result.queries),
                     f"{result.seconds:.4g}", f"{60 / result.seconds:.1f}"])
        points.append((variant.label, result.seconds, result.mrr))
        report.timing(variant.label, result.seconds, "one new query, fitted artifacts reused")
    report.table("Every method (evaluated facts)",
                 ["variant", "params", "MRR", "precision@k", "queries", "s / new query", "queries / min"], rows)
    headline(report, results)
    explain(report, results)
    plot = labelled_points(options.out / f"{STUDY}.png", points, "seconds per new query (log)", "MRR",
                           "LM fact tracing: MRR of the first proponent vs time per query")
    report.plots.append(plot.name)
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
