"""Synthetic facts stated by paraphrased sentences, and a tiny GPT-2 that learns them (Q8).

A fact is (subject, relation, object): a made-up country name (one word, e.g. "kalotor")
with one of four relations — capital (a city of its own), official language (one of 12),
currency (one of 15), region (one of 8): objects other than capitals are shared by many
subjects, so sentences with the query's object but another subject are distractors. Each
relation has six paraphrase templates, all ending with the object. Every fact is stated by
2–5 of its relation's templates, drawn at random (its proponents), and the sentences of all
facts are shuffled into one training set. A query states a fact with a further template
not used for that fact (it is used for other facts, so the model knows the wording): not a
copy of any training sentence.

Tokens: a word-level vocabulary built from the corpus (`<pad>`, `<bos>`, then the words in
sorted order), every sentence `<bos> w₁ … w_T` right-padded to one length. Training rows
count every token (`CausalLMTask` targets = the ids, −100 at padding); a query counts only
its last token, the object (−100 elsewhere), so its loss is −log p(object | prompt).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attribution.data import Batch, TensorTrainingSet
from attribution.model import ModelAdapter
from attribution.tasks import CausalLMTask
from benchmarks.common import Trajectory

SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "va", "zu", "bel", "dan", "fi", "gor", "hal", "ix", "jun", "kep",
             "lum", "nor", "pex", "qua", "sil")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("the capital of {s} is {o}", "{s} has its capital at {o}", "the capital city of {s} is {o}",
                "{s} is governed from the city of {o}", "the seat of government of {s} is {o}",
                "in {s} the capital is {o}"),
    "language": ("the official language of {s} is {o}", "people in {s} speak {o}",
                 "the main language spoken in {s} is {o}", "in {s} most people speak {o}",
                 "the language of {s} is {o}", "residents of {s} mostly speak {o}"),
    "currency": ("the currency of {s} is the {o}", "in {s} people pay with the {o}",
                 "the money used in {s} is the {o}", "the official currency of {s} is the {o}",
                 "shops in {s} take the {o}", "{s} trades in the {o}"),
    "region": ("{s} is located in {o}", "{s} lies in {o}", "{s} is a country in {o}", "the region of {s} is {o}",
               "{s} can be found in {o}", "geographically {s} belongs to {o}"),
}
SHARED_OBJECTS = {"language": 12, "currency": 15, "region": 8}  # pool sizes; capitals are one per subject
PAD, BOS = "<pad>", "<bos>"
MIN_STATEMENTS, MAX_STATEMENTS = 2, 5


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    obj: str


@dataclass
class FactCorpus:
    facts: list[Fact]
    sentences: list[str]  # [N] training sentences
    fact_of: Tensor  # [N] int64: the fact each training sentence states
    query_text: list[str]  # [F] one held-out paraphrase per fact
    vocab: list[str]
    length: int  # tokens per padded row (<bos> included)
    evaluated: Tensor  # [E] facts whose queries are scored
    validation: Tensor  # [V] other facts, only for choosing hyperparameters
    train: TensorTrainingSet

    def queries(self, facts: Tensor) -> Batch:
        """Query rows of `facts` `[Q]`: the held-out paraphrase, only the object counted."""
        return encode([self.query_text[int(f)] for f in facts], self.vocab, self.length, answer_only=True)

    def proponents(self, facts: Tensor) -> Tensor:
        """`[Q, N]` bool: training sentence i states fact q."""
        return self.fact_of.unsqueeze(0) == torch.as_tensor(facts).reshape(-1, 1)


def encode(sentences: list[str], vocab: list[str], length: int, *, answer_only: bool) -> Batch:
    """`{"input_ids", "attention_mask"}` `[B, length]` and targets `[B, length]` (−100 = not counted):
    every token of a training row, or only the last one (the object) of a query."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.full((len(sentences), length), index[PAD], dtype=torch.long)
    targets = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, sentence in enumerate(sentences):
        tokens = torch.tensor([index[BOS]] + [index[w] for w in sentence.split()])
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        if answer_only:
            targets[row, len(tokens) - 1] = tokens[-1]
        else:
            targets[row, : len(tokens)] = tokens
    return Batch({"input_ids": ids, "attention_mask": mask}, targets)


def _names(count: int, syllables: int, used: set[str], rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        word = "".join(rng.choice(SYLLABLES) for _ in range(syllables))
        if word not in used:
            used.add(word)
            out.append(word)
    return out


def fact_corpus(subjects: int, evaluated: int, validation: int, *, seed: int = 0) -> FactCorpus:
    """`subjects` × 4 facts, 2–5 training sentences each; `evaluated` + `validation` facts with queries."""
    rng = random.Random(seed)
    used: set[str] = set()
    names = _names(subjects, 3, used, rng)
    pools = {"capital": _names(subjects, 2, used, rng)}
    pools.update({relation: _names(size, 2, used, rng) for relation, size in SHARED_OBJECTS.items()})
    facts: list[Fact] = []
    sentences: list[str] = []
    fact_of: list[int] = []
    query_text: list[str] = []
    for relation, templates in TEMPLATES.items():
        for k, subject in enumerate(names):
            obj = pools[relation][k] if relation == "capital" else rng.choice(pools[relation])
            fact = Fact(subject, relation, obj)
            order = rng.sample(range(len(templates)), len(templates))
            stated = rng.randint(MIN_STATEMENTS, MAX_STATEMENTS)
            for t in order[:stated]:
                sentences.append(templates[t].format(s=subject, o=obj))
                fact_of.append(len(facts))
            query_text.append(templates[order[stated]].format(s=subject, o=obj))
            facts.append(fact)
    shuffle = rng.sample(range(len(sentences)), len(sentences))
    sentences = [sentences[i] for i in shuffle]
    fact_ids = torch.tensor([fact_of[i] for i in shuffle], dtype=torch.long)
    chosen = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed))[: evaluated + validation]
    words = sorted({w for s in sentences + query_text for w in s.split()})
    length = 1 + max(len(s.split()) for s in sentences + query_text)
    vocab = [PAD, BOS, *words]
    rows = encode(sentences, vocab, length, answer_only=False)
    return FactCorpus(facts, sentences, fact_ids, query_text, vocab, length, chosen[:evaluated], chosen[evaluated:],
                      TensorTrainingSet(rows.inputs, rows.targets))


@dataclass
class TrainedLM:
    module: nn.Module
    trajectory: Trajectory  # TracIn checkpoints
    query_accuracy: float  # evaluated queries whose object is the model's top next token
    train_loss: float  # mean per-sentence loss at the end

    @property
    def model(self) -> ModelAdapter:
        return ModelAdapter(self.module, CausalLMTask())


def tiny_gpt2(vocab_size: int, length: int, *, width: int, layers: int, heads: int = 4) -> nn.Module:
    """A randomly initialised Hugging Face GPT-2 built from its config (no download), no dropout,
    the default attention implementation (SDPA): `CausalLMTask.model_kwargs` passes a 4-D mask,
    which every implementation uses as given, also under `torch.func.vmap`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=length, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
                        pad_token_id=0)
    return GPT2LMHeadModel(config)


def train_lm(corpus: FactCorpus, *, epochs: int, width: int = 64, layers: int = 2, lr: float = 3e-3,
             batch_size: int = 64, checkpoints: int = 5, seed: int = 0) -> TrainedLM:
    """AdamW (no weight decay) on the mean per-sentence `CausalLMTask` loss, seeded mini-batches;
    keeps `checkpoints` evenly spaced copies (the last the final model) with their learning rate."""
    torch.manual_seed(seed)
    module = tiny_gpt2(len(corpus.vocab), corpus.length, width=width, layers=layers)
    model = ModelAdapter(module, CausalLMTask())
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    rows = corpus.train.all
    generator = torch.Generator().manual_seed(seed)
    keep = {round(epochs * (c + 1) / checkpoints) for c in range(checkpoints)}
    trajectory = Trajectory()
    module.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(rows), batch_size):
            optimizer.zero_grad()
            model.loss(rows.select(order[start: start + batch_size])).mean().backward()
            optimizer.step()
        if epoch in keep:
            trajectory.modules.append(copy.deepcopy(module).eval())
            trajectory.lrs.append(lr)
    module.eval()
    return TrainedLM(module, trajectory, answer_accuracy(model, corpus.queries(corpus.evaluated)),
                     float(model.losses(corpus.train).mean()))


@torch.no_grad()
def answer_accuracy(model: ModelAdapter, queries: Batch) -> float:
    """Fraction of query rows whose counted (object) token is the model's most likely next token."""
    logits = model.task.forward(model.module, queries.inputs)  # [Q, T, V]
    row, position = (queries.targets != -100).nonzero(as_tuple=True)
    predicted = logits[row, position - 1].argmax(-1)
    return float((predicted == queries.targets[row, position]).double().mean())
