"""Q8 peers: kronfluence on the same tiny GPT-2 folder and facts as the service study.

Run by `benchmarks.q8_service` in a separate interpreter that has the peer installed
(`Q8_PEER_PYTHON`, see benchmarks/README.md): `python -m benchmarks.q8_peers ROOT SUBJECTS
EVALUATED VALIDATION BUDGET`. It loads `ROOT/model` (the folder the service registered),
rebuilds the same facts (`lm_facts.fact_corpus`, seed 0) and checks that the saved tokenizer
gives exactly the rows it scores, then runs kronfluence's `Analyzer` with its library
defaults (`FactorArguments()`: EK-FAC) and with the best of `budget` factor strategies on
the validation facts. kronfluence tracks `nn.Linear`/`nn.Conv2d` modules only: in GPT-2
that is `lm_head` (tied to the token embeddings); the `Conv1D` blocks are not tracked.
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
        summary["kronfluence"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    (out / "peers.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
