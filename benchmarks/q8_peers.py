"""Q8 peers: kronfluence and Bergson on the same tiny GPT-2 folder and facts as the service study.

Run by `benchmarks.q8_service` in a separate interpreter that has the peer installed
(`Q8_PEER_PYTHON`, see benchmarks/README.md): `python -m benchmarks.q8_peers ROOT SUBJECTS
EVALUATED VALIDATION BUDGET`. It loads `ROOT/model` (the folder the service registered),
rebuilds the same facts (`lm_facts.fact_corpus`, seed 0) and checks that the saved tokenizer
gives exactly the rows it scores, then runs kronfluence's `Analyzer` with its library
defaults (`FactorArguments()`: EK-FAC) and with the best of `budget` factor strategies on
the validation facts. kronfluence tracks `nn.Linear`/`nn.Conv2d` modules only: in GPT-2
that is `lm_head` (tied to the token embeddings); the `Conv1D` blocks are not tracked.
Bergson (EleutherAI) runs offline on the same folder: `bergson.build.build` collects the
per-example loss gradients of its default target modules (GPT-2's eight `Conv1D` layers, weights
only) for the training rows and for the queries, both handed over pre-tokenized (`input_ids`,
`labels` with −100 outside the counted tokens: the queries' object token only) so they are the
rows the service scores; the score is the product of the stored gradients, as its `Attributor`
computes it (`unit_normalize`: cosine). Its library defaults (`IndexConfig()`: no projection, no
preconditioner, dot product) and the best of `budget` configurations on the validation facts.
Writes `ROOT/peers/<entry>.npy` (`[Q, N]` scores of the evaluated facts) and
`ROOT/peers/peers.json` (`{entry: {"params", "validation"}}` or `{peer: {"error"}}`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attribution.data import Batch
from attribution.evaluation import mean_reciprocal_rank
from benchmarks.lm_facts import FactCorpus, fact_corpus

STRATEGIES = ("ekfac", "kfac", "identity", "diagonal")
BERGSON_GRID: tuple[dict[str, Any], ...] = (
    {}, {"unit_normalize": True}, {"projection_dim": 16}, {"projection_dim": 16, "unit_normalize": True},
)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch: Batch) -> None:
        self.ids, self.targets = batch.inputs["input_ids"], batch.targets  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.targets[i]}


def _token_losses(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    return logits, batch["labels"][:, 1:]


def kronfluence_scores(module: Any, corpus: FactCorpus, facts: Tensor, strategy: str | None) -> Tensor:
    """`[Q, N]` kronfluence pairwise scores (`strategy` None: `FactorArguments()` defaults)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class FactTask(Task):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Tensor:
            logits, labels = _token_losses(model, batch)
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(logits.softmax(-1).reshape(-1, logits.shape[-1]), 1).reshape(labels.shape)
                labels = torch.where(labels == -100, labels, drawn)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Tensor:
            logits, labels = _token_losses(model, batch)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")

    task = FactTask()
    model = prepare_model(module, task)
    arguments = FactorArguments() if strategy is None else FactorArguments(strategy=strategy)
    with tempfile.TemporaryDirectory(prefix="q8-kronfluence-") as out:
        analyzer = Analyzer(analysis_name="q8", model=model, task=task, output_dir=out, disable_tqdm=True,
                            disable_model_save=True)
        train = _Rows(corpus.train.all)
        analyzer.fit_all_factors(factors_name="f", dataset=train, factor_args=arguments, per_device_batch_size=64,
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=_Rows(corpus.queries(facts)),
                                         train_dataset=train, per_device_query_batch_size=16,
                                         per_device_train_batch_size=64, overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")
    if scores is None:
        raise RuntimeError("kronfluence wrote no scores")
    return scores["all_modules"].float()


def _tokens_file(batch: Batch, path: Path) -> Path:
    """Pre-tokenized rows `{"input_ids", "labels"}` (padding cut) as jsonl, the way Bergson reads them."""
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]  # type: ignore[index]
    with path.open("w") as out:
        for row in range(len(ids)):
            n = int(mask[row].sum())
            out.write(json.dumps({"input_ids": ids[row, :n].tolist(), "labels": batch.targets[row, :n].tolist()}) + "\n")
    return path


def bergson_gradients(folder: Path, rows: Path, run: Path, config: dict[str, Any]) -> Tensor:
    """`[n, d]` Bergson's per-row gradients of the jsonl `rows` (float64), built once per `run` directory."""
    from bergson.build import build
    from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig
    from bergson.data import load_gradients

    index = IndexConfig(run_path=str(run), model=str(folder), tokenizer=str(folder), data=DataConfig(dataset=str(rows)),
                        overwrite=True, token_batch_size=_context(folder),
                        projection_dim=int(config.get("projection_dim", 0)))
    if not run.exists():
        build(index, PreprocessConfig())
    return torch.from_numpy(np.array(load_gradients(run))).double()


def _context(folder: Path) -> int:
    """The model's context length (Bergson refuses a token batch larger than it)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(folder)).n_positions)


def bergson_scores(folder: Path, corpus: FactCorpus, facts: Tensor, config: dict[str, Any], work: Path) -> Tensor:
    """`[Q, N]` Bergson scores of the queries of `facts` against every training row."""
    name = "-".join(f"{k}{v}" for k, v in config.items()) or "defaults"
    train = bergson_gradients(folder, _tokens_file(corpus.train.all, work / "train.jsonl"), work / f"train-{name}", config)
    tag = "-".join(str(int(f)) for f in facts[:3])
    queries = bergson_gradients(folder, _tokens_file(corpus.queries(facts), work / f"queries-{tag}.jsonl"),
                                work / f"queries-{tag}-{name}", config)
    if config.get("unit_normalize"):
        train = train / train.norm(dim=1, keepdim=True).clamp(min=1e-30)
        queries = queries / queries.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return (queries @ train.T).float()


def check_tokens(folder: Path, corpus: FactCorpus) -> None:
    """The saved tokenizer must give the rows scored here (the service tokenizes with it)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    ids = corpus.train.all.inputs["input_ids"]  # type: ignore[index]
    for row in range(min(20, len(corpus.sentences))):
        encoded = tokenizer(corpus.sentences[row])["input_ids"]
        if encoded != ids[row, : len(encoded)].tolist():
            raise RuntimeError(f"tokenizer mismatch on row {row}")


def main(argv: list[str]) -> None:
    root, subjects, evaluated, validation, budget = Path(argv[0]), *(int(a) for a in argv[1:5])
    corpus = fact_corpus(subjects, evaluated, validation)
    out = root / "peers"
    out.mkdir(exist_ok=True)
    summary: dict[str, Any] = {}
    try:
        from transformers import GPT2LMHeadModel

        module = GPT2LMHeadModel.from_pretrained(str(root / "model")).eval()
        check_tokens(root / "model", corpus)
        relevant = corpus.proponents(corpus.validation)
        grid = STRATEGIES[:budget]
        validation_mrr = [mean_reciprocal_rank(kronfluence_scores(module, corpus, corpus.validation, s), relevant)
                          for s in grid]
        chosen = grid[int(np.argmax(validation_mrr))]
        for entry, strategy in (("kronfluence, defaults", None), ("kronfluence, tuned", chosen)):
            np.save(out / f"{entry}.npy", kronfluence_scores(module, corpus, corpus.evaluated, strategy).numpy())
            summary[entry] = {"params": f"strategy={strategy or 'default (ekfac)'}",
                              "validation": max(validation_mrr) if strategy else None,
                              "grid": dict(zip(grid, validation_mrr, strict=True))}
    except Exception as exc:  # reported as the peer's one-line reason
        summary["kronfluence"] = {"error": _reason(exc)}
    try:
        run_bergson(root / "model", corpus, budget, out, summary)
    except Exception as exc:
        summary["Bergson"] = {"error": _reason(exc)}
    (out / "peers.json").write_text(json.dumps(summary, indent=1))


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def run_bergson(folder: Path, corpus: FactCorpus, budget: int, out: Path, summary: dict[str, Any]) -> None:
    """Bergson's defaults and its validation-chosen configuration (`BERGSON_GRID[:budget]`)."""
    relevant = corpus.proponents(corpus.validation)
    grid = BERGSON_GRID[:budget]
    with tempfile.TemporaryDirectory(prefix="q8-bergson-") as tmp:
        work = Path(tmp)
        validation_mrr = [mean_reciprocal_rank(bergson_scores(folder, corpus, corpus.validation, c, work), relevant)
                          for c in grid]
        chosen = grid[int(np.argmax(validation_mrr))]
        for entry, config in (("Bergson, defaults", {}), ("Bergson, tuned", chosen)):
            np.save(out / f"{entry}.npy", bergson_scores(folder, corpus, corpus.evaluated, config, work).numpy())
            summary[entry] = {"params": ", ".join(f"{k}={v}" for k, v in config.items()) or "IndexConfig() defaults",
                              "validation": max(validation_mrr) if entry.endswith("tuned") else None,
                              "grid": {json.dumps(c): m for c, m in zip(grid, validation_mrr, strict=True)}}


if __name__ == "__main__":
    main(sys.argv[1:])
