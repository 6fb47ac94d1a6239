"""Forward-INF's unlearning scope: a causal LM's default ascent moves only its token embeddings."""

from __future__ import annotations

import pytest
import torch

from attribution.data import Batch
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.forward_inf import ForwardInf
from attribution.methods.forward_inf_params import ForwardInfParams, UnlearningScope
from attribution.methods.forward_inf_scope import token_embedding_names
from attribution.model import ModelAdapter
from attribution.tasks import CausalLMTask
from tests.language_models import CAUSAL_ARCHITECTURES, causal_lm


def _query(vocab: int) -> Batch:
    """One 6-token query counting its last token."""
    ids = torch.randint(3, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    targets = torch.full_like(ids, -100)
    targets[:, -1] = ids[:, -1]
    return Batch({"input_ids": ids}, targets)


@pytest.mark.parametrize("architecture", CAUSAL_ARCHITECTURES)
def test_token_embeddings_are_the_input_and_output_matrices(architecture: str) -> None:
    module = causal_lm(architecture)
    expected = {id(module.get_input_embeddings().weight), id(module.get_output_embeddings().weight)}
    names = token_embedding_names(module)
    params = dict(module.named_parameters())
    assert {id(params[n]) for n in names} == expected
    assert len(names) == len(expected)  # a tied matrix is listed once


def test_modules_without_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match="token embeddings"):
        token_embedding_names(torch.nn.Linear(3, 2))


@pytest.mark.parametrize("architecture", CAUSAL_ARCHITECTURES)
def test_the_causal_lm_default_ascent_moves_only_the_token_embeddings(architecture: str) -> None:
    module = causal_lm(architecture).eval()
    model = ModelAdapter(module, CausalLMTask())
    query = _query(module.config.vocab_size)
    embeddings = set(token_embedding_names(module))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def moved(params: ForwardInfParams) -> set[str]:
        method = ForwardInf(model, params, FitContext(f"scope:{architecture}"))
        after = dict(method.unlearned_copy(method.settings, query).module.named_parameters())
        return {n for n, p in before.items() if not torch.equal(after[n].detach(), p)}

    default = ForwardInf(model, ForwardInfParams(), FitContext("scope"))
    assert default.settings.scope is UnlearningScope.EMBEDDINGS
    assert set(default.tracked.param_names) == embeddings  # relative norms and self-influence: same parameters
    assert moved(ForwardInfParams()) == embeddings
    everything = moved(ForwardInfParams(scope=UnlearningScope.ALL))
    assert embeddings < everything and any(".mlp." in n for n in everything)


def test_scope_defaults_and_validation() -> None:
    assert ForwardInfParams().for_task("classification").scope is UnlearningScope.ALL
    assert ForwardInfParams().for_task("causal_lm").scope is UnlearningScope.EMBEDDINGS
    named = ForwardInfParams.from_dict({"layers": ["transformer.h"]}).for_task("causal_lm")
    assert named.scope is UnlearningScope.ALL and named.layers == ("transformer.h",)
    with pytest.raises(ParamsError, match=r"params\.layers"):
        ForwardInfParams.from_dict({"layers": ["transformer.h"], "scope": "embeddings"})
    with pytest.raises(ParamsError, match=r"params\.scope"):
        ForwardInfParams.from_dict({"scope": "blocks"})
