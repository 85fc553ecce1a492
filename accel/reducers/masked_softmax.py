"""The masked softmax that DynamicViT, ATS and DiffRate share: attention over a keep-mask of keys.

All three reference implementations call the same function (DynamicViT, Rao et al., NeurIPS 2021,
Sec. 3.3 "attention masking"; reused by ATS, Fayyaz et al., ECCV 2022 and DiffRate, Chen et al.,
ICCV 2023). With ``p_j`` in {0, 1} the keep-mask over keys and ``M_ij = p_j + (1 - p_j)·δ_ij`` (a
dropped token still attends to itself):

    a_ij = (exp(s_ij - max_k s_ik)·M_ij + eps/N) / (Σ_k exp(s_ik - max_k s_ik)·M_ik + eps)

computed in float32 and cast back to the logits' dtype. The max runs over every key, masked ones
included, and N counts every key. Because of the two eps terms this is *not* a plain softmax even
when nothing is masked (every weight moves by O(eps)); it is kept as the authors wrote it so that
parity with their outputs holds to float precision.
"""
from __future__ import annotations

import torch


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The authors' ``softmax_with_policy`` over the last dimension of ``logits``.

    ``logits`` [B, H, Nq, N]: query ``i`` is token ``i`` (so a [CLS] row is ``Nq = 1``);
    ``keep`` [B, N] or [B, N, 1]: 1 (or True) for the keys that may be attended to.
    """
    B, _, nq, n = logits.shape
    p = keep.reshape(B, 1, 1, n).to(torch.float32)
    eye = torch.eye(nq, n, dtype=torch.float32, device=logits.device).view(1, 1, nq, n)
    mask = p + (1.0 - p) * eye
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.to(torch.float32).exp() * mask
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)
