"""The one interface every draft-head family implements, and what a family registers.

The trainer, the losses, the decoding engine, the exporters and joint training use a head only
through `DraftHead` (and its family's `Drafter`, or `BatchDrafter` for many sequences); none of them probes a head for optional
attributes or reaches into its private state. A family with nothing to add for a hook inherits
the default, which is what an MTP-style head on the target's final hidden state needs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# A draft picker: logits [V] → (token id, the full-vocabulary probabilities it was sampled from,
# or None when greedy). The engine passes its own, so drafters sample with the engine's RNG.
Pick = Callable[[torch.Tensor], tuple[int, torch.Tensor | None]]


@dataclass(frozen=True)
class TargetModules:
    """The target's embedding and LM head a head borrows: frozen, shared, never saved or trained.

    Kept outside the module tree (a plain attribute, not a submodule), so `state_dict()`,
    `parameters()` and `.to()` of the head never include them; serving engines substitute the
    target's own.
    """

    embed_tokens: nn.Module
    lm_head: nn.Module


@dataclass
class DepthOutputs:
    """What the losses take from a head's training forward.

    `states[k−1]` [B, T, H] is the depth-k state at row i whose logits predict t_{i+k+1};
    `row_weights[k−1]` [B, T], when given, scales each row's loss (0 = not trained)."""

    states: list[torch.Tensor]
    row_weights: list[torch.Tensor] | None = None


class Drafter(Protocol):
    """Drafting state of one head for one decode (batch size 1).

    `start(features)` gets the target's features of the prompt rows, `draft(ids)` returns K
    proposals for positions N..N+K−1 given the N verified tokens (with the probabilities they
    were sampled from, None when greedy), and `commit(features)` gets the features of the rows
    the last verification accepted. Features are [n, len(head.feature_layers), H]."""

    def start(self, features: torch.Tensor) -> None: ...

    def commit(self, features: torch.Tensor) -> None: ...

    def draft(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]: ...


class BatchDrafter(Protocol):
    """Drafting state of one head for B sequences at once (batched speculative decoding), for
    families that can draft every row in one pass. Row b of each list is sequence b; `start`
    also gets the most positions a row will reach, `select(rows)` keeps those rows only (in that
    order: sequences that ended leave), and `draft` returns (drafts, probabilities) per row —
    each exactly what the family's `Drafter` would return for that sequence alone."""

    def start(self, features: list[torch.Tensor], width: int) -> None: ...

    def commit(self, features: list[torch.Tensor]) -> None: ...

    def draft(self, ids: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor | None]]]: ...

    def select(self, rows: list[int]) -> None: ...


class DraftHead(nn.Module):
    """Base of every head family. Subclasses set `head_type`, build their modules in `__init__`
    (after `super().__init__(target, cfg)`) and implement `forward_train` and `make_drafter`."""

    head_type: ClassVar[str]
    default_depth_decay: ClassVar[float] = 1.0  # per-depth loss weights decay^(k−1) unless configured
    needs_token_counts: ClassVar[bool] = False  # True: `init_vocab` wants the training data's token counts
    supports_joint: ClassVar[bool] = True  # trainable inside `mtpkit sft` / `rl` from the final hidden state
    inference_options: ClassVar[tuple[str, ...]] = ()  # options `configure_inference` accepts

    def __init__(self, target, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.num_target_layers: int = target.num_layers
        self.borrowed = TargetModules(target.embed_tokens, target.lm_head)

    # ------------------------------------------------------------------ borrowed target modules
    @property
    def embed_tokens(self) -> nn.Module:
        return self.borrowed.embed_tokens

    @property
    def target_lm_head(self) -> nn.Module:
        return self.borrowed.lm_head

    @contextlib.contextmanager
    def borrowing(self, modules: TargetModules) -> Iterator[None]:
        """Use other target modules for a while (joint training: detached views of the model's)."""
        saved, self.borrowed = self.borrowed, modules
        try:
            yield
        finally:
            self.borrowed = saved

    def cast(self, dtype: torch.dtype) -> DraftHead:
        """The head itself in float32; otherwise a copy in `dtype` sharing the borrowed modules.
        Rotary frequencies stay float32: positions need the precision."""
        if dtype == torch.float32:
            return self
        clone = copy.deepcopy(self, memo={id(self.borrowed): self.borrowed})
        for name, child in clone.named_children():
            if name != "rotary_emb":
                child.to(dtype)
        return clone

    # ------------------------------------------------------------------ what the trainer asks
    @property
    def feature_layers(self) -> list[int]:
        """HF `hidden_states` ids the head reads (default: the final post-norm state)."""
        return [self.num_target_layers]

    @property
    def train_depths(self) -> int:
        """Depths the training forward produces; also the default draft tokens per step (K)."""
        return self.cfg.train_depths

    @property
    def max_draft_tokens(self) -> int | None:
        """The most draft tokens per step the head can propose (None: no limit)."""
        return None

    def check_draft_tokens(self, k: int) -> None:
        """Refuse K draft tokens per step beyond what the head can propose."""
        if self.max_draft_tokens is not None and k > self.max_draft_tokens:
            raise ValueError(
                f"a {self.head_type} head drafts at most {self.max_draft_tokens} tokens per step, not {k}"
            )

    def init_vocab(self, counts: torch.Tensor) -> None:
        """Called before training with the data's token counts when `needs_token_counts`."""

    def train_outputs(
        self, input_ids: torch.Tensor, inputs: torch.Tensor, depths: int | None
    ) -> DepthOutputs:
        """The training forward in the losses' form; `inputs` is `hidden` [B, T, H] (the final
        post-norm state) or the stacked `feature_layers` [B, T, n, H] for multi-layer heads."""
        return DepthOutputs(self.forward_train(input_ids, inputs, depths))

    def forward_train(self, input_ids: torch.Tensor, inputs: torch.Tensor, depths: int | None = None):
        raise NotImplementedError

    def output_layers(self, depth: int) -> tuple[nn.Module, nn.Module | None]:
        """(LM head that turns depth-`depth` states into logits, teacher LM head for distillation:
        None = the same one). Needs only `.weight` / `.bias`."""
        return self.target_lm_head, None

    def draft_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ids → (ids in the head's vocabulary, whether the head can produce them)."""
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids in the head's vocabulary → target ids (a reduced vocabulary maps; default: the same)."""
        return ids

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def teacher_forced_drafts(
        self, ids: torch.Tensor, features: torch.Tensor, first_row: int, depths: int
    ) -> torch.Tensor:
        """Greedy drafts [depths, n] (target ids) at every anchor row r < n = len(features) of the
        sequence `ids` [T], read from one teacher-forced pass: entry j−1, r is the j-th draft of the
        decode step whose last processed row is r, i.e. what the drafter proposes for t_{r+j+1}
        once drafts 1..j−1 were right. Rows before `first_row` (the prompt) may be left −1.
        `features` [n, len(feature_layers), H] are the target's at rows 0..n−1. Replay uses this;
        a drafter that is not the training forward read row by row overrides it."""
        T, n = len(ids), len(features)
        x = features.new_zeros(T, *features.shape[1:])
        x[:n] = features
        inputs = x[None] if self.feature_layers != [self.num_target_layers] else x[None, :, 0]
        drafts = torch.full((depths, n), -1, dtype=torch.long)
        for j, h in enumerate(self.forward_train(ids[None], inputs, depths), start=1):
            student = self.output_layers(j)[0]
            drafts[j - 1] = self.to_target_ids(F.linear(h[0, :n], student.weight, student.bias).argmax(-1))
        return drafts

    def make_drafter(self, k: int, dtype: torch.dtype, pick: Pick, greedy: bool = True) -> Drafter:
        raise NotImplementedError

    def make_batch_drafter(
        self, k: int, dtype: torch.dtype, picks: list[Pick], greedy: bool = True
    ) -> BatchDrafter | None:
        """A drafter for len(picks) sequences at once (row b samples with picks[b]), or None: the
        batched engine then runs one `make_drafter` drafter per row."""
        return None

    def configure_inference(self, **options: Any) -> None:
        """Set inference-time options (e.g. a diffusion head's denoising steps)."""
        unknown = sorted(set(options) - set(self.inference_options))
        if unknown:
            raise ValueError(
                f"{self.head_type} heads take no inference option(s) {unknown}"
                + (f"; they take {list(self.inference_options)}" if self.inference_options else "")
            )

    def describe(self) -> dict:
        return {"head_type": self.head_type, **asdict(self.cfg)}


@dataclass(frozen=True)
class HeadFamily:
    """Everything mtpkit knows about a head family, registered once in `mtpkit.heads`.

    `export_formats` names the `mtpkit export` formats that represent the family exactly (the
    writers live in `mtpkit.export`, which checks every name here exists)."""

    name: str
    config: type
    model: type[DraftHead]
    drafter: type
    export_formats: tuple[str, ...] = ()
    description: str = ""
