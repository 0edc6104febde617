"""The training config: YAML sections mirror these dataclasses; `section.field=value` overrides them."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtpkit.config import Checked, FieldError, check_fields, check_section, checked
from mtpkit.data.prompts import FORMATS
from mtpkit.distributed.mesh import DistributedConfig
from mtpkit.train.losses import LK_ETA, LOSS_KINDS


@dataclass
class OnlineConfig(Checked):
    """Online mode: the target produces hidden states in the loop (no store). Fields as in collect."""

    prompts: list[str] = field(default_factory=list)
    mode: str = checked("generate", choices=("generate", "corpus"))
    format: str | None = checked(None, choices=FORMATS)
    text_field: str | None = None
    max_new_tokens: int = checked(128, ge=1)
    temperature: float = checked(0.0, ge=0, meaning="0 = greedy")
    top_p: float = checked(1.0, gt=0, le=1)
    sample_size: int = checked(512, ge=2)
    stride: int | None = checked(None, ge=1)
    shuffle: bool = True
    batch_size: int = checked(8, ge=1)  # prompts per target call
    eval_samples: int = checked(16, ge=0)  # first items held out for eval


@dataclass
class DataConfig(Checked):
    store: str | None = None  # a `mtpkit collect` store (offline mode)
    online: OnlineConfig | None = None  # or produce hidden states on the fly
    token_budget: int = checked(4096, ge=1)  # padded tokens per micro-batch (batch x longest)
    max_seq_len: int = checked(2048, ge=2)  # longer samples are truncated
    eval_fraction: float = checked(0.05, ge=0, lt=1)
    eval_max_samples: int = checked(64, ge=0)


@dataclass
class LossConfig:
    kind: str = "ce"  # ce | kl | tv | lk | lk_lambda (all but ce distil from the target's own
    # distribution; lk / lk_lambda are the LK losses of arXiv 2602.23881, see train/losses.py)
    lk_eta: float = checked(LK_ETA, ge=0)  # η of lk_lambda: λ = exp(−η·α) weighs KL against TV
    depth_weights: list[float] | None = checked(None, ge=0)  # explicit per-depth weights (normalised)
    depth_decay: float | None = checked(None, gt=0)  # else weight of depth k = decay^(k-1), normalised;
    # None: head's default (1.0; EAGLE-3: 0.8)
    scaling_factor: float = checked(1.0, ge=0)  # Megatron's --mtp-loss-scaling-factor
    chunk_size: int = checked(1024, ge=1)  # rows per logits chunk

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        check_fields(self)


@dataclass
class OptimConfig:
    lr: float = checked(1e-3, ge=0, meaning="0 = the head is not updated")
    weight_decay: float = checked(0.0, ge=0)
    betas: list[float] = checked(default_factory=lambda: [0.9, 0.95], ge=0, lt=1)
    warmup_steps: int = checked(20, ge=0)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = checked(0.1, ge=0, le=1)
    grad_clip: float = checked(1.0, gt=0)
    grad_accum: int = 1

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        check_fields(self)


@dataclass
class TrainConfig:
    out: str = "runs/mtp"
    model: str | None = None  # target spec; default: the store's model_id
    head_type: str = "mtp"
    head: dict = field(default_factory=dict)  # fields of the head family's config (e.g. MTPConfig)
    init_from: str | None = None  # an existing head directory to start from
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun
    max_steps: int = 200
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    eval_every: int = checked(50, ge=1)
    save_every: int = checked(100, ge=1)
    log_every: int = checked(10, ge=1)
    simulate_k: int = checked(4, ge=0, meaning="0 = no estimate")  # teacher-forced τ for chain drafting
    # at K = 1..simulate_k
    progress: bool = True

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        check_fields(self)
        if not self.init_from:  # else the head's own config.json decides
            check_head(self.head_type, self.head)


def check_head(head_type: str, fields: dict) -> None:
    """The head family and its config fields, checked when the run config is built."""
    from mtpkit.heads import FAMILIES

    if head_type not in FAMILIES:
        raise FieldError(
            "head_type", f"head_type: unknown head type {head_type!r}; available: {sorted(FAMILIES)}"
        )
    check_section(FAMILIES[head_type].config, fields, "head")
