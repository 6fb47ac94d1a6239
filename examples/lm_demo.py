"""The language-model example: which training sentences taught a small GPT-2 a fact?

`python examples/lm_demo.py build DATA_ROOT` writes `DATA_ROOT/lm-example/`:
- `model/`: a 2-layer GPT-2 trained for a few seconds on made-up facts ("the capital of
  kalor is venmi"), saved with `save_pretrained` default settings (safetensors, SDPA
  attention) and its word-level tokenizer beside it — the folder a user registers;
- `train.jsonl`: the training sentences (`text`, `id`), each fact stated by 2–3 paraphrases;
- `queries.json`: one held-out question per fact as `prompt` + `completion` (a paraphrase
  used for other facts, never for this one) and the rows that state the fact.

`python examples/lm_demo.py query URL DATA_ROOT` registers both with the running service
and POSTs each question as `{"prompt": [...], "completion": [...]}` with `forward_inf` and
no params (the default answer), prints the top rows with their text, marks the sentences
stating the fact, and reports how often one of them ranks first.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import torch
from demo_support import check, main, poll

SUBJECTS = 12
TEMPLATES = ("the capital of {s} is {o}", "{s} has its capital at {o}", "the seat of government of {s} is {o}",
             "in {s} the capital is {o}", "{s} is governed from {o}")
SYLLABLES = ("ka", "lor", "ven", "mi", "tas", "ru", "bel", "don", "fi", "zar", "qu", "ix")


def _corpus(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """Training rows and, per fact, a held-out question with the rows that state the fact."""
    names: set[str] = set()
    while len(names) < 2 * SUBJECTS:
        names.add("".join(rng.sample(SYLLABLES, 2)))
    ordered = sorted(names)
    rng.shuffle(ordered)
    rows: list[dict[str, str]] = []
    facts = []
    for subject, capital in zip(ordered[:SUBJECTS], ordered[SUBJECTS:], strict=True):
        order = rng.sample(range(len(TEMPLATES)), len(TEMPLATES))
        stated = order[: rng.randint(2, 3)]
        facts.append((subject, capital, stated, order[len(stated)]))
    for subject, capital, stated, _ in facts:
        rows += [{"text": TEMPLATES[t].format(s=subject, o=capital)} for t in stated]
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"sentence-{i:03d}"
    questions = []
    for subject, capital, _, held_out in facts:
        prompt = TEMPLATES[held_out].format(s=subject, o="").rstrip()
        stating = [i for i, row in enumerate(rows) if subject in row["text"].split()]
        questions.append({"prompt": prompt, "completion": f" {capital}", "stating": stating})
    return rows, questions


def _tokenizer(words: list[str]) -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", model_max_length=32)


def build(data_root: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = data_root / "lm-example"
    out.mkdir(parents=True, exist_ok=True)
    rows, questions = _corpus(random.Random(0))
    words = sorted({w for r in rows for w in r["text"].split()} | {w for q in questions for w in str(q["prompt"]).split()})
    tokenizer = _tokenizer(words)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words) + 3, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                       bos_token_id=2, eos_token_id=2, pad_token_id=0))
    encoded = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")  # type: ignore[operator]
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")  # type: ignore[attr-defined]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "queries.json").write_text(json.dumps(questions, indent=1))
    print(f"built {out}: a GPT-2 with {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(rows)} training sentences, {len(questions)} questions")
    return out


def query(url: str, data_root: Path) -> int:
    """Ask every question; the number whose first-ranked row states the fact."""
    example = data_root / "lm-example"
    questions = json.loads((example / "queries.json").read_text())
    with httpx.Client(base_url=url, timeout=60) as client:
        model = check(client.post("/v1/models", json={
            "name": "facts-gpt2", "uri": (example / "model").resolve().as_uri(), "format": "hf",
            "task": "causal_lm"}))
        dataset = check(client.post("/v1/datasets", json={
            "name": "facts", "shards": [{"uri": (example / "train.jsonl").resolve().as_uri()}]}))
        found = 0
        for question in questions:
            body = {"model_id": model["id"], "dataset_id": dataset["id"], "method": "forward_inf", "top_k": 3,
                    "samples": {"prompt": [question["prompt"]], "completion": [question["completion"]]}}
            result = poll(client, check(client.post("/v1/queries", json=body))["id"])
            top = result["result"]["top"]
            found += top[0]["index"] in question["stating"]
            print(f"\n{question['prompt']!r} -> {question['completion']!r}")
            for row in top:
                mark = "  <- states the fact" if row["index"] in question["stating"] else ""
                print(f"  #{row['rank']} {row['preview']!r} (score {row['score']:+.4f}){mark}")
        print(f"\nquestions whose first row states the fact: {found}/{len(questions)}")
    return found


if __name__ == "__main__":
    main(__doc__, build, query)
