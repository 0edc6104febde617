"""Block-diffusion draft head (dMTP): a masked-diffusion denoiser of the next L tokens.

For an anchor row l the target has produced h_l and, from it, the next token t_{l+1} (at
decode time: the bonus token of the last verification, always known). The head sees a
sequence of 1 + L positions,

    position 0       c = eh_proj( [ enorm(e(t_{l+1})) ; hnorm(h_l) ] )    the condition (clean)
    positions 1..L   [MASK] (own learned embedding) or enorm(e(token)) once unmasked

through `num_hidden_layers` decoder layers of the target's family with *bidirectional*
attention, then a final norm and the target's frozen LM head; position p predicts t_{l+p+1}
(depth p in the trainer's convention: row l, depth p → t_{l+p+1}). The condition is a prefix
position rather than a vector added to every position because attention lets each block
position read what it needs of it, and it carries the anchor token — which a prefix keeps
distinct from the block's own (masked) tokens.

Training (MDLM / LLaDA masked diffusion): per anchor t ~ U[ε, 1), each block position masked
with probability 1 − α(t); cross-entropy on masked positions weighted by −α′(t)/(1 − α(t))
(`scheduler`) or 1 (`ones`), normalised by the number of masked tokens. Schedules: linear
α = 1 − t, cosine α = cos(πt/2), kappa α = 1 − t^κ. At most `max_anchors` anchor rows per
batch are trained (random), which bounds a step's cost at max_anchors·(L + 1) tokens.

Inference: start all-masked and unmask over S = `denoising_steps` passes — greedy unmasks the
most confident positions first; sampling unmasks left to right, so every drafted token is drawn
from exactly the distribution recorded for rejection sampling given the tokens before it.
In eval mode `forward_train` runs this same greedy denoising, so simulated τ measures drafting.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from mtpkit.heads.base import DepthOutputs, DraftHead
from mtpkit.heads.common import attention_mask, init_from_target
from mtpkit.heads.diffusion.drafter import DiffusionBatchDrafter, DiffusionDrafter
from mtpkit.models import Target

SCHEDULERS = ("linear", "cosine", "kappa")
LOSS_WEIGHTS = ("scheduler", "ones")


@dataclass
class DiffusionConfig:
    block_length: int = 4  # L: tokens drafted per block
    num_hidden_layers: int = 1
    time_epsilon: float = 1e-3
    scheduler_type: str = "linear"  # linear | cosine | kappa
    kappa: float = 2.0  # kappa schedule: α = 1 − t^κ
    loss_weight_type: str = "scheduler"  # scheduler | ones
    denoising_steps: int = 1  # S passes at inference (1..L)
    max_anchors: int = 512  # anchor rows trained per batch

    def __post_init__(self):
        if self.block_length < 1 or self.num_hidden_layers < 1:
            raise ValueError("need block_length >= 1 and num_hidden_layers >= 1")
        if not 0 < self.time_epsilon < 1:
            raise ValueError(f"time_epsilon must be in (0, 1), got {self.time_epsilon}")
        if self.scheduler_type not in SCHEDULERS:
            raise ValueError(f"scheduler_type must be one of {SCHEDULERS}, got {self.scheduler_type!r}")
        if self.loss_weight_type not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight_type must be one of {LOSS_WEIGHTS}, got {self.loss_weight_type!r}")
        if not 1 <= self.denoising_steps <= self.block_length:
            raise ValueError(f"denoising_steps must be in 1..block_length, got {self.denoising_steps}")
        if self.kappa <= 0 or self.max_anchors < 1:
            raise ValueError("need kappa > 0 and max_anchors >= 1")

    @property
    def train_depths(self) -> int:
        return self.block_length


def alpha(t: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Probability that a position is still clean at time t (α(0) = 1, α(1) = 0)."""
    if cfg.scheduler_type == "linear":
        return 1 - t
    if cfg.scheduler_type == "cosine":
        return torch.cos(math.pi / 2 * t)
    return 1 - t.pow(cfg.kappa)


def loss_weight(t: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """−α′(t) / (1 − α(t)) (the ELBO weight), or 1."""
    if cfg.loss_weight_type == "ones":
        return torch.ones_like(t)
    if cfg.scheduler_type == "linear":
        return 1 / t
    if cfg.scheduler_type == "cosine":
        return (math.pi / 2) * torch.sin(math.pi / 2 * t) / (1 - torch.cos(math.pi / 2 * t))
    return cfg.kappa / t


def sample_masks(n: int, L: int, cfg: DiffusionConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ U[ε, 1) per block [n] and its mask [n, L]: each position masked w.p. 1 − α(t)."""
    t = cfg.time_epsilon + (1 - cfg.time_epsilon) * torch.rand(n, device=device)
    return t, torch.rand(n, L, device=device) < (1 - alpha(t, cfg))[:, None]


def unmask_counts(L: int, steps: int) -> list[int]:
    """Positions unmasked at each of `steps` passes (as even as possible, summing to L)."""
    return [(L * (s + 1)) // steps - (L * s) // steps for s in range(steps)]


class DiffusionHead(DraftHead):
    head_type = "diffusion"
    inference_options = ("denoising_steps",)

    def __init__(self, target: Target, cfg: DiffusionConfig):
        super().__init__(target, cfg)
        self.config = copy.deepcopy(target.config)
        self.config.num_hidden_layers = cfg.num_hidden_layers
        if getattr(self.config, "layer_types", None):
            self.config.layer_types = [self.config.layer_types[-1]] * cfg.num_hidden_layers
        H, eps = target.hidden_size, self.config.rms_norm_eps
        norm_cls = type(target.final_norm)
        self.enorm = norm_cls(H, eps=eps)
        self.hnorm = norm_cls(H, eps=eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.mask_embedding = nn.Parameter(torch.zeros(H))
        self.layers = nn.ModuleList(
            target.decoder_layer_cls(self.config, i) for i in range(cfg.num_hidden_layers)
        )
        self.norm = norm_cls(H, eps=eps)
        self.rotary_emb = type(target.backbone.rotary_emb)(config=self.config)
        for module in (self.eh_proj, self.layers):
            init_from_target(module, target)
        nn.init.normal_(self.mask_embedding, std=getattr(self.config, "initializer_range", 0.02))
        self.norm.load_state_dict(target.final_norm.state_dict())

    @property
    def lm_head(self) -> nn.Module:
        return self.target_lm_head

    @property
    def max_draft_tokens(self) -> int:
        return self.cfg.block_length

    def check_draft_tokens(self, k: int) -> None:
        if k > self.cfg.block_length:
            raise ValueError(
                f"a diffusion head with block_length {self.cfg.block_length} drafts at most that many, not {k}"
            )

    def configure_inference(self, denoising_steps: int | None = None, **options) -> None:
        """S can differ from what the head was trained / saved with."""
        super().configure_inference(**options)
        if denoising_steps is not None:
            if not 1 <= denoising_steps <= self.cfg.block_length:
                raise ValueError(
                    f"denoising_steps must be in 1..{self.cfg.block_length} (block_length), got {denoising_steps}"
                )
            self.cfg.denoising_steps = denoising_steps

    # ------------------------------------------------------------------ the denoiser
    def denoise_pass(self, cond: torch.Tensor, anchor: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """cond [n, H] (h_l), anchor [n] (t_{l+1}), block [n, L] token ids with −1 = [MASK]
        → normed states [n, L, H] of the block positions."""
        n, L = block.shape
        dtype = self.eh_proj.weight.dtype
        c = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(anchor).to(dtype)), self.hnorm(cond)], -1))
        masked = block < 0
        tokens = self.enorm(self.embed_tokens(block.clamp(min=0)).to(dtype))
        tokens = torch.where(masked[..., None], self.mask_embedding.to(dtype), tokens)
        x = torch.cat([c[:, None], tokens], dim=1)
        position_ids = torch.arange(L + 1, device=x.device)[None].expand(n, -1)
        cos_sin = self.rotary_emb(x, position_ids=position_ids)
        mask = attention_mask(torch.ones(L + 1, L + 1, dtype=torch.bool, device=x.device), self.config, dtype)
        for layer in self.layers:
            out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
            x = out[0] if isinstance(out, tuple) else out
        return self.norm(x[:, 1:])

    def denoise(self, cond, anchor, steps: int, logits_fn, pick=None):
        """S-pass decoding of n blocks. Greedy (pick None): argmax, most confident first.
        With `pick` (n = 1, sampling): each position sampled by `pick(logits)` left to right.
        Returns tokens [n, L], states [n, L, H] at each position's unmasking pass, and picks' probs."""
        n, L = cond.shape[0], self.cfg.block_length
        block = torch.full((n, L), -1, dtype=torch.long, device=cond.device)
        states = cond.new_zeros(n, L, cond.shape[-1])
        probs: list = [None] * L
        rows = torch.arange(n, device=cond.device)
        for count in unmask_counts(L, steps):
            h = self.denoise_pass(cond, anchor, block)
            masked = block < 0
            if pick is None:
                logits = logits_fn(h).float()
                conf, tok = logits.softmax(-1).max(-1)
                conf = conf.masked_fill(~masked, -1.0)
                chosen = conf.topk(count, dim=-1).indices  # [n, count]
                block[rows[:, None], chosen] = tok[rows[:, None], chosen]
                states[rows[:, None], chosen] = h[rows[:, None], chosen]
            else:
                first = int(masked[0].nonzero()[0])
                for p in range(first, first + count):
                    token, probs[p] = pick(logits_fn(h[0, p]))
                    block[0, p] = token
                    states[0, p] = h[0, p]
        return block, states, probs

    # ------------------------------------------------------------------ training
    def forward_train(self, input_ids: torch.Tensor, hidden: torch.Tensor, depths: int | None = None):
        """hidden [B, T, H] (final, post-norm) → (states per block position [B, T, H] × L, loss
        weights per position [B, T] × L): row l, position p predicts t_{l+p+1}. Rows not sampled
        (or positions left unmasked) have weight 0. Eval mode: greedy S-pass denoising, weight 1."""
        B, T = input_ids.shape
        L = self.cfg.block_length
        nxt = torch.zeros_like(input_ids)
        nxt[:, :-1] = input_ids[:, 1:]
        # Anchors: rows with a next-next token, and real (padding rows have all-zero states).
        rows = (torch.arange(T, device=input_ids.device) < T - 2)[None] & (hidden != 0).any(-1)
        flat = rows.flatten().nonzero().flatten()
        if self.training and len(flat) > self.cfg.max_anchors:
            flat = flat[torch.randperm(len(flat), device=flat.device)[: self.cfg.max_anchors]]
        elif not self.training:  # evenly spaced, deterministic
            flat = flat[:: max(1, len(flat) // (4 * self.cfg.max_anchors))]
        cond = hidden.reshape(B * T, -1)[flat].to(self.eh_proj.weight.dtype)
        anchor = nxt.flatten()[flat]
        weights = hidden.new_zeros(B * T, L)
        if self.training:
            labels = torch.zeros(B * T, L, dtype=torch.long, device=input_ids.device)
            padded = torch.cat([input_ids, torch.zeros(B, L + 2, dtype=torch.long)], 1)
            for p in range(1, L + 1):
                labels[:, p - 1] = padded[:, p + 1 : p + 1 + T].flatten()
            t, masked = sample_masks(len(flat), L, self.cfg, cond.device)
            block = torch.where(masked, -1, labels[flat])
            states = self.denoise_pass(cond, anchor, block)
            weights[flat] = masked.to(weights.dtype) * loss_weight(t, self.cfg)[:, None]
        else:
            _, states, _ = self.denoise(cond, anchor, self.cfg.denoising_steps, self.lm_head)
            weights[flat] = 1.0
        out = hidden.new_zeros(B * T, L, states.shape[-1])
        out[flat] = states.to(out.dtype)
        depths = min(depths or L, L)
        outs = [out[:, p].reshape(B, T, -1) for p in range(depths)]
        return outs, [weights[:, p].reshape(B, T) for p in range(depths)]

    def train_outputs(self, input_ids, inputs, depths) -> DepthOutputs:
        states, weights = self.forward_train(input_ids, inputs, depths)
        return DepthOutputs(states, weights)

    @torch.no_grad()
    def teacher_forced_drafts(self, ids, features, first_row, depths) -> torch.Tensor:
        """Block-parallel: the drafts of anchor r are one denoising of (h_r, t_{r+1})."""
        n = len(features)
        drafts = torch.full((depths, n), -1, dtype=torch.long)
        rows = torch.arange(first_row, n)
        rows = rows[rows + 1 < len(ids)]
        if len(rows):
            tokens, _, _ = self.denoise(
                features[rows, 0], ids[rows + 1], self.cfg.denoising_steps, self.lm_head
            )
            drafts[:, rows] = tokens[:, :depths].T
        return drafts

    def make_drafter(self, k, dtype, pick, greedy=True) -> DiffusionDrafter:
        return DiffusionDrafter(self, k, dtype, pick, greedy)

    def make_batch_drafter(self, k, dtype, picks, greedy=True) -> DiffusionBatchDrafter:
        return DiffusionBatchDrafter(self, k, dtype, picks, greedy)
