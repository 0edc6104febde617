"""Training batches: from a `collect` store (offline) or from the target in the loop (online).

Both sources hand the trainer right-padded `Batch`es and expose their position as a small
state dict, so a resumed run sees exactly the batches an uninterrupted run would have seen.
Under data parallelism (`shard` = (rank, ranks)) every rank plans the same global batches and
collates only its part of each (mtpkit.distributed.sampler); the position is global, so a run
resumes at another world size on the same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mtpkit.data.collect import CollectConfig, generate_conversations, stream_items, teacher_forced_hidden
from mtpkit.data.store import Sample, Store
from mtpkit.distributed.sampler import rank_batch
from mtpkit.errors import MtpkitError
from mtpkit.models import Target

_GROUP = 64  # samples sorted by length together, to cut padding without losing shuffling


class DataError(MtpkitError, ValueError):
    pass


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] bool (False on padding)
    hidden: torch.Tensor  # [B, T, H] float32: the target's final post-norm hidden states
    features: torch.Tensor | None = None  # [B, T, n, H] float32: other layers a head reads (EAGLE-3)

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def collate_samples(
    samples: list[Sample], max_seq_len: int, layer: int = -1, feature_layers: list[int] | None = None
) -> Batch:
    """Right-pad samples (truncated to max_seq_len); `layer` picks the stored layer to use as
    `hidden`, `feature_layers` (indices into the stored layers) those stacked into `features`."""
    lengths = [min(len(s.input_ids), max_seq_len) for s in samples]
    B, T = len(samples), max(lengths)
    H = samples[0].hidden_states.shape[-1]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    hidden = torch.zeros(B, T, H, dtype=torch.float32)
    for row, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        ids[row, :n] = s.input_ids[:n]
        mask[row, :n] = s.loss_mask[:n]
        hidden[row, :n] = s.hidden_states[:n, layer].float()
    features = None
    if feature_layers is not None:
        features = torch.zeros(B, T, len(feature_layers), H, dtype=torch.float32)
        for row, (s, n) in enumerate(zip(samples, lengths, strict=True)):
            features[row, :n] = s.hidden_states[:n, feature_layers].float()
    return Batch(ids, mask, hidden, features)


def target_batch(
    target: Target,
    seqs: list[tuple[list[int], list[bool]]],
    max_seq_len: int,
    feature_layers: list[int] | None,
) -> Batch:
    """Run the target over (ids, mask) sequences (cut to max_seq_len first: causal, so the kept
    prefix is unchanged) and collate: what online training and a tokens store train on."""
    seqs = [(ids[:max_seq_len], mask[:max_seq_len]) for ids, mask in seqs]
    final = target.num_layers
    layers = [final] + [x for x in feature_layers or [] if x != final]
    hidden = teacher_forced_hidden(target, [ids for ids, _ in seqs], layers, torch.float32, 1 << 30)
    samples = [
        Sample(torch.as_tensor(ids), torch.as_tensor(m, dtype=torch.bool), h)
        for (ids, m), h in zip(seqs, hidden, strict=True)
    ]
    features = None if feature_layers is None else [layers.index(x) for x in feature_layers]
    return collate_samples(samples, max_seq_len, 0, features)


def token_counts(batches_or_samples, vocab_size: int) -> torch.Tensor:
    """Occurrences [V] of each token in loss-masked positions (what a draft vocabulary serves)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for item in batches_or_samples:
        ids = item.input_ids[item.loss_mask.bool()]
        counts += torch.bincount(ids.flatten(), minlength=vocab_size)[:vocab_size]
    return counts


def masked_out(batch: Batch, padding: bool) -> Batch:
    """A padding batch (a rank with no samples of this global batch) contributes no labels."""
    if padding:
        batch.loss_mask.zero_()
    return batch


def plan_batches(lengths: dict[int, int], seed: int, epoch: int, token_budget: int) -> list[list[int]]:
    """One epoch of batches: shuffled, grouped by length, each within batch x longest <= budget."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = sorted(lengths)
    rng.shuffle(order)
    batches: list[list[int]] = []
    for g in range(0, len(order), _GROUP):
        group = sorted(order[g : g + _GROUP], key=lambda i: lengths[i])
        batch: list[int] = []
        for i in group:
            if batch and (len(batch) + 1) * lengths[i] > token_budget:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


class StoreSource:
    """Shuffled, length-grouped padded batches over a store's train split; held-out eval split.

    A tokens store (ids and masks only) needs `target`: each batch's hidden states are recomputed
    by one teacher-forced forward, the same one `collect` would have stored."""

    def __init__(
        self,
        store: Store,
        token_budget: int,
        max_seq_len: int,
        eval_fraction: float,
        eval_max_samples: int,
        seed: int,
        feature_layers: list[int] | None = None,
        shard: tuple[int, int] = (0, 1),
        target: Target | None = None,
    ):
        if len(store) == 0:
            raise DataError(f"{store.root}: the store holds no samples; run `mtpkit collect` first")
        self.store, self.token_budget, self.max_seq_len, self.seed = store, token_budget, max_seq_len, seed
        self.shard, self.target, self.feature_layers = shard, target, feature_layers
        if store.kind == "tokens" and target is None:
            raise DataError(f"{store.root}: a tokens store needs the target to recompute hidden states")
        self.layer = store.layers.index(store.manifest["model"]["num_layers"])
        missing = [x for x in feature_layers or [] if x not in store.layers]
        if missing and store.kind == "hidden":
            raise DataError(
                f"{store.root}: the head reads layers {feature_layers} but the store holds {store.layers}; "
                f"collect with --layers {' '.join(map(str, sorted(set(feature_layers) | set(store.layers))))}"
            )
        self.features = None
        if feature_layers is not None and store.kind == "hidden":
            self.features = [store.layers.index(x) for x in feature_layers]
        self.lengths = [min(n, max_seq_len) for n in store.sample_lengths()]
        order = list(range(len(store)))
        random.Random(seed).shuffle(order)
        n_eval = min(eval_max_samples, round(len(store) * eval_fraction)) if len(store) > 1 else 0
        self.eval_indices = sorted(order[:n_eval])
        self.train_lengths = {i: self.lengths[i] for i in order[n_eval:]}
        self.epoch, self.index = 0, 0
        self._plan = plan_batches(self.train_lengths, seed, 0, token_budget)

    def next_batch(self) -> Batch:
        if self.index >= len(self._plan):
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = plan_batches(self.train_lengths, self.seed, self.epoch, self.token_budget)
        ids = self._plan[self.index]
        self.index += 1
        return self._collate(ids)

    def _collate(self, ids: list[int]) -> Batch:
        mine, padding = rank_batch(ids, *self.shard)
        samples = [self.store[i] for i in mine]
        if self.store.kind == "tokens":
            seqs = [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in samples]
            batch = target_batch(self.target, seqs, self.max_seq_len, self.feature_layers)
        else:
            batch = collate_samples(samples, self.max_seq_len, self.layer, self.features)
        return masked_out(batch, padding)

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        # Every training sample, whatever the rank: all ranks must pick the same draft vocabulary.
        return token_counts((self.store[i] for i in self.train_lengths), vocab_size)

    def eval_batches(self) -> list[Batch]:
        lengths = {i: self.lengths[i] for i in self.eval_indices}
        plan = plan_batches(lengths, self.seed, -1, self.token_budget) if lengths else []
        return [self._collate(ids) for ids in plan]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._plan = plan_batches(self.train_lengths, self.seed, self.epoch, self.token_budget)


class OnlineSource:
    """The frozen target answers prompts (or windows a corpus) in the loop; no store is written.

    Items cycle epoch after epoch in a seeded order; the first `eval_samples` items of the
    unshuffled stream are held out for evaluation and never trained on.
    """

    def __init__(
        self,
        target: Target,
        online,
        max_seq_len: int,
        seed: int,
        feature_layers: list[int] | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        if not online.prompts:
            raise DataError("data.online.prompts is empty: give prompt or corpus files")
        self.target, self.cfg, self.seed = target, online, seed
        self.collect_cfg = CollectConfig(
            model=target.name,
            prompts=online.prompts,
            out="",
            mode=online.mode,
            format=online.format,
            text_field=online.text_field,
            max_new_tokens=online.max_new_tokens,
            temperature=online.temperature,
            top_p=online.top_p,
            sample_size=online.sample_size,
            stride=online.stride,
            max_length=max_seq_len,
            batch_size=online.batch_size,
        )
        items = stream_items(target, self.collect_cfg)  # unshuffled: epochs reshuffle below
        if len(items) <= online.eval_samples:
            raise DataError(
                f"online data has {len(items)} items, not more than eval_samples={online.eval_samples}"
            )
        self.eval_items, self.items = items[: online.eval_samples], items[online.eval_samples :]
        self.max_seq_len, self.shard = max_seq_len, shard
        self.feature_layers = feature_layers
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.cfg.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _make(self, items, seed: int) -> Batch:
        """This rank's part of a global batch of `items`: answered, run through the target, collated."""
        mine, padding = rank_batch(list(range(len(items))), *self.shard)
        items = [items[i] for i in mine]
        if self.cfg.mode == "generate":
            seqs, _, _ = generate_conversations(self.target, self.collect_cfg, items, seed)
        else:
            seqs = [(ids, [True] * len(ids), src) for ids, src in items]
        if not seqs:
            raise DataError("every prompt of an online batch exceeded max_seq_len - max_new_tokens")
        batch = target_batch(
            self.target, [(ids, m) for ids, m, _ in seqs], self.max_seq_len, self.feature_layers
        )
        return masked_out(batch, padding)

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        # Online answers exist only once generated: count the held-out ones (they only pick a vocabulary;
        # under data parallelism each rank counts its own part, so use one process or a store).
        return token_counts(self.eval_batches(), vocab_size)

    def next_batch(self) -> Batch:
        order = self._order(self.epoch)
        if self.index >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order = self._order(self.epoch)
        picked = order[self.index : self.index + self.cfg.batch_size]
        seed = self.seed * 1_000_003 + self.epoch * 7919 + self.index
        self.index += len(picked)
        return self._make([self.items[i] for i in picked], seed)

    def eval_batches(self) -> list[Batch]:
        if not hasattr(self, "_eval"):
            bs = self.cfg.batch_size
            self._eval = [
                self._make(self.eval_items[i : i + bs], self.seed + i)
                for i in range(0, len(self.eval_items), bs)
            ]
        return self._eval

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
