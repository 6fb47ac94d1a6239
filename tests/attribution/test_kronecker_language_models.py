"""K-FAC/EK-FAC on Hugging Face causal LMs: GPT-2's `Conv1D` (weight stored `[in, out]`, the
transpose of `nn.Linear`'s), the real-token mean of the activation factor on right-padded rows,
the default layer scope (linear layers of the blocks; embeddings and the output layer left
out), and `influence` choosing EK-FAC for an LM above `exact_max_params`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attribution import curvature
from attribution.curvature import CurvatureOperator
from attribution.data import TensorTrainingSet
from attribution.ihvp import EKFACIHVP, build_estimator
from attribution.ihvp.kfac import KFACIHVP, KroneckerLayer, is_conv1d
from attribution.ihvp.kronecker_scope import (
    EMBEDDING,
    OUTPUT_LAYER,
    TIED_EMBEDDING,
    language_model_scope,
)
from attribution.methods.base import FitContext
from attribution.methods.influence import InfluenceFunction, InfluenceParams
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import CausalLMTask, ClassificationTask
from tests.language_models import CORPUS, causal_lm, word_tokenizer

DAMPING = 0.05


def _rows(texts: list[str]) -> TensorTrainingSet:
    """Right-padded token rows without an attention mask, targets −100 at padding (as the workers batch them)."""
    ids = word_tokenizer()(texts)["input_ids"]
    length = max(len(row) for row in ids)
    tokens = torch.zeros(len(ids), length, dtype=torch.long)
    targets = torch.full((len(ids), length), -100, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
        targets[i, : len(row)] = torch.tensor(row)
    return TensorTrainingSet({"input_ids": tokens}, targets)


def _gpt2(seed: int = 0) -> tuple[ModelAdapter, TensorTrainingSet]:
    module = causal_lm("gpt2", seed=seed)
    return ModelAdapter(module, CausalLMTask(), layers=language_model_scope(module).layers), _rows(CORPUS)


def _as_linear(module: nn.Module) -> nn.Module:
    """A copy of `module` with every `Conv1D` (`y = a W + b`, W `[in, out]`) replaced by the
    equal `nn.Linear` (weight `Wᵀ`, `[out, in]`)."""
    clone = copy.deepcopy(module)
    for name, sub in list(clone.named_modules()):
        if is_conv1d(sub):
            weight = sub.weight.detach()
            linear = nn.Linear(weight.shape[0], weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                linear.bias.copy_(sub.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent), child, linear)
    return clone


def _to_linear_layout(vectors: torch.Tensor, conv: list[KroneckerLayer]) -> torch.Tensor:
    """`[M, P]` in the Conv1D model's flat layout → the nn.Linear copy's (weight blocks transposed)."""
    out = vectors.clone()
    for layer in conv:
        block = vectors[:, layer.weight].reshape(-1, layer.in_features, layer.out_features)
        out[:, layer.weight] = block.transpose(1, 2).reshape(vectors.shape[0], -1)
    return out


def _flat_index(layer: KroneckerLayer) -> torch.Tensor:
    """Flat indices of the layer's `[out, in + 1]` matrix `[W | b]` in row-major order, read
    from the parameter's own storage layout (Conv1D: `W[i, o]` at `weight.start + i·out + o`)."""
    o = torch.arange(layer.out_features)[:, None]
    i = torch.arange(layer.in_features)[None, :]
    weight = layer.weight.start + (i * layer.out_features + o if layer.transposed else o * layer.in_features + i)
    assert layer.bias is not None
    bias = torch.arange(layer.bias.start, layer.bias.stop)[:, None]
    return torch.cat([weight, bias], dim=1).reshape(-1)


def test_the_default_scope_tracks_the_blocks_linear_layers_and_says_what_it_leaves_out() -> None:
    gpt2 = language_model_scope(causal_lm("gpt2"))
    assert gpt2.layers == ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                           "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")
    assert gpt2.untracked["transformer.wte.weight"] == TIED_EMBEDDING  # lm_head shares it
    assert gpt2.untracked["transformer.wpe.weight"] == EMBEDDING
    assert "transformer.ln_f.weight" in gpt2.untracked
    llama = language_model_scope(causal_lm("llama"))
    assert llama.untracked["lm_head.weight"] == OUTPUT_LAYER  # untied: its S factor is V × V
    assert len(llama.layers) == 7 and all(p.startswith("model.layers.0.") for p in llama.layers)
    module = causal_lm("llama")
    tracked = {n for n, p in module.named_parameters()} - set(llama.untracked)
    assert tracked == {n for n, _ in module.named_parameters() if n.rpartition(".")[0] in llama.layers}


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_conv1d_layers_give_the_factors_and_solves_of_their_linear_transpose(name: str) -> None:
    """GPT-2 with its Conv1D layers and the same network with equal nn.Linear layers (transposed
    weights): the same Kronecker factors, and solves that agree once the weight blocks are
    transposed — so influence scores `g_qᵀ (G + λI)⁻¹ g_i` are identical."""
    model, train = _gpt2()
    linear = ModelAdapter(_as_linear(model.module), CausalLMTask(), layers=model.layers)
    conv_est = build_estimator(name, CurvatureOperator(model, batch_size=4, seed=3), DAMPING)
    lin_est = build_estimator(name, CurvatureOperator(linear, batch_size=4, seed=3), DAMPING)
    assert isinstance(conv_est, KFACIHVP) and isinstance(lin_est, KFACIHVP)
    assert [layer.transposed for layer in conv_est.layers] == [True] * 4
    assert [layer.transposed for layer in lin_est.layers] == [False] * 4
    conv_est.fit(train)
    lin_est.fit(train)
    for i in range(4):
        for factor in ("a", "s"):
            q, values = conv_est.state[f"l{i}.q{factor}"], conv_est.state[f"l{i}.l{factor}"]
            q2, values2 = lin_est.state[f"l{i}.q{factor}"], lin_est.state[f"l{i}.l{factor}"]
            torch.testing.assert_close(q * values @ q.T, q2 * values2 @ q2.T, rtol=1e-5, atol=1e-9)
    grads = model.per_sample_grads(train.all).double()
    grads_linear = linear.per_sample_grads(train.all).double()
    torch.testing.assert_close(_to_linear_layout(grads, conv_est.layers), grads_linear, rtol=1e-4, atol=1e-7)
    scores = conv_est.solve(grads[:3]) @ grads.T
    scores_linear = lin_est.solve(grads_linear[:3]) @ grads_linear.T
    torch.testing.assert_close(scores, scores_linear, rtol=1e-4, atol=1e-8)
    assert float(scores.abs().max()) > 0


def test_gpt2_ekfac_factors_and_solve_equal_an_explicit_computation() -> None:
    """On a tiny GPT-2 with right-padded rows, each Conv1D layer's
    - activation factor is `A = (1/N) Σ_n mean_{t real} ã ãᵀ` from the layer's inputs;
    - EK-FAC eigenvalues are `Λ* = (1/N) Σ_n (Q_Sᵀ DW_n Q_A)²` with `DW_n = [Wᵀ | b]`-shaped
      blocks of the sampled-Fisher pseudo-gradients (the same seeded ŷ draws);
    - solve equals the dense `(Q diag(Λ*) Qᵀ + λI)⁻¹`, `Q = Q_S ⊗ Q_A`, on the layer's flat
      indices read from the `[in, out]` storage."""
    model, train = _gpt2()
    op = CurvatureOperator(model, batch_size=4, seed=5)
    ekfac = build_estimator("ekfac", op, DAMPING)
    assert isinstance(ekfac, KFACIHVP)
    ekfac.fit(train)
    tokens, targets = train.all.inputs["input_ids"], train.all.targets  # type: ignore[index]
    real = (targets != -100).float()  # rows are right-padded: real tokens are the targets
    inputs: dict[int, torch.Tensor] = {}
    handles = [layer.module.register_forward_hook(lambda _m, a, _o, i=i: inputs.__setitem__(i, a[0].detach()))
               for i, layer in enumerate(ekfac.layers)]
    with torch.no_grad():
        model.task.forward(model.module, {"input_ids": tokens})
    for handle in handles:
        handle.remove()
    replay = CurvatureOperator(model, batch_size=4, seed=5)
    list(replay.pseudo_gradients(batch) for batch in replay.batches(train))  # K-FAC's pass: the same draws
    pseudo = torch.cat([replay.pseudo_gradients(batch) for batch in replay.batches(train)]).double()  # EK-FAC's
    vectors = torch.randn(2, model.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solved = ekfac.solve(vectors)
    for i, layer in enumerate(ekfac.layers):
        acts = torch.cat([inputs[i], torch.ones_like(inputs[i][..., :1])], dim=-1).double()
        weights = real.double() / real.sum(1, keepdim=True)
        expected_a = torch.einsum("bt,bti,btj->ij", weights, acts, acts) / len(train)
        qa, la = ekfac.state[f"l{i}.qa"], ekfac.state[f"l{i}.la"]
        torch.testing.assert_close(qa * la @ qa.T, expected_a, rtol=1e-6, atol=1e-10)
        index = _flat_index(layer)
        blocks = pseudo[:, index].reshape(len(train), layer.out_features, layer.width)
        qs = ekfac.state[f"l{i}.qs"]
        expected_lambda = (qs.T @ blocks @ qa).pow(2).mean(0)
        torch.testing.assert_close(ekfac.state[f"l{i}.lambda"], expected_lambda, rtol=1e-6, atol=1e-12)
        basis = torch.kron(qs, qa)
        system = basis * ekfac.state[f"l{i}.lambda"].reshape(-1) @ basis.T + DAMPING * torch.eye(len(index),
                                                                                                dtype=torch.float64)
        torch.testing.assert_close(solved[:, index], torch.linalg.solve(system, vectors[:, index].T).T,
                                   rtol=1e-6, atol=1e-10)


def test_padding_does_not_enter_the_activation_factor() -> None:
    """The same rows padded to different lengths (in one batch with a longer row, or alone) give
    the same K-FAC factors: padding positions are not averaged into A."""
    model, _ = _gpt2()
    short = _rows(CORPUS[:3])
    padded = _rows([*CORPUS[:3], CORPUS[8]])
    alone = build_estimator("kfac", CurvatureOperator(model, batch_size=1, seed=1), DAMPING)
    alone.bind(short)
    together = build_estimator("kfac", CurvatureOperator(model, batch_size=4, max_rows=3, seed=1), DAMPING)
    together.bind(TensorTrainingSet(padded.all.inputs, padded.all.targets))
    a_alone, a_together = alone.compute_state(), together.compute_state()
    for i in range(4):
        q, values = a_alone[f"l{i}.qa"], a_alone[f"l{i}.la"]
        q2, values2 = a_together[f"l{i}.qa"], a_together[f"l{i}.la"]
        torch.testing.assert_close(q * values @ q.T, q2 * values2 @ q2.T, rtol=1e-5, atol=1e-9)


def _lm(architecture: str) -> ModelAdapter:
    return ModelAdapter(causal_lm(architecture), CausalLMTask())


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_influence_on_an_lm_above_the_exact_limit_uses_ekfac_over_its_linear_layers(architecture: str) -> None:
    """`ihvp: auto` on an LM with more parameters than `exact_max_params`: EK-FAC over the
    blocks' linear layers (reported in extras), and a copied training text ranks first with
    relative scores; at or below the limit, exact over every parameter as before."""
    model, train = _lm(architecture), _rows(CORPUS)
    context = FitContext(f"{architecture}-tiny")
    copied = 6
    scores = attribute(model, "influence", {"exact_max_params": 200}, train, context,
                       queries=train.rows(torch.tensor([copied])))
    assert context.extras["ihvp"] == "ekfac"
    assert context.extras["ihvp_layers"] == list(language_model_scope(model.module).layers)
    assert any("embedding" in reason for reason in context.extras["ihvp_untracked"])
    assert int(scores[0].argmax()) == copied  # relative (the default normalisation)
    small = FitContext(f"{architecture}-tiny")
    InfluenceFunction(model, InfluenceParams.parse({}), small).fit(train)
    assert small.extras["ihvp"] == "exact" and "ihvp_layers" not in small.extras


def test_explicit_layers_and_the_hessian_keep_their_meaning_on_an_lm() -> None:
    model, train = _lm("gpt2"), _rows(CORPUS[:4])
    context = FitContext("gpt2-tiny")
    InfluenceFunction(model, InfluenceParams.parse({"exact_max_params": 200, "layers": ["transformer.h.0.mlp"]}),
                      context).fit(train)
    assert context.extras["ihvp"] == "ekfac" and "ihvp_layers" not in context.extras
    hessian = FitContext("gpt2-tiny")
    InfluenceFunction(model, InfluenceParams.parse({"exact_max_params": 200, "curvature": "hessian",
                                                        "cg_max_iter": 2, "damping": 1.0}), hessian).fit(train)
    assert hessian.extras["ihvp"] == "cg" and "ihvp_layers" not in hessian.extras


def test_pseudo_gradients_split_a_batch_whose_per_row_cotangents_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """`b² K` above `PSEUDO_GRADIENT_COTANGENTS` (a language model's K = T·V logits in batches of
    hundreds of rows: gigabytes) runs the batch in pieces, with the same curvature."""
    model = ModelAdapter(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), ClassificationTask())
    gen = torch.Generator().manual_seed(2)
    train = TensorTrainingSet(torch.randn(20, 5, generator=gen), torch.randint(0, 3, (20,), generator=gen))
    whole = CurvatureOperator(model, batch_size=20).dense(train)
    monkeypatch.setattr("attribution.curvature.PSEUDO_GRADIENT_COTANGENTS", 3 * 3 ** 2)  # 3 rows per piece
    calls: list[int] = []
    original = curvature.per_sample_output_vjp
    monkeypatch.setattr("attribution.curvature.per_sample_output_vjp",
                        lambda m, outputs, *a, **k: calls.append(outputs.shape[0]) or original(m, outputs, *a, **k))
    pieces = CurvatureOperator(model, batch_size=20).dense(train)
    assert max(calls) == 3 and sum(calls) == 20 * 3  # 3 output-Hessian columns per row
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-8)


def test_ekfac_default_damping_reads_the_trace_off_its_eigenvalues() -> None:
    """Σ_l Σ Λ*_l = tr(G) (exact output factors: a classifier), so EK-FAC's default damping
    0.01·tr(G)/P needs no trace pass of its own and equals the one the trace pass gives."""
    gen = torch.Generator().manual_seed(4)
    module = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = ModelAdapter(module, ClassificationTask())
    train = TensorTrainingSet(torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    ekfac = build_estimator("ekfac", CurvatureOperator(model), 1.0)
    ekfac.fit(train)
    assert isinstance(ekfac, EKFACIHVP)
    assert ekfac.trace() == pytest.approx(CurvatureOperator(model).trace(train), rel=1e-6)
    context = FitContext("ekfac-damping")
    InfluenceFunction(model, InfluenceParams.parse({"ihvp": "ekfac"}), context).fit(train)
    assert context.extras["damping"] == pytest.approx(0.01 * ekfac.trace() / model.num_params, rel=1e-6)
