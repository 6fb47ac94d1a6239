"""P8 — language models: a Forward-INF query's tokens/second vs plain batched inference.

A GPT-2 (4 layers, 128 wide; quick: 1 × 32; random weights — speed does not depend on training) saved
with `save_pretrained` default settings (SDPA attention) with a word-level tokenizer beside
it, and N text rows of 16–48 words in `.jsonl` shards. Both sides load what the worker
loads — the module from the folder (`loading.build_module`), its tokenizer, and the
rows through `loading.ShardedTrainingSet` (tokenized, right-padded, token-budget
batches, prefetching) — with the same batch size:
- plain inference: the Hugging Face forward `module(input_ids=...)` (the model's own causal
  masking) and the per-row mean next-token cross-entropy over non-padding tokens, under
  `torch.inference_mode()`;
- Forward-INF: one new joint `{"prompt", "completion"}` query through
  `attribution.pipeline.attribute` with the causal-LM defaults (normalised ascent until the
  query is forgotten) but raw scores: the default relative scores run the same sweep and then
  divide by an `[N]` vector cached once per model and data (per-sample gradient norms, a
  backward pass per row — minutes on this shared CPU, so left out), with the base losses
  cached beforehand, so the call is the unlearning steps + one sweep + subtraction.
Tokens/second = non-padding tokens of the N rows ÷ the call's seconds. Repetitions alternate
the two sides with one intra-op thread; the ratio of median CPU seconds is the headline
(target ≥ 0.9), the wall-time ratio is beside it.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from attribution.artifacts import InMemoryArtifacts
from attribution.methods.base import FitContext
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import CausalLMTask
from benchmarks.cli import Options, Stopwatch, run_study
from benchmarks.lm_folder import word_tokenizer
from benchmarks.report import Report
from benchmarks.speed_common import (
    Clock,
    Repetitions,
    add_repetition_tables,
    machine,
    median_seconds,
    torch_threads,
)
from loading import ShardedTrainingSet
from loading.model_inputs import InputSpec, rows_to_batch
from loading.models import build_module, load_tokenizer_from
from loading.rows import Rows
from loading.shards import ShardSpec

STUDY = "p8_lm_sweep"
TARGET = 0.9
BATCH = 64
WORDS = [f"w{i}" for i in range(500)]
PROMPT, COMPLETION = "w1 w2 w3 w4 w5 w6", " w7"


def write_folder(root: Path, *, rows: int, width: int, layers: int,
                 shards: int = 4) -> tuple[Path, list[ShardSpec], int]:
    """The model folder, the jsonl shards and their non-padding token count (incl. `<bos>`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = ["<pad>", "<bos>", *WORDS]
    torch.manual_seed(0)
    module = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab) + 1, n_positions=64, n_embd=width, n_layer=layers, n_head=4,
                                        bos_token_id=1, eos_token_id=1, pad_token_id=0))
    folder = root / "model"
    module.save_pretrained(folder)
    word_tokenizer(vocab, 64).save_pretrained(folder)
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(16, 48))) for _ in range(rows)]
    per = -(-rows // shards)
    specs = []
    for s in range(shards):
        chunk = texts[s * per: (s + 1) * per]
        path = root / f"train-{s}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
        specs.append(ShardSpec(path, "jsonl", len(chunk)))
    return folder, specs, sum(len(t.split()) + 1 for t in texts)


def plain_inference(module: torch.nn.Module, train: ShardedTrainingSet, batch_size: int) -> torch.Tensor:
    """`[N]` mean next-token cross-entropy per row with the model's own forward: the floor."""
    out = torch.empty(len(train))
    with torch.inference_mode():
        for start, batch in train.batches(batch_size):
            if not isinstance(batch.inputs, Mapping):
                raise TypeError("text rows come as a mapping of token tensors")
            ids = batch.inputs["input_ids"]
            logits = module(input_ids=ids).logits[:, :-1]
            labels = batch.targets[:, 1:]
            token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                    reduction="none").reshape(labels.shape)
            out[start:start + len(ids)] = token.sum(1) / (labels != -100).sum(1).clamp(min=1)
    return out


def run(options: Options) -> Report:
    n, width, layers, repeats = (200, 32, 1, 2) if options.quick else (4_000, 128, 4, 3)
    report = Report(STUDY, "P8 — Forward-INF sweep vs plain inference on a language model", options.quick)
    with tempfile.TemporaryDirectory(prefix="p8-") as tmp:
        folder, specs, tokens = write_folder(Path(tmp), rows=n, width=width, layers=layers)
        module = build_module(folder, "hf", "causal_lm", architecture=None, allowlist=[])
        tokenizer = load_tokenizer_from(folder)
        adapter = ModelAdapter(module, CausalLMTask())
        train = ShardedTrainingSet(specs, task="causal_lm", tokenizer=tokenizer, max_length=64)
        spec = InputSpec(task=train.spec.task, token_inputs=True, tokenizer=tokenizer, max_length=64)
        query = rows_to_batch(Rows(text=[PROMPT + COMPLETION], prompt=[PROMPT]), spec)
        params = {"batch_size": BATCH, "normalize": "none"}  # relative: the same sweep, then ÷ a cached [N] vector
        context = FitContext(fingerprint="p8", store=InMemoryArtifacts())
        with Stopwatch() as first:  # caches L(θ̂, ·) and the RelatIF norms, as a worker does once
            attribute(adapter, "forward_inf", params, train, context, queries=query)
        plain_inference(module, train, BATCH)  # warm-up
        plain_c: Repetitions = []
        finf_c: Repetitions = []
        with torch_threads(1):
            for _ in range(repeats):
                with Clock() as c:
                    floor = plain_inference(module, train, BATCH)
                plain_c.append((c.wall, c.cpu))
                with Clock() as c:
                    scores = attribute(adapter, "forward_inf", params, train, context, queries=query)
                finf_c.append((c.wall, c.cpu))
        timings, extras = dict(context.timings), dict(context.extras)
    if scores.shape != (1, n) or not bool(torch.isfinite(floor).all()):
        raise RuntimeError("unexpected output shapes")

    plain, finf = median_seconds(plain_c), median_seconds(finf_c)
    ratio, wall_ratio = plain / finf, median_seconds(plain_c, cpu=False) / median_seconds(finf_c, cpu=False)
    report.setup = (
        f"N = {n:,} text rows (16–48 random words each, {tokens:,} tokens with `<bos>`) in {len(specs)} `.jsonl` "
        f"shards; GPT-2 {layers} layers × {width} wide ({adapter.num_params:,} parameters), saved with `save_pretrained` "
        "defaults (SDPA attention) and a word-level tokenizer, loaded by the worker's loaders; batch size "
        f"{BATCH} rows on both sides, fp32, one intra-op thread. Forward-INF: one new joint prompt/completion "
        f"query with the causal-LM defaults, raw scores (unlearning steps taken: {extras.get('unlearning_steps', 'all K of the fixed run')}); "
        f"base losses cached by a first call ({first.seconds:.1f} s). {repeats} alternating repetitions, "
        f"medians. Machine: {machine()}."
    )
    report.figure("Forward-INF tokens/s ÷ plain inference tokens/s (CPU time)", ratio,
                  "1.0 = one forward pass per row", "BENCHMARKS.md P8", f"≥ {TARGET}", ratio >= TARGET)
    report.figure("same ratio in wall time", wall_ratio, "—", "this run")
    report.figure("plain inference, tokens/s (CPU time)", tokens / plain, "—", "this run")
    report.figure("Forward-INF query, tokens/s (CPU time)", tokens / finf, "—", "this run")
    add_repetition_tables(report, {"plain inference": plain_c, "Forward-INF (1 query)": finf_c}, timings)
    report.timing("plain inference (one pass), CPU s", plain, f"{n:,} rows")
    report.timing("Forward-INF, new query (base losses cached)", finf, "unlearning + one sweep")
    for figure in report.missed():
        report.note(f"Missed: {figure.name} = {figure.ours:.3f} (target {figure.target}).")
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
