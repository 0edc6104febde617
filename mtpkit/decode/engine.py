"""Speculative decoding with a trained draft head on the target's KV cache (batch size 1).

Each step the head drafts K tokens, the target verifies them in one
forward pass, the longest agreeing prefix plus one bonus token from the target is kept, and
every cache is rolled back past rejected tokens. Greedy decoding keeps the target's argmax,
so the output is the target's own greedy output; sampling uses standard speculative
rejection sampling (accept with min(1, p/q), else resample from norm((p − q)+)), so the output
distribution is the target's.

Each head family keeps its own drafting state and caches (its `Drafter`, made by
`head.make_drafter`); the engine asks the target for the hidden layers the head reads
(`head.feature_layers`), in the same verification forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHead
from mtpkit.heads.common import truncate
from mtpkit.models import Target, capture_layers


class DecodeError(MtpkitError, ValueError):
    pass


CACHES = ("static", "dynamic")


@dataclass
class StepStats:
    drafted: int
    accepted: int  # drafted tokens accepted (bonus excluded)


@dataclass
class DecodeResult:
    tokens: list[int]  # generated tokens (prompt excluded), EOS included if produced
    steps: list[StepStats] = field(default_factory=list)
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # the prompt's forward pass, which also yields the first token
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0


def _process(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering, as the samplers apply them."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest prefix with mass >= top_p
        filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = filtered / filtered.sum(-1, keepdim=True)
    return probs


def pick(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[int, torch.Tensor | None]:
    """A token from `logits` [V]: the argmax when greedy, else a sample with the probabilities
    it was drawn from (the drafters' `Pick`, bound to one sequence's generator)."""
    if temperature == 0:
        return int(logits.argmax(-1)), None
    probs = _process(logits, temperature, top_p)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def greedy_accept(drafts: list[int], target_ids: list[int]) -> tuple[int, int]:
    """The longest prefix of `drafts` equal to the target's argmax `target_ids` [K + 1], and the
    target's token after it (the bonus)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target_ids[accepted]:
        accepted += 1
    return accepted, target_ids[accepted]


def accept(
    drafts: list[int],
    q_probs: list[torch.Tensor | None],
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Number of accepted drafts and the bonus token, from the target's `logits` [K + 1, V] at
    the pending token and the drafts: greedy keeps the longest prefix equal to the argmax;
    sampling accepts draft j with min(1, p/q), else resamples from norm((p − q)+)."""
    if temperature == 0:
        return greedy_accept(drafts, logits.argmax(-1).tolist())
    for j, (d, q) in enumerate(zip(drafts, q_probs, strict=True)):
        p = _process(logits[j], temperature, top_p)
        if torch.rand((), generator=generator, device=generator.device) < torch.clamp(p[d] / q[d], max=1.0):
            continue
        residual = torch.clamp(p - q, min=0)
        if residual.sum() <= 0:  # p == q: any sample from p is exact
            residual = p
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    p = _process(logits[len(drafts)], temperature, top_p)
    return len(drafts), int(torch.multinomial(p, 1, generator=generator))


class SpeculativeDecoder:
    """Chain drafting with a trained head; K = 0 is plain KV-cache decoding (same code path)."""

    def __init__(
        self,
        target: Target,
        head: DraftHead | None = None,
        k: int = 3,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        draft_dtype: torch.dtype = torch.float32,
        cache: str = "static",
    ):
        if cache not in CACHES:
            raise DecodeError(f"cache must be one of {CACHES}, got {cache!r}")
        self.cache_kind = cache
        if k < 0 or (head is not None and k < 1):
            raise DecodeError(f"k (draft tokens per step) must be >= 1, got {k}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise DecodeError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.target, self.head = target, head
        self.k = k if head is not None else 0
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)
        self.max_positions = getattr(target.config, "max_position_embeddings", None)
        self.draft_dtype = draft_dtype
        self.feature_layers = [target.num_layers]
        if head is not None:
            try:
                head.check_draft_tokens(k)
            except ValueError as exc:
                raise DecodeError(str(exc)) from exc
            head.eval()
            # Drafting is memory-bound (one row through a 49k-row LM head per draft), so a bf16
            # copy halves its cost. Verification stays in the target's dtype: output unchanged.
            self.head = head.cast(draft_dtype)
            self.drafter = self.head.make_drafter(self.k, draft_dtype, self._pick, temperature == 0)
            self.feature_layers = self.head.feature_layers

    # ------------------------------------------------------------------ sampling helpers
    def _pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        return pick(logits, self.temperature, self.top_p, self.generator)

    # ------------------------------------------------------------------ target
    def _new_cache(self, length: int):
        """The target's KV cache for a decode of `length` positions. Static: preallocated once,
        and rolling back is moving its length (O(1)); dynamic: grown by concatenation."""
        if self.cache_kind == "static":
            return StaticCache(config=self.target.config, max_cache_len=length)
        return DynamicCache(config=self.target.config)

    def _target_forward(
        self, ids: list[int], start: int, cache, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [n, n_layers, H] (the drafter's layers) and logits of `ids` at positions start..
        on top of `cache` — logits of the last row only with `last_only` (prefill: a P-row LM head
        over a 49k vocabulary costs as much as the rest of a short prompt's forward)."""
        input_ids = torch.tensor([ids], device=self.target.device)
        position_ids = torch.arange(start, start + len(ids), device=input_ids.device)[None]
        with capture_layers(self.target, self.feature_layers) as captured:
            out = self.target.backbone(
                input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True
            )
        hidden = out.last_hidden_state[0]
        layers = [hidden if i == self.target.num_layers else captured[i][0] for i in self.feature_layers]
        return torch.stack(layers, dim=1), self.target.lm_head(hidden[-1:] if last_only else hidden)

    def _draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        """K proposals for positions N..N+K−1 given the N verified tokens `ids`."""
        return self.drafter.draft(ids)

    # ------------------------------------------------------------------ decode
    def _check_prompt(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise DecodeError("empty prompt")
        if (
            self.max_positions is not None
            and len(prompt_ids) + max_new_tokens + self.k + 1 > self.max_positions
        ):
            raise DecodeError(
                f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds the target's context "
                f"of {self.max_positions} positions"
            )

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int] | None = None
    ) -> DecodeResult:
        self._check_prompt(prompt_ids, max_new_tokens)
        eos = set(self.target.eos_token_ids if eos_ids is None else eos_ids)
        start = time.perf_counter()
        result = DecodeResult(tokens=[])
        target_cache = self._new_cache(len(prompt_ids) + max_new_tokens + self.k + 1)
        # Prefill: rows 0..P−1; the first token comes from the last row.
        features, logits = self._target_forward(prompt_ids, 0, target_cache, last_only=True)
        first, _ = self._pick(logits[-1])
        ids = [*prompt_ids, first]
        result.tokens.append(first)
        if self.head is not None:
            self.drafter.start(features)
        result.prefill_seconds = time.perf_counter() - start
        while len(result.tokens) < max_new_tokens and result.tokens[-1] not in eos:
            N = len(ids)
            t0 = time.perf_counter()
            drafts, q_probs = self._draft(ids) if self.k else ([], [])
            t1 = time.perf_counter()
            # Verify: the pending token and the drafts, at positions N−1..N−1+K.
            features, logits = self._target_forward([ids[-1], *drafts], N - 1, target_cache)
            accepted, bonus = self._accept(drafts, q_probs, logits)
            new = [*drafts[:accepted], bonus]
            truncate(target_cache, N + accepted)  # keep rows 0..N−1+accepted
            if self.head is not None:
                self.drafter.commit(features[: accepted + 1])
            result.verify_seconds += time.perf_counter() - t1
            result.draft_seconds += t1 - t0
            if self.k:
                result.steps.append(StepStats(drafted=len(drafts), accepted=accepted))
            for token in new:  # stop exactly where plain decoding would
                if len(result.tokens) >= max_new_tokens or result.tokens[-1] in eos:
                    break
                result.tokens.append(token)
                ids.append(token)
        result.seconds = time.perf_counter() - start
        return result

    def _accept(self, drafts: list[int], q_probs, logits: torch.Tensor) -> tuple[int, int]:
        """Number of accepted drafts and the bonus token (target's pick at the first mismatch)."""
        return accept(drafts, q_probs, logits, self.temperature, self.top_p, self.generator)
