"""The Q8 language model as a user brings it: Hugging Face folders, a tokenizer, jsonl shards.

`save_study_folders(corpus, trained, root)` writes under `root`:
- `model/`: the trained tiny GPT-2 (`save_pretrained` with default settings: safetensors,
  SDPA attention, tied embeddings) and its word-level tokenizer (`word_tokenizer`) beside it;
- `checkpoint-<c>/`: the TracIn checkpoints, saved the same way;
- `train-<s>.jsonl`: the training sentences, `{"text", "id"}` per line, in `shards` shards.

The tokenizer maps the corpus vocabulary to the ids `benchmarks.lm_facts.encode` uses
(`<pad>` 0, `<bos>` 1, the words in sorted order; `<unk>` last) and prepends `<bos>`, so
the service tokenizes a sentence into exactly the rows the in-process study scores.
`query_samples` turns facts into `{"prompt": [...], "completion": [...]}` samples: the
held-out paraphrase without its object, and " " + the object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from benchmarks.lm_facts import BOS, PAD, FactCorpus, TrainedLM

UNK = "<unk>"


def word_tokenizer(vocab: list[str], max_length: int) -> Any:
    """A `PreTrainedTokenizerFast` over whitespace words: id i = `vocab[i]`, `<bos>` prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate([*vocab, UNK])}
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, ids[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   model_max_length=max_length)


def save_study_folders(corpus: FactCorpus, trained: TrainedLM, root: Path, *, shards: int = 2) -> dict[str, Any]:
    """Write the model, checkpoint folders and jsonl shards (module docstring); their paths."""
    from transformers import PreTrainedModel

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(corpus.vocab, corpus.length + 1)

    def save(module: Any, folder: Path) -> Path:
        if not isinstance(module, PreTrainedModel):
            raise TypeError("the study's model is a Hugging Face PreTrainedModel")
        module.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    model = save(trained.module, root / "model")
    checkpoints = [save(m, root / f"checkpoint-{c}") for c, m in enumerate(trained.trajectory.modules)]
    per_shard = -(-len(corpus.sentences) // shards)
    paths = []
    for s in range(shards):
        rows = corpus.sentences[s * per_shard: (s + 1) * per_shard]
        path = root / f"train-{s}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": f"row-{s * per_shard + i}"}) + "\n"
                                for i, t in enumerate(rows)))
        paths.append(path)
    return {"model": model, "checkpoints": checkpoints, "checkpoint_lrs": list(trained.trajectory.lrs),
            "shards": paths}


def query_samples(corpus: FactCorpus, facts: Tensor) -> dict[str, list[str]]:
    """`{"prompt", "completion"}` of the held-out paraphrases of `facts` `[Q]`."""
    prompts, completions = [], []
    for f in facts:
        *words, obj = corpus.query_text[int(f)].split()
        prompts.append(" ".join(words))
        completions.append(f" {obj}")
    return {"prompt": prompts, "completion": completions}
