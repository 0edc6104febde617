"""Drafting with chained MTP depths (batch size 1): one exact cache per depth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mtpkit.heads.base import Pick
from mtpkit.heads.common import truncate


class MTPDrafter:
    """Chained MTP depths with one exact cache per depth.

    Row i of depth k reads hᵏ⁻¹_i and the embedding of t_{i+k}; with N verified tokens depth k
    holds *committed* rows 0..N−k−1 (every input verified) in its cache, and the rows N−k..N−2
    that involve drafts run on top of it for drafting and are then cropped away. Depth k uses
    module (k−1) mod D, with a cache of its own per depth.
    """

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        self.head, self.k, self.dtype, self.pick = head, k, dtype, pick
        self.lm_weight = head.lm_head.weight.detach().to(dtype)
        self.lm_bias = None if head.lm_head.bias is None else head.lm_head.bias.detach().to(dtype)

    def start(self, features: torch.Tensor) -> None:
        hidden = features[:, 0].to(self.dtype)
        # Committed outputs per depth (depth 0: the target's final hidden states) and caches.
        self.outs = {k: hidden if k == 0 else hidden[:0] for k in range(self.k + 1)}
        self.committed = {k: len(hidden) if k == 0 else 0 for k in range(self.k + 1)}
        self.caches = {k: DynamicCache() for k in range(1, self.k + 1)}

    def commit(self, features: torch.Tensor) -> None:
        self.outs[0] = torch.cat([self.outs[0], features[:, 0].to(self.dtype)])
        self.committed[0] = len(self.outs[0])

    def _run_depth(self, k: int, prev: torch.Tensor, tokens: list[int], start: int) -> torch.Tensor:
        """Rows start.. of depth k on top of its cache; returns the pre-norm outputs [n, H]."""
        from transformers.masking_utils import create_causal_mask

        head, cache = self.head, self.caches[k]
        module = head.module_for_step(k - 1)
        position_ids = torch.arange(start, start + len(tokens))[None]
        embeds = head.embed_tokens(torch.tensor([tokens])).to(self.dtype)
        if start == 0 and head.cfg.zero_first_embedding:
            embeds[:, 0] = 0  # as in training (and vLLM)
        cos_sin = head.rotary_emb(prev[None], position_ids=position_ids)
        mask = create_causal_mask(
            config=head.config,
            inputs_embeds=embeds,
            attention_mask=None,
            cache=cache,
            position_ids=position_ids,
            layer_idx=module.block.self_attn.layer_idx,
        )
        return module(prev[None], embeds, mask, cos_sin, position_ids, cache)[0]

    def draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Depth k: rows < max(N−k, 0) have verified inputs and are committed to its cache (once);
        rows from there to N−2 read earlier drafts, so they run on top of the cache and are
        cropped away after drafting. Row N−2 of depth k drafts t_{N+k−1}."""
        N = len(ids)
        drafts: list[int] = []
        probs: list[torch.Tensor | None] = []
        tentative = self.outs[0][:0]  # depth k−1 outputs for rows it has not committed
        for k in range(1, self.k + 1):
            s = max(N - k, 0)
            c = self.committed[k]
            if s > c:
                new = self._run_depth(k, self.outs[k - 1][c:s], ids[c + k : s + k], c)
                self.outs[k] = torch.cat([self.outs[k], new])
                self.committed[k] = s
            if s <= N - 2:
                prev = torch.cat([self.outs[k - 1][s : self.committed[k - 1]], tentative])
                tentative = self._run_depth(k, prev, (ids + drafts)[s + k : N - 1 + k], s)
                truncate(self.caches[k], s, self.head.module_for_step(k - 1).block.self_attn.layer_idx)
                last = tentative[-1]
            else:
                tentative = tentative[:0]
                last = self.outs[k][N - 2]
            norm = self.head.module_for_step(k - 1).shared_head.norm
            token, p = self.pick(F.linear(norm(last), self.lm_weight, self.lm_bias))
            drafts.append(token)
            probs.append(p)
        return drafts, probs
