"""DeepSeek-V3-style multi-token-prediction head on a frozen target.

For depth k = 1..K (chained), with h⁰ the target's final post-norm hidden state and e the
target's (frozen) embedding:

    hᵏ_i      = Blockₖ( eh_projₖ( [ enormₖ(e(t_{i+k})) ; hnormₖ(hᵏ⁻¹_i) ] ) )
    logitsᵏ_i = LMHead( shared_head.normₖ(hᵏ_i) )          predicts t_{i+k+1}

Blockₖ is one decoder layer of the target's own family (Llama layer for Llama, MLA + MoE for
DeepSeek-V3), with causal attention over the sequence. D distinct modules are kept; step k
uses module (k−1) mod D, which is how vLLM and SGLang reuse depths when asked for more draft
tokens than the checkpoint has — so training with `train_depths > num_depths` (repeated-layer
mode, Megatron's `--mtp-use-repeated-layer`) teaches a module to consume its own output.

Parameter names follow the DeepSeek-V3 checkpoint (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, and the block's `self_attn.*`, `mlp.*`, `*_layernorm`) so export is a rename.
The embedding and LM head are the target's, referenced but not owned: the serving engines
substitute the target's own, so a trained copy would be thrown away.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mtpkit.heads.base import DraftHead
from mtpkit.heads.common import passthrough_gain, zero_residual_writes
from mtpkit.heads.mtp.drafter import MTPBatchDrafter, MTPDrafter
from mtpkit.models import Target

INITS = ("random", "last_layer", "passthrough")


@dataclass
class MTPConfig:
    num_depths: int = 1  # D: distinct MTP modules (exported as layers L .. L+D-1)
    train_depths: int | None = None  # chained steps trained; > D = repeated-layer mode. Default D
    init: str = "random"  # random | last_layer (copy the target's last decoder layer into each
    # block) | passthrough (each module starts as h ↦ h: the target's own next-token prediction)
    zero_first_embedding: bool = True  # vLLM zeroes the embedding input at position 0; train the same way

    def __post_init__(self):
        if self.train_depths is None:
            self.train_depths = self.num_depths
        if self.num_depths < 1 or self.train_depths < self.num_depths:
            raise ValueError(
                f"need num_depths >= 1 and train_depths >= num_depths, got {self.num_depths}, {self.train_depths}"
            )
        if self.init not in INITS:
            raise ValueError(f"head init must be one of {INITS}, got {self.init!r}")


def head_model_config(target: Target, num_depths: int):
    """The target's config extended by D layers, so blocks get layer ids L..L+D-1 (as exported)."""
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = target.num_layers + num_depths
    if getattr(cfg, "layer_types", None):  # per-layer attention types (sliding / full)
        cfg.layer_types = list(cfg.layer_types) + [cfg.layer_types[-1]] * num_depths
    return cfg


class SharedHead(nn.Module):
    """`shared_head.norm`; the `shared_head.head` LM head is the target's."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm


class MTPModule(nn.Module):
    def __init__(self, config, target: Target, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        norm_cls = type(target.final_norm)
        self.enorm = norm_cls(hidden, eps=eps)
        self.hnorm = norm_cls(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = target.decoder_layer_cls(config, layer_idx)
        self.shared_head = SharedHead(norm_cls(hidden, eps=eps))

    def forward(
        self, prev_hidden, token_embeds, attention_mask, position_embeddings, position_ids, cache=None
    ):
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(prev_hidden)], dim=-1))
        out = self.block(
            x,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            cache=cache,
            use_cache=cache is not None,
        )
        return out[0] if isinstance(out, tuple) else out


class MTPHead(DraftHead):
    """D chained MTP modules over a frozen target (see module docstring)."""

    head_type = "mtp"

    def __init__(self, target: Target, cfg: MTPConfig):
        super().__init__(target, cfg)
        self.config = head_model_config(target, cfg.num_depths)
        L = target.num_layers
        self.layers = nn.ModuleList(MTPModule(self.config, target, L + d) for d in range(cfg.num_depths))
        self.rotary_emb = type(target.backbone.rotary_emb)(config=self.config)
        self._init_weights(target)

    # ------------------------------------------------------------------ init
    def _init_weights(self, target: Target) -> None:
        # The target family's own initialiser knows its module types (norms, MLA projections,
        # MoE experts and router), so a random head is initialised as a fresh layer would be.
        for module in self.layers.modules():
            target.model._init_weights(module)
        for module in self.layers:
            # shared_head.norm feeds the target's LM head, which was trained on the output of the
            # target's final norm: start at its scale (SmolLM2's averages 1.8, not 1), or the
            # head spends its first thousand steps only growing logits.
            module.shared_head.norm.load_state_dict(target.final_norm.state_dict())
        if self.cfg.init == "last_layer":
            # Start from the target's last layer: a block that already speaks the target's
            # hidden-state language; eh_proj and the norms stay freshly initialised.
            for module in self.layers:
                module.block.load_state_dict(target.backbone.layers[-1].state_dict())
        if self.cfg.init == "passthrough":
            for module in self.layers:
                self._passthrough(module, target)

    @staticmethod
    @torch.no_grad()
    def _passthrough(module: MTPModule, target: Target) -> None:
        # A module that starts as h ↦ h: eh_proj reads only the hidden half of its input
        # [enorm(e) ; hnorm(h)] (identity there, zero on the embedding), the block adds nothing
        # to its residual stream, and shared_head.norm — whose input, hnorm(h), already carries
        # the final norm's gains — is one uniform gain. The LM head then reads h's direction:
        # the head starts at the target's own prediction from h instead of at noise, so what
        # is left to learn is the correction the next token's embedding brings.
        H = target.hidden_size
        module.eh_proj.weight.zero_()
        module.eh_proj.weight[:, H:].copy_(torch.eye(H))
        zero_residual_writes(module.block)
        passthrough_gain(module.shared_head.norm, target.final_norm)

    # ------------------------------------------------------------------ frozen pieces
    @property
    def lm_head(self) -> nn.Module:
        """Drafts use the target's LM head (vLLM / SGLang substitute it at load)."""
        return self.target_lm_head

    def module_for_step(self, step: int) -> MTPModule:
        """Module used at (0-based) draft step `step`: cyclic, as vLLM / SGLang do."""
        return self.layers[step % self.cfg.num_depths]

    # ------------------------------------------------------------------ training forward
    def forward_train(self, input_ids: torch.Tensor, hidden: torch.Tensor, depths: int | None = None) -> list:
        """Chained forward over a right-padded batch.

        input_ids [B, T] and hidden [B, T, H] (the target's final post-norm states) → a list of
        `depths` tensors [B, T, H], each after `shared_head.norm`: entry k−1 at row i is the
        depth-k state whose logits predict t_{i+k+1}. Rows with i + k ≥ T carry no token and
        must be masked by the loss (they cannot influence valid rows: attention is causal).
        """
        depths = depths or self.cfg.train_depths
        B, T = input_ids.shape
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, -1)
        prev = hidden
        cos_sin = self.rotary_emb(prev, position_ids=position_ids)
        mask = self._causal_mask(prev, position_ids)
        outputs = []
        for step in range(depths):
            k = step + 1
            shifted = torch.zeros_like(input_ids)
            shifted[:, : T - k] = input_ids[:, k:]
            embeds = self.embed_tokens(shifted)
            valid = torch.zeros(B, T, 1, dtype=embeds.dtype, device=embeds.device)
            valid[:, : T - k] = 1
            if self.cfg.zero_first_embedding:
                valid[:, 0] = 0
            module = self.module_for_step(step)
            prev = module(prev, embeds * valid, mask, cos_sin, position_ids)
            outputs.append(module.shared_head.norm(prev))
        return outputs

    def _causal_mask(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache=None):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=None,
            cache=cache,
            position_ids=position_ids,
        )

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(normed_hidden)

    def make_drafter(self, k, dtype, pick, greedy=True) -> MTPDrafter:
        return MTPDrafter(self, k, dtype, pick, greedy)

    def make_batch_drafter(self, k, dtype, picks, greedy=True) -> MTPBatchDrafter:
        return MTPBatchDrafter(self, k, dtype, picks, greedy)
