"""Rule-based rewards for RL: a verifier is `f(prompt, completion, **fields) -> float`, where
`fields` is the prompt's whole record (GSM8K's gold solution arrives as `answer=`).

Built in: `gsm8k` (1 if the final number equals the gold `#### N`, else 0; the final number is
the one after the last `####`, or with no `####` the last number in the completion) and
`gsm8k_strict` (only a `#### N` line counts). DAPO's soft overlong punishment (eq. 13) is added
to the verifier's reward by the RL loop, from the completion's token count.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import partial

Reward = Callable[..., float]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def _normalize(number: str) -> Decimal | None:
    try:
        return Decimal(number.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None


def final_number(text: str, strict: bool = False) -> Decimal | None:
    """The answer a completion commits to: after the last `####`, else (unless strict) the last number."""
    marked = _FINAL.findall(text)
    if marked:
        return _normalize(marked[-1])
    if strict:
        return None
    numbers = _NUMBER.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def gsm8k_reward(prompt: str, completion: str, answer: str | None = None, strict: bool = False, **_) -> float:
    """1.0 if the completion's final number equals the gold `#### N` of `answer`, else 0.0."""
    if answer is None:
        raise ValueError("gsm8k reward needs the record's `answer` field (GSM8K: '... #### 72')")
    gold = final_number(answer, strict=True)
    if gold is None:
        raise ValueError(f"gsm8k reward: the gold answer has no '#### N' line: {answer[-80:]!r}")
    got = final_number(completion, strict)
    return 1.0 if got is not None and got == gold else 0.0


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO eq. 13: 0 up to L_max − L_cache tokens, then linearly down to −1 at L_max, −1 beyond."""
    expected = max_len - buffer
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / buffer
    return -1.0


REWARDS: dict[str, Reward] = {"gsm8k": gsm8k_reward, "gsm8k_strict": partial(gsm8k_reward, strict=True)}


def get_reward(name: str) -> Reward:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; built in: {sorted(REWARDS)} (or pass a callable)")
    return REWARDS[name]
