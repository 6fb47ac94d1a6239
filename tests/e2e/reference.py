"""Independent reference implementations, written from the papers' equations with plain
PyTorch (no code shared with the product), used to check what the service returns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap


def forward_inf_algorithm1(path: str, xq: Tensor, yq: Tensor, x: Tensor, y: Tensor, steps: int, lr: float) -> Tensor:
    """Forward-INF, Algorithm 1: K plain gradient-ascent steps on the mean query loss, then
    `score_i = L(θ_K, z_i) − L(θ̂, z_i)` for every training row. Returns `[N]`."""
    original = torch.jit.load(path).eval()
    unlearned = torch.jit.load(path).eval()
    params = list(unlearned.parameters())
    for _ in range(steps):
        loss = F.cross_entropy(unlearned(xq), yq)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(lr * g)
    with torch.no_grad():
        return F.cross_entropy(unlearned(x), y, reduction="none") - F.cross_entropy(original(x), y, reduction="none")


def gauss_newton_influence(model: nn.Module, xq: Tensor, yq: Tensor, x: Tensor, y: Tensor, damping: float) -> Tensor:
    """`∇L_qᵀ (G + λI)⁻¹ ∇L_i` with the exact Gauss-Newton matrix of the mean training loss,
    `G = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i` (J_i: logits Jacobian). Returns `[N]` (float64)."""
    model = model.double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def logits(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(logits(p, xi).unsqueeze(0), yi.unsqueeze(0))

    def flat(tree: dict[str, Tensor], lead: int) -> Tensor:
        return torch.cat([tree[n].reshape(lead, -1) if lead else tree[n].reshape(-1) for n in names], dim=-1)

    xd, xqd = x.double(), xq.double()
    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, xd)  # {name: [N, C, *shape]}
    n, c = xd.shape[0], next(iter(jac.values())).shape[1]
    j = torch.cat([jac[k].reshape(n, c, -1) for k in names], dim=2)  # [N, C, P]
    with torch.no_grad():
        p = torch.softmax(functional_call(model, params, (xd,)), dim=1)  # [N, C]
    sqrt_p = p.sqrt()
    b = torch.diag_embed(sqrt_p) - sqrt_p.unsqueeze(2) * p.unsqueeze(1)  # BᵀB = diag(p) − ppᵀ
    m = torch.bmm(b, j).reshape(n * c, -1)
    gauss_newton = m.T @ m / n
    gauss_newton.diagonal().add_(damping)
    grad_train = vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xd, y)
    grad_query = vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xqd, yq)
    g_q = flat(grad_query, xqd.shape[0]).mean(dim=0)
    solved = torch.linalg.solve(gauss_newton, g_q)
    return flat(grad_train, n) @ solved
