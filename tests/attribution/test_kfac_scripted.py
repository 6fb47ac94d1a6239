"""K-FAC/EK-FAC on TorchScript modules (factors from per-sample gradients, no forward hooks):
the same Kronecker factors and influence scores as the eager module, static refusal of what
cannot be factored, and `auto` falling back to CG on a layer that breaks K-FAC at run time."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from attribution.artifacts import InMemoryArtifacts
from attribution.curvature import CurvatureOperator
from attribution.data import Batch, TensorTrainingSet
from attribution.ihvp import build_estimator
from attribution.ihvp.kfac import unsupported_parameters
from attribution.ihvp.kfac_scripted import KroneckerStructureError
from attribution.methods.base import FitContext
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.structure import ModelStructure
from attribution.tasks import ClassificationTask


def exported(module: nn.Module) -> torch.jit.ScriptModule:
    """`module` scripted, saved and loaded back (what the service registers)."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(copy.deepcopy(module)), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def problem(seed: int = 0) -> tuple[nn.Module, TensorTrainingSet]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    return module, TensorTrainingSet(torch.randn(150, 5, generator=gen), torch.randint(0, 3, (150,), generator=gen))


def factors(state: dict[str, torch.Tensor], layers: int) -> list[torch.Tensor]:
    """Every layer's A and S rebuilt from their eigendecompositions (eigenvector signs are arbitrary)."""
    out = []
    for i in range(layers):
        for name in ("a", "s"):
            q, values = state[f"l{i}.q{name}"], state[f"l{i}.l{name}"]
            out.append(q @ torch.diag(values) @ q.T)
    return out


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_torchscript_factors_equal_the_eager_ones(name: str) -> None:
    module, train = problem()
    states = []
    for candidate in (module, exported(module)):
        estimator = build_estimator(name, CurvatureOperator(ModelAdapter(candidate, ClassificationTask()),
                                                            batch_size=100), 0.1)
        estimator.fit(train)
        states.append(estimator.state)
    for eager, script in zip(factors(states[0], 3), factors(states[1], 3), strict=True):
        torch.testing.assert_close(script, eager, rtol=1e-5, atol=1e-7 * float(eager.abs().max()))
    if name == "ekfac":
        for i in range(3):
            torch.testing.assert_close(states[1][f"l{i}.lambda"], states[0][f"l{i}.lambda"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("layers", [(), ("4",)])
def test_torchscript_influence_scores_equal_the_eager_ones(layers: tuple[str, ...]) -> None:
    module, train = problem(1)
    first = train.rows(torch.arange(3))
    queries = Batch(first.inputs + 0.1, first.targets)
    scores = []
    for candidate in (module, exported(module)):
        context = FitContext("kfac-" + type(candidate).__name__, store=InMemoryArtifacts())
        scores.append(attribute(ModelAdapter(candidate, ClassificationTask()), "influence",
                                {"ihvp": "ekfac", "damping": 0.01, "layers": list(layers)}, train, context,
                                queries=queries, per_sample=True))
        assert context.extras["ihvp"] == "ekfac"
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-4 * float(scores[0].abs().max()))


class Mixed(nn.Module):
    """A convolution, a bias-free linear layer, a linear layer used twice and a supported one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.nobias = nn.Linear(8, 4, bias=False)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        h = self.shared(torch.tanh(self.shared(torch.tanh(self.nobias(h)))))
        return self.head(h)


def test_unsupported_parameters_are_named_statically() -> None:
    unsupported = unsupported_parameters(exported(Mixed()))
    assert "convolution" in unsupported["conv.weight"] and "convolution" in unsupported["conv.bias"]
    assert "without a trainable bias" in unsupported["nobias.weight"]
    assert "more than once" in unsupported["shared.weight"]
    assert "head.weight" not in unsupported and "head.bias" not in unsupported
    assert unsupported_parameters(Mixed()) == {}  # eager: hooks factor all of them (sharing fails at fit)
    normed = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    assert set(unsupported_parameters(normed)) == {"1.weight", "1.bias"}


def test_structure_refuses_kfac_and_names_what_works() -> None:
    structure = ModelStructure.from_dict(ModelStructure.of_module(exported(Mixed())).to_dict())
    problem_text = structure.kfac_problem(())
    assert problem_text is not None and "conv.weight" in problem_text and "['head']" in problem_text
    assert structure.kfac_problem(("head",)) is None
    assert structure.layers_problem(("nope",)) is not None and structure.layers_problem(("head",)) is None
    model = ModelAdapter(exported(Mixed()), ClassificationTask())
    with pytest.raises(ValueError, match=r"conv\.weight"):
        build_estimator("kfac", CurvatureOperator(model), 0.1)


class Sequence(nn.Module):
    """A linear layer applied at every position of `[B, T, in]` rows (T = 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.token(x.reshape(x.shape[0], 3, 4))).mean(1))


def test_several_positions_per_row_fail_ekfac_and_auto_falls_back_to_cg() -> None:
    gen = torch.Generator().manual_seed(3)
    train = TensorTrainingSet(torch.randn(40, 12, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    model = ModelAdapter(exported(Sequence()), ClassificationTask())
    queries = train.rows(torch.arange(2))
    with pytest.raises(KroneckerStructureError, match="not rank one"):
        attribute(model, "influence", {"ihvp": "ekfac"}, train, FitContext("seq"), queries=queries)
    context = FitContext("seq-auto")
    scores = attribute(model, "influence", {"ihvp": "auto", "exact_max_params": 10}, train, context, queries=queries)
    assert context.extras["ihvp"] == "cg" and "not rank one" in context.extras["ihvp_fallback"]
    assert bool(torch.isfinite(scores).all())
