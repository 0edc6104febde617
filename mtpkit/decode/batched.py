"""Batched speculative decoding: B sequences at once, each accepting its own number of drafts.

Every step the head's `BatchDrafter` (`head.make_batch_drafter`; else one `Drafter` per row)
drafts K tokens for every row, and the target verifies all B × (K + 1) rows in one forward. Rows keep their own lengths: row b with
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
from mtpkit.heads.base import BatchDrafter, Drafter
from mtpkit.heads.common import attention_mask


@dataclass
class _Row:
    """One sequence of the batch: its verified ids, its result and its RNG."""

    ids: list[int]
    result: DecodeResult
    generator: torch.Generator
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


class PerRowDrafters:
    """A `BatchDrafter` made of one family `Drafter` per row (families without a batched one)."""

    def __init__(self, drafters: list[Drafter]):
        self.drafters = drafters

    def start(self, features: list[torch.Tensor], width: int) -> None:
        for d, f in zip(self.drafters, features, strict=True):
            d.start(f)

    def commit(self, features: list[torch.Tensor]) -> None:
        for d, f in zip(self.drafters, features, strict=True):
            d.commit(f)

    def draft(self, ids: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        return [d.draft(x) for d, x in zip(self.drafters, ids, strict=True)]

    def select(self, rows: list[int]) -> None:
        self.drafters = [self.drafters[b] for b in rows]


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
        rows = [
            _Row(list(p), DecodeResult(tokens=[]), torch.Generator(device=device).manual_seed(s), start)
            for p, s in zip(prompts, seeds, strict=True)
        ]
        width = max(map(len, prompts)) + max_new_tokens + self.k + 1
        cache = SlotCache(len(prompts), width)
        drafter = self._new_drafter([row.generator for row in rows]) if self.k else None

        features, logits = self._prefill(prompts, cache)
        keep = []
        for b, row in enumerate(rows):
            first, _ = pick(logits[b], self.temperature, self.top_p, row.generator)
            row.result.prefill_seconds = row.result.seconds = time.perf_counter() - start
            if not row.take([first], max_new_tokens, eos):
                keep.append(b)
        if drafter is not None:
            drafter.start([features[b, : len(p)] for b, p in enumerate(prompts)], width)
        active = self._leave(rows, keep, cache, drafter)
        offsets = torch.arange(self.k + 1, device=device)

        while active:
            t0 = time.perf_counter()
            drafted = drafter.draft([row.ids for row in active]) if drafter else [([], [])] * len(active)
            t1 = time.perf_counter()
            # Verify: each row's pending token and drafts, at its own positions N_b − 1 .. N_b − 1 + K.
            lengths = torch.tensor([len(row.ids) for row in active], device=device)
            cols = lengths[:, None] - 1 + offsets
            ids = torch.tensor(
                [[row.ids[-1], *d] for row, (d, _) in zip(active, drafted, strict=True)], device=device
            )
            features, logits = self._verify(ids, cols, cache)
            target_ids = logits.argmax(-1).tolist() if self.temperature == 0 else None
            keep, verified = [], []
            for b, (row, (drafts, q_probs)) in enumerate(zip(active, drafted, strict=True)):
                if target_ids is not None:
                    accepted, bonus = greedy_accept(drafts, target_ids[b])
                else:
                    accepted, bonus = accept(
                        drafts, q_probs, logits[b], self.temperature, self.top_p, row.generator
                    )
                verified.append(features[b, : accepted + 1])
                if self.k:
                    row.result.steps.append(StepStats(drafted=len(drafts), accepted=accepted))
                if row.take([*drafts[:accepted], bonus], max_new_tokens, eos):
                    row.result.seconds = time.perf_counter() - row.start
                else:
                    keep.append(b)
            if drafter is not None:
                drafter.commit(verified)
            t2 = time.perf_counter()
            for row in active:  # the batch's drafting and forward: every row waited for both
                row.result.draft_seconds += t1 - t0
                row.result.verify_seconds += t2 - t1
            active = self._leave(active, keep, cache, drafter)
        return [row.result for row in rows]

    # ------------------------------------------------------------------ pieces
    def _new_drafter(self, generators: list[torch.Generator]) -> BatchDrafter:
        """The head's batched drafter, or one drafter per row; row b samples with generators[b]."""
        picks = [
            partial(pick, temperature=self.temperature, top_p=self.top_p, generator=g) for g in generators
        ]
        greedy = self.temperature == 0
        batched = self.head.make_batch_drafter(self.k, self.draft_dtype, picks, greedy)
        if batched is not None:
            return batched
        return PerRowDrafters([self.head.make_drafter(self.k, self.draft_dtype, p, greedy) for p in picks])

    def _leave(
        self, rows: list[_Row], keep: list[int], cache: SlotCache, drafter: BatchDrafter | None
    ) -> list[_Row]:
        """Rows `keep` stay in the batch; the others ended: drop them from the caches."""
        if keep and len(keep) < len(rows):
            cache.select(torch.tensor(keep, device=self.target.device))
            if drafter is not None:
                drafter.select(keep)
        return [rows[b] for b in keep]

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
