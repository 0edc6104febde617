"""Batched speculative decoding: B sequences at once, each accepting its own number of drafts.

Every step each row's Drafter (one per row, made by `head.make_drafter`) drafts K tokens, and
the target verifies all B × (K + 1) rows in one forward. Rows keep their own lengths: row b with
N_b verified tokens writes its K + 1 keys/values at cache columns N_b − 1 .. N_b − 1 + K (column =
position), and after accepting a_b drafts it holds N_b + a_b columns — the rejected columns are
simply overwritten by its next step, as vLLM reuses the slots of rejected tokens (a request's
computed-token count advances by accepted + 1). A boolean mask lets each query see the columns
up to its own position, so a row never reads a neighbour's or a stale column. Prompts are right
padded in the prefill for the same reason: every column a row attends to is its own.

Lossless per row: greedy rows follow the target's argmax, sampling rows use the batch-1
engine's rejection sampler with a generator of their own, so a row's output depends on its
prompt and seed, not on the rows beside it (up to floating-point reduction order in the batched
matrix products). K = 0 is plain batched decoding on the same path. Rows that end (EOS or
`max_new_tokens`) leave the batch and the cache is compacted, so later steps skip them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

from mtpkit.data.generation import SlotCache
from mtpkit.decode.engine import (
    DecodeError,
    DecodeResult,
    SpeculativeDecoder,
    StepStats,
    accept,
    capture_layers,
    greedy_accept,
    pick,
)
from mtpkit.heads.base import Drafter
from mtpkit.heads.common import attention_mask


@dataclass
class _Row:
    """One sequence of the batch: its verified ids, its result, its RNG and drafting state."""

    ids: list[int]
    result: DecodeResult
    generator: torch.Generator
    drafter: Drafter | None
    start: float

    def take(self, tokens: list[int], max_new_tokens: int, eos: set[int]) -> bool:
        """Append `tokens` where plain decoding would still be running; True once the row ended."""
        out = self.result.tokens
        for token in tokens:
            if len(out) >= max_new_tokens or (out and out[-1] in eos):
                break
            out.append(token)
            self.ids.append(token)
        return len(out) >= max_new_tokens or out[-1] in eos


class BatchedSpeculativeDecoder(SpeculativeDecoder):
    """`SpeculativeDecoder` (same arguments; `generate` still decodes one sequence) with
    `generate_batch` for many prompts at once."""

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        eos_ids: list[int] | None = None,
        seeds: list[int] | None = None,
    ) -> list[DecodeResult]:
        """One `DecodeResult` per prompt, in order, each with its own steps. `seeds[b]` seeds row
        b's sampling (the batch-1 engine with `seed=seeds[b]` draws the same numbers); by default
        they are drawn from this decoder's generator."""
        if not prompts:
            return []
        for p in prompts:
            self._check_prompt(p, max_new_tokens)
        if seeds is None:
            # one draw per row: the seeds of later calls do not depend on how prompts were batched
            seeds = [int(torch.randint(2**62, (), generator=self.generator)) for _ in prompts]
        elif len(seeds) != len(prompts):
            raise DecodeError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        eos = set(self.target.eos_token_ids if eos_ids is None else eos_ids)
        device = self.target.device
        start = time.perf_counter()
        rows = [self._new_row(p, s, start) for p, s in zip(prompts, seeds, strict=True)]
        cache = SlotCache(len(prompts), max(map(len, prompts)) + max_new_tokens + self.k + 1)

        features, logits = self._prefill(prompts, cache)
        keep = []
        for b, row in enumerate(rows):
            first, _ = pick(logits[b], self.temperature, self.top_p, row.generator)
            if row.drafter is not None:
                row.drafter.start(features[b, : len(prompts[b])])
            row.result.prefill_seconds = row.result.seconds = time.perf_counter() - start
            if not row.take([first], max_new_tokens, eos):
                keep.append(b)
        if keep and len(keep) < len(rows):
            cache.select(torch.tensor(keep, device=device))
        active = [rows[b] for b in keep]
        offsets = torch.arange(self.k + 1, device=device)

        while active:
            drafted = []
            for row in active:
                t0 = time.perf_counter()
                drafted.append(row.drafter.draft(row.ids) if self.k else ([], []))
                row.result.draft_seconds += time.perf_counter() - t0
            t1 = time.perf_counter()
            # Verify: each row's pending token and drafts, at its own positions N_b − 1 .. N_b − 1 + K.
            lengths = torch.tensor([len(row.ids) for row in active], device=device)
            cols = lengths[:, None] - 1 + offsets
            ids = torch.tensor(
                [[row.ids[-1], *d] for row, (d, _) in zip(active, drafted, strict=True)], device=device
            )
            features, logits = self._verify(ids, cols, cache)
            target_ids = logits.argmax(-1).tolist() if self.temperature == 0 else None
            keep = []
            for b, (row, (drafts, q_probs)) in enumerate(zip(active, drafted, strict=True)):
                if target_ids is not None:
                    accepted, bonus = greedy_accept(drafts, target_ids[b])
                else:
                    accepted, bonus = accept(
                        drafts, q_probs, logits[b], self.temperature, self.top_p, row.generator
                    )
                if row.drafter is not None:
                    row.drafter.commit(features[b, : accepted + 1])
                    row.result.steps.append(StepStats(drafted=len(drafts), accepted=accepted))
                if row.take([*drafts[:accepted], bonus], max_new_tokens, eos):
                    row.result.seconds = time.perf_counter() - row.start
                else:
                    keep.append(b)
            verify = time.perf_counter() - t1  # the batch's forward: every row waited for it
            for row in active:
                row.result.verify_seconds += verify
            if len(keep) < len(active):
                if keep:
                    cache.select(torch.tensor(keep, device=device))
                active = [active[b] for b in keep]
        return [row.result for row in rows]

    # ------------------------------------------------------------------ pieces
    def _new_row(self, prompt: list[int], seed: int, start: float) -> _Row:
        generator = torch.Generator(device=self.target.device).manual_seed(seed)
        drafter = None
        if self.head is not None:
            row_pick = partial(pick, temperature=self.temperature, top_p=self.top_p, generator=generator)
            drafter = self.head.make_drafter(self.k, self.draft_dtype, row_pick, self.temperature == 0)
        return _Row(list(prompt), DecodeResult(tokens=[]), generator, drafter, start)

    def _forward(
        self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, cache: SlotCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, Q, n_layers, H] (the drafters' layers) and final states [B, Q, H] of
        `ids` [B, Q] at `positions`, with `allowed` [B, Q, columns] saying what each query sees."""
        mask = attention_mask(allowed[:, None], self.target.config, self.target.model.dtype)
        with capture_layers(self.target, self.feature_layers) as captured:
            out = self.target.backbone(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            )
        hidden = out.last_hidden_state
        L = self.target.num_layers
        return torch.stack([hidden if i == L else captured[i] for i in self.feature_layers], dim=2), hidden

    def _prefill(self, prompts: list[list[int]], cache: SlotCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompts into columns 0..P_b − 1 of their rows; the logits of each row's
        last prompt token only (the first new token)."""
        device = self.target.device
        P = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=device)
        plen = torch.tensor([len(p) for p in prompts], device=device)
        pos = torch.arange(P, device=device)
        # causal, and no key past the row's own prompt (padding queries see real keys: no empty rows)
        allowed = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < plen[:, None, None])
        cache.prefill(torch.arange(len(prompts), device=device))
        features, hidden = self._forward(ids, allowed, pos[None].expand(len(prompts), P), cache)
        return features, self.target.lm_head(hidden[torch.arange(len(prompts), device=device), plen - 1])

    def _verify(
        self, ids: torch.Tensor, cols: torch.Tensor, cache: SlotCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's K + 1 tokens at columns (= positions) `cols` [B, K + 1] in one forward;
        features and logits of every verified row."""
        cache.decode(torch.arange(len(ids), device=ids.device), cols)
        span = torch.arange(cache.span, device=ids.device)
        features, hidden = self._forward(ids, span[None, None, :] <= cols[:, :, None], cols, cache)
        return features, self.target.lm_head(hidden)
