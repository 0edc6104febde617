"""Drafting with an EAGLE-3 head (batch size 1): one midlayer cache, TTT-style steps."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mtpkit.heads.base import Pick
from mtpkit.heads.common import truncate


class Eagle3Drafter:
    """One midlayer cache: step-1 rows 0..N−2 (target features, all inputs verified) are
    committed; steps 2..K run one row each on top of it and are cropped away after drafting."""

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        self.head, self.k, self.dtype, self.pick = head, k, dtype, pick
        self.ids_map = head.draft_to_target()
        self.vocab_size = head.t2d.numel()

    def start(self, features: torch.Tensor) -> None:
        self.pending = features.to(self.dtype)  # target features of rows not yet in the cache
        self.cache = DynamicCache()
        self.committed = 0

    def commit(self, features: torch.Tensor) -> None:
        self.pending = torch.cat([self.pending, features.to(self.dtype)])

    def _pick(self, out: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        logits = self.head.lm_head(self.head.norm(out)).float()
        full = logits.new_full((self.vocab_size,), float("-inf"))
        full[self.ids_map] = logits  # tokens outside the draft vocabulary get probability 0
        return self.pick(full)

    def draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        head, N, c = self.head, len(ids), self.committed
        embed = head.embed_tokens
        # Step 1, rows c..N−2: features f_i and token t_{i+1}, committed to the cache.
        hidden = head.fuse(self.pending)[None]
        embeds = embed(torch.tensor([ids[c + 1 : N]])).to(self.dtype)
        mask = head.causal_mask(N - 1 - c, c, self.dtype)
        out = head.step(embeds, hidden, torch.arange(c, N - 1)[None], mask, self.cache)[0, -1]
        self.pending, self.committed = self.pending[:0], N - 1
        drafts, probs = [], []
        for j in range(1, self.k + 1):
            token, p = self._pick(out)
            drafts.append(token)
            probs.append(p)
            if j == self.k:
                break
            # Step j+1 at position N−2+j reads the last output and the draft just made.
            e = embed(torch.tensor([[token]])).to(self.dtype)
            out = head.step(e, out[None, None], torch.tensor([[N - 2 + j]]), None, self.cache)[0, -1]
        truncate(self.cache, N - 1)
        return drafts, probs
