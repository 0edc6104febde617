"""Acceptance metrics with vLLM v1's definitions (SGLang's `spec_accept_length` is the same τ).

Per verification step: drafted = K, accepted = drafted tokens accepted (bonus excluded).
  τ (mean acceptance length)   = 1 + Σaccepted / Σsteps
  acceptance rate              = Σaccepted / Σdrafted
  per-position rate[i]         = #steps whose draft i was accepted / Σsteps   (non-increasing)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AcceptanceStats:
    k: int
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    position_accepted: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.position_accepted:
            self.position_accepted = [0] * self.k

    def add(self, drafted: int, accepted: int) -> None:
        if not 0 <= accepted <= drafted <= self.k:
            raise ValueError(f"invalid step: drafted {drafted}, accepted {accepted}, k {self.k}")
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        for i in range(accepted):  # accepting draft i implies accepting every draft before it
            self.position_accepted[i] += 1

    def merge(self, other: AcceptanceStats) -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.position_accepted = [
            a + b for a, b in zip(self.position_accepted, other.position_accepted, strict=True)
        ]

    @property
    def tau(self) -> float:
        return 1 + self.accepted / self.steps if self.steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_position(self) -> list[float]:
        return [a / self.steps if self.steps else 0.0 for a in self.position_accepted]

    def as_dict(self) -> dict:
        return {
            "tau": self.tau,
            "acceptance_rate": self.acceptance_rate,
            "per_position": self.per_position,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
        }


def bootstrap_ci(
    per_prompt: list[AcceptanceStats], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Percentile bootstrap CIs over prompts (resampled with replacement, each bringing all of
    its steps) for τ, the acceptance rate and every per-position rate: [low, high] each."""
    import torch

    if not per_prompt:
        return {}
    k = per_prompt[0].k
    steps = torch.tensor([float(s.steps) for s in per_prompt])
    drafted = torch.tensor([float(s.drafted) for s in per_prompt])
    accepted = torch.tensor([float(s.accepted) for s in per_prompt])
    positions = torch.tensor([[float(a) for a in s.position_accepted] for s in per_prompt]).reshape(-1, k)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(per_prompt), (resamples, len(per_prompt)), generator=g)
    S, D, A = steps[idx].sum(1), drafted[idx].sum(1), accepted[idx].sum(1)
    tau = torch.where(S > 0, 1 + A / S.clamp(min=1), torch.ones_like(S))
    rate = torch.where(D > 0, A / D.clamp(min=1), torch.zeros_like(D))
    per = positions[idx].sum(1) / S.clamp(min=1)[:, None]  # [resamples, k]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)

    def bounds(x: torch.Tensor) -> list[float]:
        return [float(v) for v in torch.quantile(x.double(), q)]

    return {
        "tau_ci": bounds(tau),
        "acceptance_rate_ci": bounds(rate),
        "per_position_ci": [bounds(per[:, i]) for i in range(k)],
    }


def merged(per_prompt: list[AcceptanceStats], k: int) -> AcceptanceStats:
    total = AcceptanceStats(k)
    for s in per_prompt:
        total.merge(s)
    return total
