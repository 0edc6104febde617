"""Drafting with a block-diffusion head: one denoised block per step, for one sequence or a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpkit.heads.base import Pick
from mtpkit.heads.common import LastRowsState, LastRowState


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


class DiffusionBatchDrafter(LastRowsState):
    """`DiffusionDrafter` for B sequences at once: greedy drafting denoises every row's block in
    the same S passes; sampling (which `denoise` does one block at a time) runs row by row."""

    def __init__(self, head, k: int, dtype: torch.dtype, picks: list[Pick], greedy: bool = True):
        self.head, self.k, self.dtype, self.picks, self.greedy = head, k, dtype, list(picks), greedy
        self.lm_weight = head.lm_head.weight.detach().to(dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lm_weight)

    def draft(self, ids: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        head, steps = self.head, self.head.cfg.denoising_steps
        anchor = torch.tensor([x[-1] for x in ids], device=self.last.device)
        if self.greedy:
            tokens, _, _ = head.denoise(self.last, anchor, steps, self._logits)
            return [(t[: self.k], [None] * self.k) for t in tokens.tolist()]
        out = []
        for b, pick in enumerate(self.picks):
            tokens, _, probs = head.denoise(
                self.last[b : b + 1], anchor[b : b + 1], steps, self._logits, pick
            )
            out.append((tokens[0, : self.k].tolist(), probs[: self.k]))
        return out
