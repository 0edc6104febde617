"""Exact greedy acceptance by replay: one batched greedy pass, one teacher-forced head pass.

Under greedy decoding the speculative engine's output is the target's greedy continuation,
and the accepted length of every step is a function of that sequence alone. At a step that
starts with N verified tokens (anchor row r = N − 2, the last row the target has processed)
draft j is what the head computes from the verified prefix, and it counts only if drafts
1..j−1 were accepted — i.e. were the true tokens. So it equals what a teacher-forced forward
of the head over the final sequence gives at row r, depth j (the training convention: depth
j, row r predicts t_{r+j+1}). Hence:

  1. `greedy_generate`: plain greedy decoding of many prompts at once (left padding), which
     also keeps the target features the head reads and K_max − 1 tokens past the end — the
     engine's last step verifies drafts against the target's continuation beyond its output.
  2. `draft_hits`: one teacher-forced head pass per sequence → hits [K_max, T] (bool).
  3. `walk`: step boundaries N → N + accepted + 1 from the first generated token, for any
     K from the same hits; the training-time simulated τ walks answer spans with it too.

Batching changes float summation order, so a batched greedy token can differ from the
batch-1 one where the top two logits nearly tie. Every prompt whose batched run had a
top-2 logit margin below `tie_margin` at any generated position is regenerated at batch 1
(the engine's shapes), and both counts are reported: a τ is only ever computed for a
sequence that batch-1 greedy decoding produces (up to that margin).

The greedy sequences depend on the target alone, not on the head, so `replay(sequence_file=FILE)`
keeps them in a file (`GreedySequences`) and later replays of any head over the same prompts
skip generation: each cached sequence costs one teacher-forced target forward for the features
the head reads, a fraction of generating it token by token.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mtpkit.decode.engine import DecodeError
from mtpkit.decode.metrics import AcceptanceStats, merged
from mtpkit.heads import DraftHead, TargetModules
from mtpkit.io import atomic_write
from mtpkit.models import Target, capture_layers
from mtpkit.train.metrics import leading_runs, walk

# Largest |batched − batch-1| logit difference we accept without a batch-1 rerun, per target
# dtype. Measured differences on SmolLM2-135M are far below these (see docs/speculative-decoding.md).
TIE_MARGIN = {torch.float32: 1e-3, torch.bfloat16: 0.25}


@dataclass
class Sequence:
    """One prompt's greedy output with what replay needs of it."""

    prompt: list[int]
    tokens: list[int]  # the output, EOS included if produced (what the engine returns)
    extended: list[int]  # tokens + the target's greedy continuation past the end (EOS ignored)
    features: torch.Tensor  # [P + len(tokens) − 1, n_layers, H]: target features of rows 0..P+G−2
    min_margin: float = float("inf")  # smallest top-2 logit margin over the generated positions
    batch1: bool = False  # regenerated at batch 1 (a near tie in the batched run)
    changed: bool = False  # ... and batch 1 produced a different sequence


@dataclass
class ReplayResult:
    """Per prompt and K: the accepted count of every step."""

    steps: dict[int, list[list[int]]]  # K → per prompt → accepted per step
    sequences: list[Sequence]
    batch1_reruns: int = 0
    batch1_changed: int = 0
    stats: dict[int, AcceptanceStats] = field(default_factory=dict)

    def prompt_stats_at(self, k: int, i: int) -> AcceptanceStats:
        s = AcceptanceStats(k)
        for a in self.steps[k][i]:
            s.add(k, a)
        return s

    def prompt_stats(self, k: int) -> list[AcceptanceStats]:
        return [self.prompt_stats_at(k, i) for i in range(len(self.sequences))]


# ---------------------------------------------------------------------------- walking
# ---------------------------------------------------------------------------- generation
def _forward(target: Target, ids, mask, positions, cache, layers: list[int]):
    L = target.num_layers
    out = target.backbone(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        output_hidden_states=any(layer != L for layer in layers),
    )
    hidden = out.last_hidden_state
    feats = torch.stack([hidden if i == L else out.hidden_states[i] for i in layers], dim=2)
    return feats, target.lm_head(hidden[:, -1])


@torch.no_grad()
def _generate_batch(
    target: Target,
    prompts: list[list[int]],
    max_new_tokens: int,
    extra: int,
    layers: list[int],
    eos: set[int],
) -> list[Sequence]:
    """Greedy decoding of a left-padded batch; a row leaves the batch once it has its output
    and `extra` more tokens. Batch 1 runs without a mask, as the engine does."""
    B = len(prompts)
    width = max(map(len, prompts))
    pad = target.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=target.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=target.config)
    feats, logits = _forward(target, ids, None if B == 1 else mask, positions, cache, layers)
    rows = list(range(B))  # batch index → prompt index
    feature_parts = [[feats[b, width - len(p) :]] for b, p in enumerate(prompts)]
    generated: list[list[int]] = [[] for _ in prompts]
    ends = [None] * B  # output length G once known
    margins = [float("inf")] * B
    last_pos = positions[:, -1]
    while True:
        top = logits.float().topk(2, dim=-1)
        tokens = top.indices[:, 0].tolist()
        gaps = (top.values[:, 0] - top.values[:, 1]).tolist()
        keep = []
        for b, i in enumerate(rows):
            generated[i].append(tokens[b])
            margins[i] = min(margins[i], gaps[b])
            n = len(generated[i])
            if ends[i] is None and (tokens[b] in eos or n >= max_new_tokens):
                ends[i] = n
            if ends[i] is None or n < ends[i] + extra:
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=target.device)
            cache.batch_select_indices(index)
            mask, last_pos = mask[index], last_pos[index]
            rows = [rows[b] for b in keep]
            tokens = [tokens[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        last_pos = last_pos + 1
        feats, logits = _forward(
            target,
            torch.tensor(tokens, device=target.device)[:, None],
            None if B == 1 else mask,
            last_pos[:, None],
            cache,
            layers,
        )
        for b, i in enumerate(rows):
            feature_parts[i].append(feats[b])
    out = []
    for i, p in enumerate(prompts):
        G = ends[i]
        feats_i = torch.cat(feature_parts[i])[: len(p) + G - 1]
        out.append(Sequence(p, generated[i][:G], generated[i][: G + extra], feats_i, margins[i]))
    return out


def greedy_generate(
    target: Target,
    prompts: list[list[int]],
    max_new_tokens: int,
    layers: list[int] | None = None,
    extra: int = 0,
    batch_size: int = 16,
    eos_ids: list[int] | None = None,
    tie_margin: float | None = None,
) -> Iterator[tuple[int, Sequence]]:
    """(prompt index, Sequence) for every prompt, in batches of similar length.

    Rows whose batched run came within `tie_margin` of a top-2 tie are regenerated at batch 1
    (default margin: `TIE_MARGIN` of the target's dtype; 0 disables the check)."""
    layers = layers or [target.num_layers]
    eos = set(target.eos_token_ids if eos_ids is None else eos_ids)
    if tie_margin is None:
        tie_margin = TIE_MARGIN.get(target.lm_head.weight.dtype, 1e-3)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _generate_batch(target, [prompts[i] for i in chunk], max_new_tokens, extra, layers, eos)
        for i, seq in zip(chunk, batch, strict=True):
            if len(chunk) > 1 and seq.min_margin < tie_margin:
                (alone,) = _generate_batch(target, [prompts[i]], max_new_tokens, extra, layers, eos)
                alone.batch1 = True
                alone.changed = alone.extended != seq.extended
                seq = alone
            yield i, seq


# ---------------------------------------------------------------------------- the sequence file
SEQUENCES_FORMAT = "mtpkit-greedy-sequences"


class GreedySequences:
    """A file of greedy outputs of one target (its identity and dtype recorded), keyed by prompt
    ids, each with `extra` tokens of continuation past its end: any subset of prompts, any head and
    any K ≤ extra + 1 can be replayed from it. A file for another target, dtype or token budget is
    refused, never mixed."""

    def __init__(self, path: str | Path, target: Target, max_new_tokens: int):
        self.path = Path(path)
        self.key = {
            "target": target.identity(),
            "dtype": str(target.lm_head.weight.dtype).removeprefix("torch."),
            "max_new_tokens": max_new_tokens,
        }
        self.entries: dict[tuple[int, ...], dict] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise DecodeError(f"{self.path}: not a readable greedy-sequence file ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != SEQUENCES_FORMAT:
            raise DecodeError(f"{self.path}: not a greedy-sequence file (format {SEQUENCES_FORMAT!r})")
        for name, want in self.key.items():
            if data.get(name) != want:
                raise DecodeError(
                    f"{self.path}: sequences of another {name} ({data.get(name)!r}, here {want!r}); "
                    "use another file"
                )
        for e in data["sequences"]:
            self.entries[tuple(e["prompt"])] = e

    def get(self, prompt: list[int], extra: int) -> Sequence | None:
        e = self.entries.get(tuple(prompt))
        if e is None or len(e["extended"]) - len(e["tokens"]) < extra:
            return None
        return Sequence(
            list(prompt),
            e["tokens"],
            e["extended"],
            torch.empty(0),
            e["min_margin"],
            e["batch1"],
            e["changed"],
        )

    def put(self, seq: Sequence) -> None:
        self.entries[tuple(seq.prompt)] = {
            "prompt": seq.prompt,
            "tokens": seq.tokens,
            "extended": seq.extended,
            "min_margin": seq.min_margin,
            "batch1": seq.batch1,
            "changed": seq.changed,
        }

    def save(self) -> None:
        data = {
            "format": SEQUENCES_FORMAT,
            "version": 1,
            **self.key,
            "sequences": list(self.entries.values()),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data))


@torch.no_grad()
def sequence_features(target: Target, seq: Sequence, layers: list[int]) -> torch.Tensor:
    """The target features of rows 0..P+G−2 by one teacher-forced forward (batch 1, as the
    engine's verify forwards are), [P + G − 1, n_layers, H]."""
    ids = torch.tensor([seq.prompt + seq.tokens[:-1]], device=target.device)
    with capture_layers(target, layers) as captured:
        hidden = target.backbone(input_ids=ids, use_cache=False).last_hidden_state[0]
    return torch.stack([hidden if i == target.num_layers else captured[i][0] for i in layers], dim=1)


# ---------------------------------------------------------------------------- the head pass
def replay_head(head: DraftHead, dtype: torch.dtype) -> DraftHead:
    """The head as the engine drafts with it in `dtype`, borrowed target modules included (so a
    teacher-forced forward runs in that dtype end to end, as the drafter's casts do)."""
    head.eval()
    if dtype == torch.float32:
        return head
    clone = head.cast(dtype)
    borrowed = head.borrowed
    clone.borrowed = TargetModules(
        copy.deepcopy(borrowed.embed_tokens).to(dtype), copy.deepcopy(borrowed.lm_head).to(dtype)
    )
    return clone.eval()


SEMANTICS = ("mtpkit", "vllm", "sglang")


def check_semantics(head, semantics: str) -> None:
    """Refuse drafting semantics that do not exist, or an engine that cannot serve the head."""
    if semantics not in SEMANTICS:
        raise DecodeError(f"semantics must be one of {list(SEMANTICS)}, got {semantics!r}")
    unserved = {"vllm": ("diffusion",), "sglang": ("medusa", "diffusion")}.get(semantics, ())
    if head.head_type in unserved:
        raise DecodeError(f"{semantics} has no proposer for {head.head_type} heads")


def engine_mtp_forward(head, input_ids: torch.Tensor, hidden: torch.Tensor, depths: int) -> list:
    """An MTP head drafting as vLLM's EagleProposer and SGLang's EAGLE worker chain it, teacher
    forced: step 1 runs over every verified row (target state h_i, token t_{i+1}, position i) and
    its keys are the cache; step j ≥ 2 is one row at position a + j − 1 reading step j−1's output
    and the previous draft, attending to step-1 keys of rows ≤ a and its own chain — EAGLE-3's
    training-time-test pattern. Every step runs MTP layer 0 (vLLM's proposer does not pass
    spec_step_idx; SGLang's NEXTN model has one layer). Returns per-step normed states indexed by
    anchor (step j, row a predicts t_{a+j+1}), as `forward_train`."""
    from mtpkit.heads.common import attention_mask
    from mtpkit.heads.eagle3 import ttt_allowed

    B, T = input_ids.shape
    positions = torch.arange(T)[None].expand(B, -1)
    nxt = torch.zeros_like(input_ids)
    nxt[:, :-1] = input_ids[:, 1:]
    embeds = head.embed_tokens(nxt)
    if head.cfg.zero_first_embedding:
        embeds[:, 0] = 0
    module = head.module_for_step(0)
    cache = DynamicCache()
    prev, outputs = hidden, []
    for j in range(1, depths + 1):
        mask = attention_mask(ttt_allowed(T, j), head.config, prev.dtype)
        out = module(prev, embeds, mask, head.rotary_emb(prev, position_ids=positions), positions, cache)
        # Step j, row i belongs to the chain anchored at i − j + 1: shift it back to its anchor.
        outputs.append(F.pad(module.shared_head.norm(out)[:, j - 1 :], (0, 0, 0, j - 1)))
        prev = F.pad(out[:, :-1], (0, 0, 1, 0))  # step j+1 at row i reads step j's output at row i−1
    return outputs


@torch.no_grad()
def draft_hits(
    head: DraftHead, seq: Sequence, k_max: int, dtype: torch.dtype, semantics: str = "mtpkit"
) -> torch.Tensor:
    """hits [k_max, T] over the extended sequence (T = its length): depth j, row r is True when
    draft j at anchor r (the step that starts with r + 2 verified tokens) equals t_{r+j+1}.
    Rows without features or label are False. `semantics`: whose drafting (see SEMANTICS);
    only MTP heads draft differently in vLLM / SGLang (`engine_mtp_forward`)."""
    full = torch.tensor(seq.prompt + seq.extended)
    T = len(full)
    feats = seq.features.to(dtype)
    n_rows = len(feats)  # rows with target features: 0..P+G−2
    if head.head_type == "mtp" and semantics != "mtpkit":
        x = feats.new_zeros(T, *feats.shape[1:])
        x[:n_rows] = feats
        outs = engine_mtp_forward(head, full[None], x[None, :, 0], k_max)
        drafts = torch.stack([head.lm_head(h[0, :n_rows]).argmax(-1) for h in outs])
    else:
        drafts = head.teacher_forced_drafts(full, feats, len(seq.prompt) - 1, k_max)
    hits = torch.zeros(k_max, T, dtype=torch.bool)
    r = torch.arange(n_rows)
    for j in range(1, k_max + 1):
        ok = (r + j + 1 < T) & (drafts[j - 1] >= 0)
        hits[j - 1, r[ok]] = drafts[j - 1, ok] == full[r[ok] + j + 1]
    return hits


def replay(
    target: Target,
    head,
    prompts: list[list[int]],
    ks: list[int],
    max_new_tokens: int,
    draft_dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    tie_margin: float | None = None,
    semantics: str = "mtpkit",
    sequence_file: str | Path | None = None,
) -> ReplayResult:
    """Greedy speculative decoding's per-step accepted counts for every prompt and K in `ks`,
    without running it: see the module docstring. `semantics` "vllm" / "sglang" predicts those
    engines' drafting of the same head (K = vLLM's num_speculative_tokens = SGLang's
    speculative_num_draft_tokens − 1). `sequence_file`: a `GreedySequences` file read for prompts
    it holds and written with every prompt's sequence (see the module docstring)."""
    if not ks or min(ks) < 1:
        raise DecodeError(f"K (draft tokens per step) must be >= 1, got {ks}")
    check_semantics(head, semantics)
    k_max = max(ks)
    try:  # the engine's own validation of K against the head (Medusa: K ≤ heads, ...)
        head.check_draft_tokens(k_max)
    except ValueError as exc:
        raise DecodeError(str(exc)) from exc
    limit = getattr(target.config, "max_position_embeddings", None)
    for i, p in enumerate(prompts):
        if not p:
            raise DecodeError(f"prompt {i} is empty")
        if limit is not None and len(p) + max_new_tokens + k_max + 1 > limit:
            raise DecodeError(
                f"prompt {i} of {len(p)} tokens + {max_new_tokens} new tokens exceeds the target's "
                f"context of {limit} positions"
            )
    drafting = replay_head(head, draft_dtype)
    layers = head.feature_layers
    steps = {k: [None] * len(prompts) for k in ks}
    sequences: list = [None] * len(prompts)
    store = GreedySequences(sequence_file, target, max_new_tokens) if sequence_file is not None else None
    known = {i: store.get(p, k_max - 1) for i, p in enumerate(prompts)} if store is not None else {}
    known = {i: seq for i, seq in known.items() if seq is not None}
    todo = [i for i in range(len(prompts)) if i not in known]

    def all_sequences() -> Iterator[tuple[int, Sequence]]:
        for i, seq in known.items():
            seq.features = sequence_features(target, seq, layers)
            yield i, seq
        if not todo:
            return
        generated = greedy_generate(
            target,
            [prompts[i] for i in todo],
            max_new_tokens,
            layers,
            k_max - 1,
            batch_size,
            tie_margin=tie_margin,
        )
        for j, seq in generated:
            if store is not None:
                store.put(seq)
            yield todo[j], seq

    for i, seq in all_sequences():
        runs = leading_runs(draft_hits(drafting, seq, k_max, draft_dtype, semantics)).tolist()
        P, G = len(seq.prompt), len(seq.tokens)
        for k in ks:
            steps[k][i] = walk(runs, P - 1, P + G - 2, k)
        seq.features = seq.features[:0]  # done with them: keep memory flat over many prompts
        sequences[i] = seq
    if store is not None and todo:
        store.save()
    result = ReplayResult(
        steps,
        sequences,
        sum(s.batch1 for s in sequences),
        sum(s.changed for s in sequences),
    )
    result.stats = {k: merged(result.prompt_stats(k), k) for k in ks}
    return result
