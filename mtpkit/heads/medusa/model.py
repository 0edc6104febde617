"""Medusa-1 heads on a frozen target: K parallel heads on the final hidden state.

    logitsᵏ_i = lm_headₖ( blockₖ(h_i) ),   blockₖ = num_layers × (x + SiLU(Linear(x)))   predicts t_{i+k+1}

Head k (1-based) skips k tokens past the target's own next-token prediction. The residual
layers start at zero (each block is the identity, as Medusa initialises them) and each head's
LM head starts as a copy of the target's, so at step 0 every head predicts what the target
predicts for t_{i+1}. Drafting is a chain of each head's argmax (no tree): one small MLP and one
LM-head row product per draft, with no attention and no cache.

Names follow vLLM 0.32's `MedusaModel` (`blocks.{h}.layers.{l}.weight/.bias`, `lm_heads.{h}.weight`);
`own_lm_head: false` shares the target's frozen LM head instead (vLLM's `original_lm_head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtpkit.heads.base import DraftHead
from mtpkit.heads.medusa.drafter import MedusaBatchDrafter, MedusaDrafter
from mtpkit.models import Target


@dataclass
class MedusaConfig:
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    own_lm_head: bool = True  # False: every head uses the target's frozen LM head
    bias: bool = True  # vLLM `medusa_fc_bias`

    def __post_init__(self):
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError(
                f"need num_heads >= 1 and num_layers >= 1, got {self.num_heads}, {self.num_layers}"
            )

    @property
    def train_depths(self) -> int:
        return self.num_heads


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int, num_layers: int, bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=bias) for _ in range(num_layers))
        self.act = nn.SiLU()
        for layer in self.layers:  # identity at start
            nn.init.zeros_(layer.weight)
            if bias:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.act(layer(x))
        return x


class MedusaHead(DraftHead):
    head_type = "medusa"

    def __init__(self, target: Target, cfg: MedusaConfig):
        super().__init__(target, cfg)
        H, V = target.hidden_size, target.vocab_size
        self.blocks = nn.ModuleList(ResidualBlock(H, cfg.num_layers, cfg.bias) for _ in range(cfg.num_heads))
        if cfg.own_lm_head:
            self.lm_heads = nn.ModuleList(nn.Linear(H, V, bias=False) for _ in range(cfg.num_heads))
            with torch.no_grad():
                for lm in self.lm_heads:
                    lm.weight.copy_(target.lm_head.weight)

    @property
    def max_draft_tokens(self) -> int:
        return self.cfg.num_heads

    def check_draft_tokens(self, k: int) -> None:
        if k > self.cfg.num_heads:
            raise ValueError(
                f"a Medusa head with {self.cfg.num_heads} heads drafts at most that many tokens, not {k}"
            )

    def output_layers(self, depth: int):
        student = self.lm_heads[depth - 1] if self.cfg.own_lm_head else self.target_lm_head
        return student, self.target_lm_head

    def forward_train(self, input_ids: torch.Tensor, hidden: torch.Tensor, depths: int | None = None) -> list:
        """hidden [B, T, H] (final, post-norm) → per-head states; head k, row i predicts t_{i+k+1}.
        Medusa has exactly `num_heads` depths: asking for more returns `num_heads` entries."""
        depths = min(depths or self.cfg.num_heads, self.cfg.num_heads)
        return [self.blocks[k](hidden) for k in range(depths)]

    def make_drafter(self, k, dtype, pick, greedy=True) -> MedusaDrafter:
        return MedusaDrafter(self, k, dtype, pick, greedy)

    def make_batch_drafter(self, k, dtype, picks, greedy=True) -> MedusaBatchDrafter:
        return MedusaBatchDrafter(self, k, dtype, picks, greedy)
