"""Drafting with a block-diffusion head (batch size 1): one denoised block per step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpkit.heads.base import Pick
from mtpkit.heads.common import LastRowState


class DiffusionDrafter(LastRowState):
    """The block [MASK]×L conditioned on h_{N−2} and t_{N−1}, denoised in S passes; the first K
    of its L tokens are the drafts. Stateless between steps."""

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        self.head, self.k, self.dtype, self.pick, self.greedy = head, k, dtype, pick, greedy
        self.lm_weight = head.lm_head.weight.detach().to(dtype)

    def draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        head = self.head
        tokens, _, probs = head.denoise(
            self.last[None],
            torch.tensor([ids[-1]]),
            head.cfg.denoising_steps,
            lambda h: F.linear(h, self.lm_weight),
            None if self.greedy else self.pick,
        )
        return tokens[0, : self.k].tolist(), probs[: self.k]
