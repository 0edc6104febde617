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
