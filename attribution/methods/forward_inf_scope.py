"""Forward-INF's unlearning scope: which parameters the ascent on the query may move.

`scope="embeddings"` restricts Algorithm 1 to the token embeddings E (input and output: one
matrix when tied, as in GPT-2 and small Qwen2; two in Llama):

    θ_{k+1} = θ_k + α P_E g_k / ‖P_E g_k‖₂,        g_k = ∇_θ (1/Q) Σ_q L(θ_k, z_q)

(normalized SGD; P_E zeroes every coordinate outside E), then the same sweep
`score_i = L(θ_K, z_i) − L(θ̂, z_i)`. Why, for a causal LM: the attention and MLP weights are
used by every sentence, so ascent over all parameters also forgets the query's *wording* — the
rows that share its template and answer but state another subject's fact rise nearly as much
as the rows stating the query's fact (Q8: +24 nats on the answer token for such a row vs +18
to +21 for the fact's own sentences). A row of E belongs to one token: ascent in E forgets
the query through its own tokens (its subject's input row, its answer's output row), so the
rows whose loss rises are those that use the same tokens in the same roles. Relative scores
and self-influence use gradients over the same parameters (the method's tracked layers).
"""

from __future__ import annotations

from torch import nn


def token_embedding_names(module: nn.Module) -> list[str]:
    """Names (as `module.named_parameters()` lists them; a tied matrix once) of the token
    embeddings: a Hugging Face model's `get_input_embeddings()` and `get_output_embeddings()`,
    otherwise every `nn.Embedding`. Raises `ValueError` when the module has none."""
    owners: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        found = getattr(module, getter, None)
        owner = found() if callable(found) else None
        if isinstance(owner, nn.Module):
            owners.append(owner)
    if not owners:
        owners = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    wanted = {id(p) for owner in owners for p in owner.parameters()}
    names = [name for name, p in module.named_parameters() if id(p) in wanted and p.requires_grad]
    if not names:
        raise ValueError("scope='embeddings' needs a model with token embeddings (get_input_embeddings or "
                         "nn.Embedding); use scope='all' or name the parameters with `layers`")
    return names
