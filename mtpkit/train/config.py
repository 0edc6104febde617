"""The training config: YAML sections mirror these dataclasses; `section.field=value` overrides them."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtpkit.distributed.mesh import DistributedConfig
from mtpkit.train.losses import LOSS_KINDS


@dataclass
class OnlineConfig:
    """Online mode: the target produces hidden states in the loop (no store). Fields as in collect."""

    prompts: list[str] = field(default_factory=list)
    mode: str = "generate"  # generate | corpus
    format: str | None = None
    text_field: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    sample_size: int = 512
    stride: int | None = None
    shuffle: bool = True
    batch_size: int = 8  # prompts per target call
    eval_samples: int = 16  # first items held out for eval


@dataclass
class DataConfig:
    store: str | None = None  # a `mtpkit collect` store (offline mode)
    online: OnlineConfig | None = None  # or produce hidden states on the fly
    token_budget: int = 4096  # padded tokens per micro-batch (batch x longest)
    max_seq_len: int = 2048  # longer samples are truncated
    eval_fraction: float = 0.05
    eval_max_samples: int = 64


@dataclass
class LossConfig:
    kind: str = "ce"  # ce | kl | tv (kl/tv distil from the target's own distribution)
    depth_weights: list[float] | None = None  # explicit per-depth weights (normalised)
    depth_decay: float | None = None  # else weight of depth k = decay^(k-1), normalised; None: head's
    # default (1.0; EAGLE-3: 0.8)
    scaling_factor: float = 1.0  # Megatron's --mtp-loss-scaling-factor
    chunk_size: int = 1024  # rows per logits chunk

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")


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
    eval_every: int = 50
    save_every: int = 100
    log_every: int = 10
    simulate_k: int = 4  # teacher-forced τ estimate for chain drafting at K = 1..simulate_k
    progress: bool = True

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
