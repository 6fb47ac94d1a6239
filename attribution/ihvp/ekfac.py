"""EK-FAC: K-FAC's eigenbasis with re-fitted eigenvalues (George, Laurent, Bouthillier,
Ballas & Vincent 2018; Grosse et al. 2023, "Studying Large Language Model Generalization
with Influence Functions").

K-FAC's curvature `S ⊗ A` has eigenvalues `Λ_S Λ_Aᵀ` in the Kronecker eigenbasis
`Q_S ⊗ Q_A`; EK-FAC keeps the basis and replaces them by the curvature's actual second
moments along it (a second pass over the rows):

    Λ*_{oi} = (1/N) Σ_n E_ŷ[(Q_Sᵀ DW_n Q_A)²_{oi}],   DW_n = Σ_t g_{nt} ã_{nt}ᵀ ∈ ℝ^{out×in(+1)},

the expectation over the predictive distribution taken exactly through the output-Hessian
square-root columns (see `attribution.ihvp.kfac`). Then, per layer,

    (G + λI)⁻¹ vec(X) ≈ vec(Q_S [(Q_Sᵀ X Q_A) ⊘ (Λ* + λ)] Q_Aᵀ).

Λ* is the diagonal of the layer's exact curvature block in that basis, so EK-FAC is never
worse than K-FAC in Frobenius norm (George et al., Theorem). Same limitations as K-FAC.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.ihvp.kfac import KFACIHVP, layer_statistics

_ROW_CHUNK = 16


class EKFACIHVP(KFACIHVP):
    """State: K-FAC's per-layer eigenbases plus `l{l}.lambda` `[out, in(+1)]` fitted eigenvalues."""

    name = "ekfac"

    def compute_state(self) -> dict[str, Tensor]:
        state = self.kronecker_factors()
        sums = [torch.zeros(lay.out_features, lay.width, dtype=torch.float64) for lay in self.layers]
        rows = 0
        for count, acts, grads, _ in layer_statistics(self.curvature, self.layers, self.train):
            rows += count
            for i in range(len(self.layers)):
                qa, qs = state[f"l{i}.qa"], state[f"l{i}.qs"]
                a = acts[i].double().cpu() @ qa  # [B, T, in] rotated activations
                g = grads[i].double().cpu() @ qs  # [R, B, T, out] rotated output gradients
                for start in range(0, count, _ROW_CHUNK):  # bounds the [R, b, out, in] memory
                    rows_a, rows_g = a[start: start + _ROW_CHUNK], g[:, start: start + _ROW_CHUNK]
                    per_sample = torch.einsum("rbto,bti->rboi", rows_g, rows_a)  # Q_Sᵀ DW Q_A per row, column
                    sums[i] += per_sample.pow(2).sum(dim=(0, 1))
        for i in range(len(self.layers)):
            state[f"l{i}.lambda"] = sums[i] / rows
        return state

    def eigenvalues(self, index: int) -> Tensor:
        return self.state[f"l{index}.lambda"]

    def trace(self) -> float:
        """`tr(G)` over the tracked parameters from the fitted state: `Σ_l Σ_{oi} Λ*_{oi}`, since
        `Λ*_l` is the diagonal of `Q_lᵀ G_ll Q_l` (Q_l orthogonal) and the trace only sees the
        diagonal blocks (exact with exact output factors, an unbiased estimate with sampled ones)."""
        return float(sum(float(self.state[f"l{i}.lambda"].sum()) for i in range(len(self.layers))))
