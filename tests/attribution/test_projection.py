"""Random projection: JL inner-product preservation, determinism, streaming = cached."""

from __future__ import annotations

import math

import pytest
import torch

from attribution.projection import ProjectionType, RandomProjector


def vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(ProjectionType))
def test_inner_products_preserved_within_jl_tolerance(kind: ProjectionType) -> None:
    x = vectors(20, 3000, seed=1)
    k = 1024
    projected = RandomProjector(3000, k, seed=7, kind=kind).project(x)
    exact = x @ x.T
    norms = x.norm(dim=1)
    relative_error = (projected @ projected.T - exact).abs() / torch.outer(norms, norms)
    # One pair's error has standard deviation ≈ √(2/k) ≈ 0.044; 210 pairs stay within 5σ.
    assert relative_error.max().item() < 5 * math.sqrt(2 / k)
    # Squared norms concentrate tighter (σ ≈ √(2/k) too, and never sign-flip).
    assert ((projected.norm(dim=1) ** 2 / norms**2) - 1).abs().max().item() < 5 * math.sqrt(2 / k)


@pytest.mark.parametrize("kind", list(ProjectionType))
def test_projected_inner_product_is_unbiased_over_seeds(kind: ProjectionType) -> None:
    x, y = vectors(2, 200, seed=3)
    k, seeds = 16, 400
    estimates = torch.tensor([
        (RandomProjector(200, k, seed=s, kind=kind).project(torch.stack([x, y]))).prod(dim=0).sum().item()
        for s in range(seeds)
    ])
    sigma = x.norm() * y.norm() * math.sqrt(2 / k) / math.sqrt(seeds)
    assert abs(estimates.mean().item() - (x @ y).item()) < 4 * sigma.item()


def test_entries_have_the_documented_scale() -> None:
    k = 64
    rademacher = RandomProjector(500, k, seed=0).matrix()
    assert torch.equal(rademacher.abs(), torch.full_like(rademacher, 1 / math.sqrt(k)))
    assert abs((rademacher > 0).float().mean().item() - 0.5) < 0.02
    gaussian = RandomProjector(500, k, seed=0, kind="gaussian").matrix()
    assert abs(gaussian.var().item() * k - 1) < 0.03
    assert abs(gaussian.mean().item()) < 4 / math.sqrt(k) / math.sqrt(gaussian.numel())


def test_same_seed_same_matrix_other_seed_other_matrix() -> None:
    a = RandomProjector(700, 32, seed=5).matrix()
    assert torch.equal(a, RandomProjector(700, 32, seed=5).matrix())
    assert not torch.equal(a, RandomProjector(700, 32, seed=6).matrix())
    assert not torch.equal(a, RandomProjector(700, 32, seed=5, kind="gaussian").matrix())


@pytest.mark.parametrize("kind", list(ProjectionType))
def test_streamed_blocks_equal_cached_matrix_and_any_batch_size(kind: ProjectionType) -> None:
    dim, k = 2500, 48
    cached = RandomProjector(dim, k, seed=11, kind=kind, block_rows=300)
    streamed = RandomProjector(dim, k, seed=11, kind=kind, block_rows=300, cache_elements=0)
    # The streamed projector generates the same blocks on demand, in any order.
    assert torch.equal(cached.matrix(), streamed.matrix())
    assert torch.equal(streamed.block(3), cached.matrix()[900:1200])
    assert streamed.num_blocks == 9 and streamed.block(8).shape == (100, k)

    x = vectors(50, dim, seed=2)
    reference = x.double() @ cached.matrix().double()
    for projector in (cached, streamed):
        for batch in (1, 7, 50):
            out = torch.cat([projector.project(x[s: s + batch]) for s in range(0, 50, batch)])
            assert out.dtype == torch.float32 and out.shape == (50, k)
            torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)


def test_rejects_bad_shapes_and_dimensions() -> None:
    projector = RandomProjector(10, 4)
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        projector.project(torch.zeros(3, 11))
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        projector.project(torch.zeros(10))
    with pytest.raises(ValueError, match="positive"):
        RandomProjector(0, 4)
    with pytest.raises(ValueError, match="positive"):
        RandomProjector(10, 0)
    with pytest.raises(IndexError):
        projector.block(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_projection_matches_cpu() -> None:
    x = vectors(8, 3000, seed=4)
    cpu = RandomProjector(3000, 64, seed=9, cache_elements=0)
    cuda = RandomProjector(3000, 64, seed=9, cache_elements=0, device="cuda")
    assert torch.equal(cpu.matrix(), cuda.matrix().cpu())
    torch.testing.assert_close(cuda.project(x.cuda()).cpu(), cpu.project(x), rtol=1e-4, atol=1e-4)
