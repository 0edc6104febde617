"""EAGLE-3 draft head: fused multi-layer target features, one decoder layer, a reduced vocabulary.

    f_i        = fc( [ h^{l1}_i ; h^{l2}_i ; h^{l3}_i ] )            (target layers, low/mid/high)
    g¹_i       = midlayer( e(t_{i+1}), f_i )                          pre-norm output
    logits¹_i  = lm_head( norm(g¹_i) )   over the draft vocabulary    predicts t_{i+2}
    gʲ_i       = midlayer( e(t_{i+1}), gʲ⁻¹_{i−1} )                   step j ≥ 2: the head's own output

midlayer is one decoder layer of the target's (Llama-style) family whose attention input is
[input_layernorm(e) ; hidden_norm(f)] — 2H wide, so q/k/v_proj take 2H — with the residual
stream starting at f (`norm_before_residual=False`, vLLM's default and the only form SGLang
implements) or at hidden_norm(f) (True). The MLP half is the usual one.

Training-time test (TTT): the head is unrolled for `ttt_steps` steps. Step j at row i is the
j-th draft of the chain anchored at row a = i − j + 1, exactly as at inference: its query sits
at position i, it reads the step-1 keys of rows ≤ a (target features) and the step-m key of
row a + m − 1 for m = 2..j (its own earlier drafts). Unlike SpecForge's formulation, which
keeps every step at the anchor's position id, positions here are those inference uses, so a
drafted token's logits equal the training forward's for the same inputs. Outputs are returned
re-indexed by anchor (depth j, row a predicts t_{a+j+1}), the trainer's convention.

Reduced vocabulary: the `draft_vocab_size` most frequent target tokens of the training data,
sorted by id; `d2t[d] = target_id − d` and `t2d[t]` = t is in the draft vocabulary (EAGLE-3's
buffers, which vLLM and SGLang read). Positions whose next token is outside it are masked out of
the loss; distillation uses the target's distribution restricted (renormalised) to it.

Names follow the EAGLE-3 checkpoint that vLLM's `llama_eagle3.py` loads: `fc`, `midlayer.*`
(→ `layers.0.*`), `norm`, `lm_head`, `d2t`, `t2d`. The embedding is the target's (frozen).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from mtpkit.heads.base import DraftHead
from mtpkit.heads.common import (
    LinearView,
    attention_mask,
    causal_allowed,
    init_from_target,
    passthrough_gain,
    zero_residual_writes,
)
from mtpkit.heads.eagle3.drafter import Eagle3BatchDrafter, Eagle3Drafter
from mtpkit.models import Target

DEFAULT_DRAFT_VOCAB = 8192
INITS = ("random", "passthrough")


def default_layers(num_layers: int) -> list[int]:
    """vLLM / SGLang's default aux layers (2, L//2, L−3), or spread ids for tiny targets."""
    if num_layers >= 6:
        return [2, num_layers // 2, num_layers - 3]
    return sorted({0, num_layers // 2, num_layers})


@dataclass
class Eagle3Config:
    layers: list[int] | None = None  # HF hidden_states ids fused by fc; default (2, L//2, L−3)
    draft_vocab_size: int = DEFAULT_DRAFT_VOCAB  # clamped to the target's vocabulary
    ttt_steps: int = 3  # training-time-test unroll (trained depths)
    norm_before_residual: bool = False
    init: str = "random"  # random | passthrough (fc selects the last feature layer, midlayer adds nothing)

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"head init must be one of {INITS}, got {self.init!r}")
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {self.ttt_steps}")
        if self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")

    @property
    def train_depths(self) -> int:
        return self.ttt_steps


class Eagle3Layer(nn.Module):
    """`midlayer`: the target family's decoder layer with a 2H-wide attention input."""

    def __init__(self, config, target: Target, norm_before_residual: bool):
        super().__init__()
        base = target.decoder_layer_cls(config, 0)
        attn = base.self_attn
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(
                f"EAGLE-3 heads need Llama-style attention (q/k/v/o_proj); {type(attn).__name__} has none"
            )
        hidden = config.hidden_size
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
        self.input_layernorm = base.input_layernorm
        self.hidden_norm = type(base.input_layernorm)(hidden, eps=config.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = base.post_attention_layernorm
        self.mlp = base.mlp
        self.norm_before_residual = norm_before_residual

    def forward(self, embeds, hidden, mask, position_embeddings, cache=None):
        """Pre-norm output (hidden + residual) [B, Q, H] of rows `embeds` / `hidden` [B, Q, H]."""
        embeds = self.input_layernorm(embeds)
        if self.norm_before_residual:
            hidden = self.hidden_norm(hidden)
            residual = hidden
        else:
            residual = hidden
            hidden = self.hidden_norm(hidden)
        x, _ = self.self_attn(
            hidden_states=torch.cat([embeds, hidden], dim=-1),
            position_embeddings=position_embeddings,
            attention_mask=mask,
            cache=cache,
        )
        x = residual + x
        return x + self.mlp(self.post_attention_layernorm(x))


def ttt_allowed(T: int, step: int, device=None) -> torch.Tensor:
    """[T, step·T] keys visible to step `step` (1-based) queries: see the module docstring."""
    rows = torch.arange(T, device=device)[:, None]
    cols = torch.arange(T, device=device)[None, :]
    blocks = [cols <= rows - step + 1]
    blocks += [cols == rows - step + m for m in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


class Eagle3Head(DraftHead):
    head_type = "eagle3"
    default_depth_decay = 0.8  # EAGLE-3's per-step loss weights 0.8^j
    needs_token_counts = True  # the draft vocabulary is the data's most frequent tokens
    # Joint training feeds the model's final hidden state only; EAGLE-3 fuses three layers.
    supports_joint = False

    def __init__(self, target: Target, cfg: Eagle3Config):
        if cfg.layers is None:
            cfg.layers = default_layers(target.num_layers)
        target.check_layers(cfg.layers)
        super().__init__(target, cfg)
        self.config = copy.deepcopy(target.config)
        self.config.num_hidden_layers = 1
        hidden = target.hidden_size
        vocab = min(cfg.draft_vocab_size, target.vocab_size)
        self.draft_vocab_size = vocab
        self.fc = nn.Linear(len(cfg.layers) * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(self.config, target, cfg.norm_before_residual)
        self.norm = type(target.final_norm)(hidden, eps=self.config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(vocab, dtype=torch.long))
        t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
        t2d[:vocab] = True
        self.register_buffer("t2d", t2d)
        self.rotary_emb = type(target.backbone.rotary_emb)(config=self.config)
        init_from_target(self.fc, target)
        init_from_target(self.midlayer, target)
        self.norm.load_state_dict(target.final_norm.state_dict())
        self._copy_lm_rows()
        if cfg.init == "passthrough":
            self._passthrough(target)

    @torch.no_grad()
    def _passthrough(self, target: Target) -> None:
        # Start as "the last feature layer, read by the target's LM head": fc is the identity
        # on that layer's block of [h^{l1} ; h^{l2} ; h^{l3}] and zero on the others, and the
        # midlayer adds nothing to its residual stream (which starts at fc's output). `norm`
        # stays the final norm (a logit lens on an inner layer) unless that layer is the final
        # normed state already, whose gains it carries: then one uniform gain.
        H = target.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, -H:].copy_(torch.eye(H))
        zero_residual_writes(self.midlayer)
        if self.cfg.layers[-1] == target.num_layers:
            passthrough_gain(self.norm, target.final_norm)

    # ------------------------------------------------------------------ vocabulary
    @property
    def feature_layers(self) -> list[int]:
        return list(self.cfg.layers)

    def draft_to_target(self) -> torch.Tensor:
        """Target id of each draft id [V_d]."""
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.draft_to_target()[ids]

    def init_vocab(self, counts: torch.Tensor) -> None:
        """Draft vocabulary = the most frequent tokens of `counts` [V] (ties: lower id), sorted by id."""
        if counts.shape != self.t2d.shape:
            raise ValueError(f"token counts have shape {tuple(counts.shape)}, need ({self.t2d.numel()},)")
        order = torch.sort(-counts.long(), stable=True).indices  # by count, ties by lower id
        used = order[: self.draft_vocab_size].sort().values.to(self.d2t.device)
        self.d2t.copy_(used - torch.arange(len(used)))
        self.t2d.zero_()
        self.t2d[used] = True
        self._copy_lm_rows()

    @torch.no_grad()
    def _copy_lm_rows(self) -> None:
        # Start at the target's own logits on the draft vocabulary (as SpecForge does).
        self.lm_head.weight.copy_(self.target_lm_head.weight[self.draft_to_target()])

    def draft_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ids → (draft ids, in draft vocabulary); out-of-vocabulary ids map to 0."""
        index = torch.cumsum(self.t2d.long(), 0) - 1
        inside = self.t2d[labels]
        return torch.where(inside, index[labels], torch.zeros_like(labels)), inside

    def output_layers(self, depth: int) -> tuple[nn.Module, LinearView]:
        """(student LM head, teacher head = the target's restricted to the draft vocabulary)."""
        ids = self.draft_to_target()
        t = self.target_lm_head
        full = LinearView(t.weight, t.bias)
        return self.lm_head, LinearView(t.weight[ids], None if t.bias is None else t.bias[ids], full)

    # ------------------------------------------------------------------ forward
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """[..., n_layers, H] target features → fc input → [..., H]."""
        return self.fc(features.flatten(-2))

    def step(self, embeds, hidden, position_ids, mask, cache=None) -> torch.Tensor:
        cos_sin = self.rotary_emb(hidden, position_ids=position_ids)
        return self.midlayer(embeds, hidden, mask, cos_sin, cache)

    def forward_train(
        self, input_ids: torch.Tensor, features: torch.Tensor, depths: int | None = None
    ) -> list:
        """input_ids [B, T], features [B, T, n_layers, H] → `depths` normed states [B, T, H];
        entry j−1, row a is the step-j state of the chain anchored at a (predicts t_{a+j+1})."""
        depths = depths or self.cfg.ttt_steps
        B, T = input_ids.shape
        position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, -1)
        nxt = torch.zeros_like(input_ids)
        nxt[:, :-1] = input_ids[:, 1:]
        embeds = self.embed_tokens(nxt)  # row i reads t_{i+1}
        hidden = self.fuse(features.to(self.fc.weight.dtype))
        cache = DynamicCache()
        outputs = []
        for j in range(1, depths + 1):
            mask = attention_mask(ttt_allowed(T, j, input_ids.device), self.config, hidden.dtype)
            out = self.step(embeds, hidden, position_ids, mask, cache)
            normed = self.norm(out)
            by_anchor = torch.zeros_like(normed)
            by_anchor[:, : T - j + 1] = normed[:, j - 1 :]
            outputs.append(by_anchor)
            hidden = torch.zeros_like(out)
            hidden[:, 1:] = out[:, :-1]  # step j+1 at row i reads step j's output at row i−1
        return outputs

    def causal_mask(self, q_len: int, past: int, dtype: torch.dtype) -> torch.Tensor:
        return attention_mask(causal_allowed(q_len, past), self.config, dtype)

    def make_drafter(self, k, dtype, pick, greedy=True) -> Eagle3Drafter:
        return Eagle3Drafter(self, k, dtype, pick, greedy)

    def make_batch_drafter(self, k, dtype, picks, greedy=True) -> Eagle3BatchDrafter:
        return Eagle3BatchDrafter(self, k, dtype, picks, greedy)

    def describe(self) -> dict:
        return {**super().describe(), "draft_vocab_size": self.draft_vocab_size}
