"""Drafting with Medusa heads (batch size 1): each head's pick on the last processed row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpkit.heads.base import Pick
from mtpkit.heads.common import LastRowState


class MedusaDrafter(LastRowState):
    """Head k's argmax on h_{N−2} drafts t_{N+k−1}: no cache, nothing to roll back."""

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        self.head, self.k, self.dtype, self.pick = head, k, dtype, pick
        self.lm = [head.output_layers(j)[0].weight.detach().to(dtype) for j in range(1, k + 1)]

    def draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        picks = [self.pick(F.linear(self.head.blocks[j](self.last), self.lm[j])) for j in range(self.k)]
        return [t for t, _ in picks], [p for _, p in picks]
