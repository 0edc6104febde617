"""Drafting with an EAGLE-3 head: one midlayer cache, TTT-style steps, for one sequence or a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mtpkit.data.generation import SlotCache
from mtpkit.heads.base import Pick
from mtpkit.heads.common import attention_mask, truncate


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


class Eagle3BatchDrafter:
    """`Eagle3Drafter` for B sequences at once: one midlayer pass per TTT step for all rows.

    The midlayer cache has one row per sequence (`SlotCache`, column = position). Step 1 writes
    each row's pending rows c_b..N_b − 2 (target features, every input verified), which stay;
    steps 2..K write one column per row at N_b − 2 + j, which the next step overwrites before
    anything attends to it (each query sees the columns up to its own position only), so nothing
    is cropped. The drafts of a row are those `Eagle3Drafter` makes for that sequence alone.
    """

    def __init__(self, head, k: int, dtype: torch.dtype, picks: list[Pick], greedy: bool = True):
        self.head, self.k, self.dtype, self.picks, self.greedy = head, k, dtype, list(picks), greedy
        self.ids_map = head.draft_to_target()
        self.vocab_size = head.t2d.numel()

    def start(self, features: list[torch.Tensor], width: int) -> None:
        self.pending = [f.to(self.dtype) for f in features]  # target features not yet in the cache
        self.committed = [0] * len(features)
        # step 1 may pad a row up to the longest pending run: room for it past the last position
        self.cache = SlotCache(len(features), width + 2 * self.k + 2)

    def commit(self, features: list[torch.Tensor]) -> None:
        self.pending = [torch.cat([p, f.to(self.dtype)]) for p, f in zip(self.pending, features, strict=True)]

    def select(self, rows: list[int]) -> None:
        self.cache.select(torch.tensor(rows, device=self.pending[0].device))
        self.pending = [self.pending[b] for b in rows]
        self.committed = [self.committed[b] for b in rows]
        self.picks = [self.picks[b] for b in rows]

    def _run(self, embeds: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache.decode(torch.arange(len(pos), device=pos.device), pos)
        allowed = torch.arange(self.cache.span, device=pos.device)[None, None, :] <= pos[:, :, None]
        mask = attention_mask(allowed[:, None], self.head.config, self.dtype)
        return self.head.step(embeds, hidden, pos, mask, self.cache)

    def _pick(self, out: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        logits = self.head.lm_head(self.head.norm(out)).float()
        full = logits.new_full((len(out), self.vocab_size), float("-inf"))
        full[:, self.ids_map] = logits  # tokens outside the draft vocabulary get probability 0
        if self.greedy:
            return [(t, None) for t in full.argmax(-1).tolist()]
        return [pick(full[b]) for b, pick in enumerate(self.picks)]

    def draft(self, ids: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        head, embed = self.head, self.head.embed_tokens
        device = self.pending[0].device
        B, N, c = len(ids), [len(x) for x in ids], self.committed
        q = torch.tensor([len(p) for p in self.pending], device=device)  # rows c_b..N_b − 2
        Q = int(q.max())
        # Step 1: features f_i and token t_{i+1} of the pending rows, padded to the longest.
        feats = torch.stack([F.pad(p, (0, 0, 0, 0, 0, Q - len(p))) for p in self.pending])
        tokens = torch.tensor([x[c[b] + 1 :] + [0] * (Q - len(x) + c[b] + 1) for b, x in enumerate(ids)])
        pos = torch.tensor(c, device=device)[:, None] + torch.arange(Q, device=device)
        out = self._run(embed(tokens.to(device)).to(self.dtype), head.fuse(feats), pos)
        out = out[torch.arange(B, device=device), q - 1]
        self.pending = [p[:0] for p in self.pending]
        self.committed = [n - 1 for n in N]
        drafts: list[list[int]] = [[] for _ in ids]
        probs: list[list[torch.Tensor | None]] = [[] for _ in ids]
        for j in range(1, self.k + 1):
            for b, (token, p) in enumerate(self._pick(out)):
                drafts[b].append(token)
                probs[b].append(p)
            if j == self.k:
                break
            # Step j+1 at position N_b − 2 + j reads the last output and the draft just made.
            e = embed(torch.tensor([[d[-1]] for d in drafts], device=device)).to(self.dtype)
            pos = torch.tensor([[n - 2 + j] for n in N], device=device)
            out = self._run(e, out[:, None], pos)[:, 0]
        return list(zip(drafts, probs, strict=True))
