"""Continuous-batching generation for `collect`: a fixed set of slots over a preallocated KV cache.

`model.generate` on a padded batch runs until its longest answer ends, so at batch 32 most rows
idle through most steps. Here each of `batch_size` slots owns one row of a preallocated cache
([slots, kv_heads, width, head_dim] per layer); when a row's answer ends (EOS or
`max_new_tokens`) its slot is refilled with the next queued prompt, prefilled into columns
0..P-1 of that row, while the other rows keep decoding. Rows have their own lengths and
positions: a boolean 4D mask lets each row see only its own columns (transformers uses a 4D mask
as given), and the cache writes each row's new key/value at that row's own column.

Greedy answers are those of batch-1 greedy decoding up to floating-point reduction order (a row's
numbers do not depend on its neighbours' content: masked columns weigh exactly zero). Sampling
draws from one torch.Generator per prompt, so a prompt's answer does not depend on which prompts
share the batch with it either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtpkit.models import Target, capture_layers, stack_layers

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward


class SlotCache:
    """A transformers-compatible KV cache with one preallocated row per slot.

    Before each forward, `prefill(rows, width)` or `decode(rows, cols)` says where the step's
    keys/values go; `update` (called by every attention layer) writes them and returns the
    keys/values that layer attends over.
    """

    is_compileable = False

    def __init__(self, slots: int, width: int):
        self.slots, self.width = slots, width
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None
        self._cols: torch.Tensor | None = None
        self._span = 0  # decode: columns attended over (longest active row + 1)

    def prefill(self, rows: torch.Tensor) -> None:
        self._rows, self._cols = rows, None

    def decode(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """New keys/values of `rows` go to columns `cols`: [n] (one token per row) or [n, Q]
        (Q tokens per row, as speculative verification writes them)."""
        self._rows, self._cols = rows, cols if cols.dim() == 2 else cols[:, None]
        self._span = int(cols.max()) + 1

    @property
    def span(self) -> int:
        """Columns the current decode step attends over (its largest column + 1)."""
        return self._span

    def select(self, rows: torch.Tensor) -> None:
        """Keep slots `rows` only, in that order (rows that finished leave the batch)."""
        self.keys = [t[rows] for t in self.keys]
        self.values = [t[rows] for t in self.values]
        self.slots = len(rows)

    def grow(self, width: int) -> None:
        """Widen every row (a later turn of a conversation can be longer than the first prompts)."""
        if width <= self.width:
            return
        pad = width - self.width
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                store[i] = torch.cat([t, t.new_zeros(*t.shape[:2], pad, t.shape[3])], dim=2)
        self.width = width

    def _buffers(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        while len(self.keys) <= layer:  # allocated at the first step: shapes come from the model
            self.keys.append(k.new_zeros(self.slots, k.shape[1], self.width, k.shape[3]))
            self.values.append(v.new_zeros(self.slots, v.shape[1], self.width, v.shape[3]))
        return self.keys[layer], self.values[layer]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self._buffers(layer_idx, key_states, value_states)
        rows = self._rows
        if self._cols is None:  # prefill: the rows start empty, so attend over the new states only
            n = key_states.shape[2]
            keys[rows, :, :n] = key_states
            values[rows, :, :n] = value_states
            return key_states, value_states
        keys[rows[:, None], :, self._cols] = key_states.transpose(1, 2)  # [n, Q, heads, dim]
        values[rows[:, None], :, self._cols] = value_states.transpose(1, 2)
        span = self._span
        if len(rows) == self.slots:  # every slot active (the usual case): a view, no copy
            return keys[:, :, :span], values[:, :, :span]
        return keys[rows, :, :span], values[rows, :, :span]

    # transformers asks these of a cache it did not create
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs):
        return self.width, 0


@dataclass
class Job:
    """One answer to produce: `prompt` ids in, `answer` ids out; `generator` for sampling."""

    prompt: list[int]
    generator: torch.Generator | None = None
    answer: list[int] = field(default_factory=list)
    tag: object = None
    # With `generate_continuous(layers=...)`: the target's hidden states of every row it ran,
    # prompt and answer but the last token (never fed back) — [P + G − 1, n_layers, H] chunks.
    features: list[torch.Tensor] = field(default_factory=list)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """One token from softmax(logits / T) restricted to the top-p nucleus (top_k off)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_continuous(
    target: Target,
    jobs: list[Job],
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_done: Callable[[Job], Job | None] | None = None,
    on_tokens: Callable[[int], None] | None = None,
    layers: list[int] | None = None,
    feature_dtype: torch.dtype = torch.bfloat16,
) -> list[Job]:
    """Answer every job (each answer ends at its first EOS, kept, or after max_new_tokens).

    `on_done(job)` may return a follow-up job (the next turn of a conversation), queued at the
    back. `on_tokens(n)` is told how many tokens each step produced (progress). With `layers`,
    each job keeps the hidden states of those layers from the forwards that generate it
    (`Job.features`), so no teacher-forced pass over the answers is needed afterwards.
    """
    if not jobs:
        return []
    device = target.device
    eos = torch.tensor(sorted(set(target.eos_token_ids)), device=device)
    slots = min(batch_size, len(jobs))
    width = max(len(j.prompt) for j in jobs) + max_new_tokens
    cache = SlotCache(slots, width)
    backbone, lm_head = target.backbone, target.lm_head
    queue = deque(jobs)
    active: list[Job | None] = [None] * slots
    lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens held by each row
    last = torch.zeros(slots, dtype=torch.long, device=device)  # each row's newest token
    finished: list[Job] = []
    refill_at = max(1, slots // 8)  # refill when this many slots are free: prefills are batched

    def choose(logits: torch.Tensor, rows: list[int]) -> list[int]:
        if temperature == 0:
            return logits.argmax(-1).tolist()
        return [_sample(logits[i], temperature, top_p, active[r].generator) for i, r in enumerate(rows)]

    def accept(rows: list[int], tokens: list[int]) -> None:
        """Append each row's new token; retire answers that ended and free their slots."""
        for r, t in zip(rows, tokens, strict=True):
            job = active[r]
            job.answer.append(t)
            last[r] = t
            if t in eos_set or len(job.answer) >= max_new_tokens:
                active[r] = None
                finished.append(job)
                follow = on_done(job) if on_done else None
                if follow is not None:
                    queue.append(follow)
        if on_tokens:
            on_tokens(len(rows))

    eos_set = set(eos.tolist())

    def forward(**inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backbone's last hidden state and, with `layers`, the stacked feature layers."""
        if layers is None:
            return backbone(**inputs, cache=cache, use_cache=True).last_hidden_state, None
        with capture_layers(target, layers) as captured:
            hidden = backbone(**inputs, cache=cache, use_cache=True).last_hidden_state
        return hidden, stack_layers(target, captured, hidden, layers).to(feature_dtype)

    def prefill(rows: list[int], take: list[Job]) -> None:
        P = max(len(j.prompt) for j in take)
        ids = torch.zeros(len(take), P, dtype=torch.long, device=device)
        plen = torch.tensor([len(j.prompt) for j in take], device=device)
        for i, j in enumerate(take):
            ids[i, : len(j.prompt)] = torch.tensor(j.prompt)
        pos = torch.arange(P, device=device)
        # causal, and no key past the row's own prompt (right padding)
        mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < plen[:, None, None])
        cache.prefill(torch.tensor(rows, device=device))
        hidden, feats = forward(
            input_ids=ids, attention_mask=mask[:, None], position_ids=pos[None].expand(len(take), P)
        )
        h = hidden[torch.arange(len(take)), plen - 1]
        for i, (r, j) in enumerate(zip(rows, take, strict=True)):
            active[r] = j
            if feats is not None:
                j.features = [feats[i, : len(j.prompt)].cpu()]  # a follow-up turn starts over
        lengths[rows] = plen
        accept(rows, choose(lm_head(h), rows))

    def refill() -> None:
        free = [r for r in range(slots) if active[r] is None]
        take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        if not take:
            return
        cache.grow(max(len(j.prompt) for j in take) + max_new_tokens)
        # Prefill in length-sorted chunks of at most PREFILL_TOKENS padded tokens: one padded
        # forward over 64 prompts pads every row to the longest (a 2k-token Arena-Hard prompt
        # made a 64-row prefill take minutes) and its [B, P, P] mask grows quadratically.
        take.sort(key=lambda j: len(j.prompt))
        rows = free[: len(take)]
        start = 0
        while start < len(take):
            end = start + 1
            real = len(take[start].prompt)
            while end < len(take):
                n, width = end + 1 - start, len(take[end].prompt)
                # a chunk within the token budget, padded by at most a quarter
                if n * width > PREFILL_TOKENS or n * width > 1.25 * (real + width):
                    break
                real += width
                end += 1
            prefill(rows[start:end], take[start:end])
            start = end

    while queue or any(a is not None for a in active):
        n_free = sum(a is None for a in active)
        if queue and (n_free >= refill_at or n_free == slots):
            refill()
            continue
        rows = [r for r in range(slots) if active[r] is not None]
        # With most slots busy, run every slot (idle ones on a dummy column 0, their output
        # dropped): the cache is then attended as a view, where a subset of rows would be a
        # gathered copy of every layer's keys and values each step.
        run = list(range(slots)) if len(rows) >= slots * 3 // 4 else rows
        run_t = torch.tensor(run, device=device)
        busy = torch.tensor([active[r] is not None for r in run], device=device)
        cols = torch.where(busy, lengths[run_t], 0)  # the new token's column (= its position)
        cache.decode(run_t, cols)
        span = torch.arange(cache._span, device=device)
        mask = (span[None, :] <= cols[:, None])[:, None, None, :]
        hidden, feats = forward(
            input_ids=last[run_t][:, None], attention_mask=mask, position_ids=cols[:, None]
        )
        keep = busy.nonzero()[:, 0]
        hidden = hidden[keep]
        if feats is not None:
            feats = feats[keep].cpu()
            for b, r in enumerate(rows):
                active[r].features.append(feats[b])
        rows_t = torch.tensor(rows, device=device)
        lengths[rows_t] += 1
        accept(rows, choose(lm_head(hidden[:, 0]), rows))
    return finished
