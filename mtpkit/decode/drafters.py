"""Drafting state of each head family for the speculative engine (batch size 1).

A drafter sees the decode through three calls: `start(features)` with the target's features
of the prompt rows, `draft(ids)` → K proposals for positions N..N+K−1 given N verified tokens
(the target has processed rows 0..N−2; t_{N−1} is the pending bonus token), and
`commit(features)` with the features of the rows the last verification accepted. Features are
the target's hidden states at `feature_layers` (HF `hidden_states` ids), [n, n_layers, H].
Each drafter returns proposals as target token ids with the full-vocabulary probabilities
they were sampled from (None when greedy), which is what exact rejection sampling needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Pick = Callable[[torch.Tensor], tuple[int, torch.Tensor | None]]


def truncate(cache: DynamicCache, keep: int, layer_idx: int = 0) -> None:
    """Roll a cache back to its first `keep` positions (transformers 5: crop(−n) drops n)."""
    extra = cache.get_seq_length(layer_idx) - keep
    if extra > 0:
        cache.crop(-extra)


class MTPDrafter:
    """Chained MTP depths with one exact cache per depth.

    Row i of depth k reads hᵏ⁻¹_i and the embedding of t_{i+k}; with N verified tokens depth k
    holds *committed* rows 0..N−k−1 (every input verified) in its cache, and the rows N−k..N−2
    that involve drafts run on top of it for drafting and are then cropped away. Depth k uses
    module (k−1) mod D, with a cache of its own per depth.
    """

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        self.head, self.k, self.dtype, self.pick = head, k, dtype, pick
        self.feature_layers = [head.num_target_layers]
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


class Eagle3Drafter:
    """One midlayer cache: step-1 rows 0..N−2 (target features, all inputs verified) are
    committed; steps 2..K run one row each on top of it and are cropped away after drafting."""

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        self.head, self.k, self.dtype, self.pick = head, k, dtype, pick
        self.feature_layers = head.feature_layers
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


class _LastRow:
    """Drafters that condition only on the target's last processed row (h_{N−2})."""

    def start(self, features: torch.Tensor) -> None:
        self.last = features[-1, 0].to(self.dtype)

    commit = start


class MedusaDrafter(_LastRow):
    """Head k's argmax on h_{N−2} drafts t_{N+k−1}: no cache, nothing to roll back."""

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        if k > head.cfg.num_heads:
            raise ValueError(
                f"a Medusa head with {head.cfg.num_heads} heads drafts at most that many tokens, not {k}"
            )
        self.head, self.k, self.dtype, self.pick = head, k, dtype, pick
        self.feature_layers = [head.num_target_layers]
        self.lm = [head.output_layers(j)[0].weight.detach().to(dtype) for j in range(1, k + 1)]

    def draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        picks = [self.pick(F.linear(self.head.blocks[j](self.last), self.lm[j])) for j in range(self.k)]
        return [t for t, _ in picks], [p for _, p in picks]


class DiffusionDrafter(_LastRow):
    """The block [MASK]×L conditioned on h_{N−2} and t_{N−1}, denoised in S passes; the first K
    of its L tokens are the drafts. Stateless between steps."""

    def __init__(self, head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
        if k > head.cfg.block_length:
            raise ValueError(
                f"a diffusion head with block_length {head.cfg.block_length} drafts at most that many, not {k}"
            )
        self.head, self.k, self.dtype, self.pick, self.greedy = head, k, dtype, pick, greedy
        self.feature_layers = [head.num_target_layers]
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


DRAFTERS = {
    "mtp": MTPDrafter,
    "eagle3": Eagle3Drafter,
    "medusa": MedusaDrafter,
    "diffusion": DiffusionDrafter,
}


def make_drafter(head, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True):
    if head.head_type not in DRAFTERS:
        raise ValueError(f"no drafter for head type {head.head_type!r}")
    return DRAFTERS[head.head_type](head, k, dtype, pick, greedy)
