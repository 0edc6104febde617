"""Drafting with chained MTP depths: one exact cache per depth, for one sequence or a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mtpkit.data.generation import SlotCache
from mtpkit.heads.base import Pick
from mtpkit.heads.common import attention_mask, truncate


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


class _AsLayerZero:
    """One depth's `SlotCache`, written by its block (layer id L + d) as the cache's only layer."""

    def __init__(self, cache: SlotCache):
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.cache.update(key_states, value_states, 0, *args, **kwargs)


class MTPBatchDrafter:
    """`MTPDrafter` for B sequences at once: per depth one forward over every row's pending rows.

    Depth k of sequence b holds committed rows 0..c_b − 1 (every input verified) in a cache
    with one row per sequence (`SlotCache`); a step runs rows c_b..N_b − 2 on top of it in one
    pass — the committed ones and those reading this step's drafts alike — and then sets
    c_b = max(N_b − k, 0). The rows past c_b are not cropped: the next step writes them again
    before anything attends to them (each query sees the columns up to its own position only).
    Outputs per depth are kept in [B, width, H] buffers, depth 0 being the target's states.
    The drafts of a row are those `MTPDrafter` makes for that sequence alone.
    """

    def __init__(self, head, k: int, dtype: torch.dtype, picks: list[Pick], greedy: bool = True):
        self.head, self.k, self.dtype, self.picks, self.greedy = head, k, dtype, list(picks), greedy
        self.lm_weight = head.lm_head.weight.detach().to(dtype)
        self.lm_bias = None if head.lm_head.bias is None else head.lm_head.bias.detach().to(dtype)

    def start(self, features: list[torch.Tensor], width: int) -> None:
        B, H, device = len(features), features[0].shape[-1], features[0].device
        # Q ≤ 2K rows per depth and step (K + 1 new tokens, K − 1 rows left over): room for them.
        width += 2 * self.k + 2
        self.outs = [torch.zeros(B, width, H, dtype=self.dtype, device=device) for _ in range(self.k + 1)]
        self.filled = [0] * B  # target states held per row (rows 0..N_b − 2)
        self.committed = [[0] * B for _ in range(self.k + 1)]
        self.caches = [_AsLayerZero(SlotCache(B, width)) for _ in range(self.k)]
        self.commit(features)

    def commit(self, features: list[torch.Tensor]) -> None:
        for b, f in enumerate(features):
            self.outs[0][b, self.filled[b] : self.filled[b] + len(f)] = f[:, 0].to(self.dtype)
            self.filled[b] += len(f)

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.outs[0].device)
        self.outs = [o[index] for o in self.outs]
        for c in self.caches:
            c.cache.select(index)
        self.filled = [self.filled[b] for b in rows]
        self.committed = [[c[b] for b in rows] for c in self.committed]
        self.picks = [self.picks[b] for b in rows]

    def draft(self, ids: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        head, device = self.head, self.outs[0].device
        B, N = len(ids), [len(x) for x in ids]
        rows = torch.arange(B, device=device)[:, None]
        drafts: list[list[int]] = [[] for _ in ids]
        probs: list[list[torch.Tensor | None]] = [[] for _ in ids]
        for k in range(1, self.k + 1):
            module = head.module_for_step(k - 1)
            c = self.committed[k]
            q = torch.tensor([N[b] - 1 - c[b] for b in range(B)], device=device)  # rows c_b..N_b − 2
            Q = int(q.max())
            pos = torch.tensor(c, device=device)[:, None] + torch.arange(Q, device=device)
            valid = torch.arange(Q, device=device)[None] < q[:, None]
            tokens = [(ids[b] + drafts[b])[c[b] + k : N[b] - 1 + k] for b in range(B)]
            tokens = torch.tensor([t + [0] * (Q - len(t)) for t in tokens], device=device)
            embeds = head.embed_tokens(tokens).to(self.dtype)
            if head.cfg.zero_first_embedding:
                embeds[pos == 0] = 0  # as in training (and vLLM)
            prev = self.outs[k - 1][rows, pos]  # padded queries read rows no valid query needs
            cache = self.caches[k - 1]
            cache.cache.decode(rows[:, 0], pos)
            allowed = torch.arange(cache.cache.span, device=device)[None, None, :] <= pos[:, :, None]
            mask = attention_mask(allowed[:, None], head.config, self.dtype)
            cos_sin = head.rotary_emb(prev, position_ids=pos)
            out = module(prev, embeds, mask, cos_sin, pos, cache)
            self.outs[k][rows.expand_as(pos)[valid], pos[valid]] = out[valid]
            self.committed[k] = [max(n - k, 0) for n in N]
            last = module.shared_head.norm(out[rows[:, 0], q - 1])  # row N_b − 2 drafts t_{N_b+k−1}
            logits = F.linear(last, self.lm_weight, self.lm_bias)
            picked = (
                [(t, None) for t in logits.argmax(-1).tolist()]
                if self.greedy
                else [pick(logits[b]) for b, pick in enumerate(self.picks)]
            )
            for b, (token, p) in enumerate(picked):
                drafts[b].append(token)
                probs[b].append(p)
        return list(zip(drafts, probs, strict=True))
