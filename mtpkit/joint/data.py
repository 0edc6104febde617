"""Data of joint training: SFT conversations with assistant-token loss masks, and RL prompts
with the record fields their verifiers need (e.g. GSM8K's `answer`).

SFT records carry the assistant answers to learn: chat messages (`messages` / `conversations`,
OpenAI or ShareGPT roles), `question` + `answer` (GSM8K), `instruction` (+ `input`) + `output`
(Alpaca), `prompt` + `completion` / `response`, or self-instruct `instances[].output`. They are
templated with `mtpkit.data.chat` exactly as collect does, so the loss mask is 1 on the answer
tokens and their end-of-turn token, 0 on everything the template wrote.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mtpkit.data import chat
from mtpkit.data.prompts import (
    ASSISTANT_ROLES,
    USER_ROLES,
    Prompt,
    PromptFormatError,
    iter_records,
    record_prompts,
    resolve_source,
)

_ANSWER_FIELDS = (("question", "answer"), ("prompt", "completion"), ("prompt", "response"))


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True on assistant tokens
    source: str


def record_dialogue(record: dict, where: str) -> list[tuple[Prompt, list[str]]]:
    """(prompt with the user turns, the assistant answers) of one SFT record."""
    for key in ("messages", "conversations"):
        if isinstance(record.get(key), list):
            users, answers, system = [], [], None
            for i, msg in enumerate(record[key]):
                role = str(msg.get("role", msg.get("from", ""))).lower()
                content = msg.get("content", msg.get("value"))
                if role == "system":
                    system = content
                elif role in USER_ROLES:
                    users.append(content)
                elif role in ASSISTANT_ROLES:
                    if len(answers) != len(users) - 1:
                        raise PromptFormatError(
                            f"{where}: {key}[{i}] is an assistant turn without a user turn"
                        )
                    answers.append(content)
            users = users[: len(answers)]  # a trailing user turn has nothing to learn
            if not answers:
                raise PromptFormatError(f"{where}: no assistant answer to train on in {key!r}")
            return [(Prompt(tuple(users), system, where), answers)]
    if "instances" in record and "instruction" in record:
        prompts = record_prompts(record, where, "self_instruct")
        return [(p, [inst["output"]]) for p, inst in zip(prompts, record["instances"], strict=True)]
    if "instruction" in record and "output" in record:
        return [(record_prompts(record, where, "alpaca")[0], [record["output"]])]
    for question, answer in _ANSWER_FIELDS:
        if question in record and isinstance(record.get(answer), str):
            return [(Prompt((record[question],), None, where), [record[answer]])]
    raise PromptFormatError(
        f"{where}: no answer to train on; SFT needs messages/conversations with assistant turns, "
        f"question+answer, instruction+output or prompt+completion; the record has {sorted(record)}"
    )


def build_example(tokenizer, prompt: Prompt, answers: list[str], eos_id: int, system_prompt=None) -> Example:
    """Template a dialogue turn by turn; the mask is 1 on each answer and its end-of-turn token."""
    conv = chat.start(tokenizer, prompt, system_prompt)
    for i, answer in enumerate(answers):
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos_id]
        chat.add_answer(tokenizer, conv, answer_ids, [eos_id])
        if i + 1 < len(answers) and not chat.next_turn(tokenizer, conv):
            break
    return Example(conv.ids, conv.mask, prompt.source)


def load_sft_examples(
    paths: list[str], tokenizer, eos_id: int, max_seq_len: int, system_prompt=None, max_examples=None
) -> list[Example]:
    examples = []
    for raw in paths:
        for record, where in iter_records(resolve_source(raw), skip_bad=False):
            for prompt, answers in record_dialogue(record, where):
                ex = build_example(tokenizer, prompt, answers, eos_id, system_prompt)
                ex.ids, ex.mask = ex.ids[:max_seq_len], ex.mask[:max_seq_len]
                if any(ex.mask):
                    examples.append(ex)
                if max_examples is not None and len(examples) >= max_examples:
                    return examples
    return examples


def collate_examples(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and mask [B, T] (False on padding)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = torch.tensor(e.mask)
    return ids, mask


class Batches:
    """Shuffled epochs of fixed-size batches; its state (epoch, position) is checkpointed."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next(self) -> list[Example]:
        order = self._order()
        if self.pos + self.batch_size > len(order):
            self.epoch, self.pos = self.epoch + 1, 0
            order = self._order()
        picked = order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return [self.examples[i] for i in picked]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


@dataclass
class RLPrompt:
    prompt: Prompt
    fields: dict  # the whole record, passed to verifiers as keyword arguments


def load_rl_prompts(paths: list[str], record_format: str | None = None) -> list[RLPrompt]:
    out = []
    for raw in paths:
        for record, where in iter_records(resolve_source(raw), skip_bad=False):
            out += [RLPrompt(p, record) for p in record_prompts(record, where, record_format)]
    return out
