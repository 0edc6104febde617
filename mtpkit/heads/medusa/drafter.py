"""Drafting with Medusa heads: each head's pick on the last processed row, for one sequence or a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpkit.heads.base import Pick
from mtpkit.heads.common import LastRowsState, LastRowState


class MedusaDrafter(LastRowState):
    """Head k's argmax on h_{N−2} drafts t_{N+k−1}: no cache, nothing to roll back."""

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        self.head, self.k, self.dtype, self.pick = head, k, dtype, pick
        self.lm = [head.output_layers(j)[0].weight.detach().to(dtype) for j in range(1, k + 1)]

    def draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        picks = [self.pick(F.linear(self.head.blocks[j](self.last), self.lm[j])) for j in range(self.k)]
        return [t for t, _ in picks], [p for _, p in picks]


class MedusaBatchDrafter(LastRowsState):
    """`MedusaDrafter` for B sequences at once: each head on every row's h_{N−2} in one product."""

    def __init__(self, head, k: int, dtype: torch.dtype, picks: list[Pick], greedy: bool = True):
        self.head, self.k, self.dtype, self.picks, self.greedy = head, k, dtype, list(picks), greedy
        self.lm = [head.output_layers(j)[0].weight.detach().to(dtype) for j in range(1, k + 1)]

    def draft(self, ids: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        logits = [F.linear(self.head.blocks[j](self.last), self.lm[j]) for j in range(self.k)]  # [B, V] each
        if self.greedy:
            return [(t, [None] * self.k) for t in torch.stack([x.argmax(-1) for x in logits], 1).tolist()]
        picked = [[pick(x[b]) for x in logits] for b, pick in enumerate(self.picks)]
        return [([t for t, _ in p], [q for _, q in p]) for p in picked]
