"""The trainable model of joint training: full fine-tuning, LoRA (peft) or QLoRA (bitsandbytes NF4).

`prepare_policy` turns a frozen `Target` into a trainable one in place and returns a `Policy`:
the `Target` view (its modules now carry the adapters, so the backbone / LM head the head and the
speculative decoder use are the trained ones) plus the peft wrapper for saving adapters.
The optimizer keeps the model and the head in two parameter groups, and their gradient norms are
clipped separately: a shared clip lets the head's gradients shrink the policy update (SkyRL).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mtpkit.config import Checked, checked
from mtpkit.errors import MtpkitError
from mtpkit.heads import save_head
from mtpkit.io import atomic_dir
from mtpkit.models import Target, load_target
from mtpkit.train.checkpoint import TRAINABLE, load_checkpoint, save_checkpoint
from mtpkit.train.config import OptimConfig

log = logging.getLogger(__name__)

MODES = ("full", "lora", "qlora")


class PolicyError(MtpkitError, ValueError):
    pass


@dataclass
class LoraConfig(Checked):
    r: int = checked(16, ge=1)
    alpha: int = checked(32, gt=0)
    dropout: float = checked(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"  # peft's shorthand: every linear layer but the LM head


@dataclass
class PolicyConfig:
    mode: str = "lora"  # full | lora | qlora
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"policy.mode must be one of {MODES}, got {self.mode!r}")


@dataclass
class Policy:
    target: Target  # the model being trained, seen through the uniform target view
    mode: str
    peft_model: nn.Module | None = None  # peft.PeftModel for lora / qlora

    @property
    def model(self) -> nn.Module:
        return self.target.model

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def quantize_nf4(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the decoder's nn.Linear layers by bitsandbytes NF4 `Linear4bit` (in place, on CPU).

    The embedding and the LM head stay in full precision, as in QLoRA. Returns the number of
    layers quantized.
    """
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or any(full.endswith(s) for s in skip):
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=child.weight.dtype,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, child_name, q.to(child.weight.device))  # .to() quantizes
            count += 1
    return count


def prepare_policy(target: Target, cfg: PolicyConfig) -> Policy:
    """Make `target` trainable as `cfg.mode` says (in place) and return the policy."""
    model = target.model
    if cfg.mode == "full":
        model.requires_grad_(True)
        model.train()
        return Policy(target, "full")
    try:
        import peft
    except ImportError as exc:
        raise PolicyError(
            f"policy.mode={cfg.mode} needs peft: pip install 'mtpkit[joint]' (or peft==0.21.2)"
        ) from exc
    if cfg.mode == "qlora":
        n = quantize_nf4(model)
        model.is_loaded_in_4bit = True  # as transformers marks it; peft then wraps the NF4 layers
        log.info("quantized %d linear layers to NF4", n)
    lora = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    # peft injects the adapters into `model`'s own modules; the Target view keeps working.
    peft_model = peft.get_peft_model(model, lora)
    peft_model.train()
    return Policy(target, cfg.mode, peft_model)


def make_optimizer(policy: Policy, head: nn.Module, lr: float, head_lr: float, betas, weight_decay: float):
    """AdamW with two groups: 0 = model, 1 = head (so each can be clipped and scheduled apart)."""
    groups = [
        {"params": policy.parameters(), "lr": lr, "name": "model"},
        {"params": [p for p in head.parameters() if p.requires_grad], "lr": head_lr, "name": "head"},
    ]
    return torch.optim.AdamW(groups, betas=tuple(betas), weight_decay=weight_decay)


def clip_separately(optimizer: torch.optim.Optimizer, max_norms: tuple[float, float]) -> tuple[float, float]:
    """Clip model and head gradients each to its own norm; return both pre-clip norms."""
    norms = []
    for group, max_norm in zip(optimizer.param_groups, max_norms, strict=True):
        params = [p for p in group["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0)
    return norms[0], norms[1]


def policy_forward(policy: Policy, input_ids: torch.Tensor) -> torch.Tensor:
    """Final post-norm hidden states [B, T, H] of a right-padded batch (causal: pads never leak)."""
    out = policy.target.backbone(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state


@dataclass
class JointOptimConfig(OptimConfig):
    """The head trainer's optimizer settings, plus the head's own LR and clip (the model's are
    `lr` / `grad_clip`). Joint recipes batch with data.batch_size / algo.micro_batch_size."""

    lr: float = checked(1e-5, ge=0)  # model (LoRA adapters take ~1e-4)
    head_lr: float = checked(1e-4, ge=0)
    grad_clip: float = checked(1.0, gt=0)  # model
    head_grad_clip: float = checked(1.0, gt=0)  # head, clipped on its own
    warmup_steps: int = checked(0, ge=0)
    schedule: str = "constant"  # after warmup; cosine | linear decay to min_lr_ratio over max_steps

    def __post_init__(self):
        super().__post_init__()
        if self.grad_accum != 1:
            raise ValueError(
                "grad_accum is not used by sft / rl; set data.batch_size or algo.micro_batch_size"
            )


def restore_joint(ckpt: Path, head, target: Target, optimizer, scheduler, policy: Policy) -> dict:
    """Restore a joint-training checkpoint: head, optimizer, RNG and the model's trained weights."""
    from safetensors.torch import load_file

    state = load_checkpoint(ckpt, head, target, optimizer, scheduler)
    if (ckpt / TRAINABLE).is_file():
        trained = load_file(str(ckpt / TRAINABLE))
        missing = set(policy.named_trainable()) - set(trained)
        if missing:
            raise PolicyError(f"{ckpt / TRAINABLE}: lacks trained weights {sorted(missing)[:3]}...")
        policy.model.load_state_dict(trained, strict=False)
    return state


def save_joint_checkpoint(
    run: Path, step: int, head, target: Target, optimizer, scheduler, data: dict, policy: Policy
):
    """A joint-training checkpoint: head, optimizer, RNG, data position and the model's trained weights."""
    save_checkpoint(
        run, step, head, target, optimizer, scheduler, {"data": data}, tensors=policy.named_trainable()
    )


def finish_joint(policy: Policy, head, run: Path, target: Target, merged: bool) -> tuple[Path, Path]:
    """Write `run/model` (merged HF directory, or the peft adapter) and `run/head`; the head is
    saved for the fine-tuned model, so `mtpkit eval --model run/model` accepts it."""
    head.eval()
    merged = merged or policy.peft_model is None
    model_dir = save_policy(policy, run / "model", merged=merged)
    save_head(head, run / "head", load_target(model_dir) if merged else target)
    return model_dir, run / "head"


def save_policy(policy: Policy, out: str | Path, merged: bool = True) -> Path:
    """The trained model as an HF directory: merged full weights, or a peft adapter directory.

    Merging uses `weights.merged_state_dict` (LoRA added in float32, NF4 dequantized), so a QLoRA
    model is written at full precision instead of being re-quantized.
    """
    with atomic_dir(Path(out), replace=True) as tmp:
        _write_policy(policy, tmp, merged)
    return Path(out)


def _write_policy(policy: Policy, tmp: Path, merged: bool) -> None:
    from safetensors.torch import save_file

    from mtpkit.joint.weights import merged_state_dict

    tokenizer = policy.target.tokenizer
    if policy.peft_model is not None and not merged:
        policy.peft_model.save_pretrained(tmp)
    else:
        state = merged_state_dict(policy.peft_model or policy.model)
        save_file(
            {k: v.contiguous().clone() for k, v in state.items()}, tmp / "model.safetensors", {"format": "pt"}
        )
        config = copy.deepcopy(policy.model.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.save_pretrained(tmp)
        policy.model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
