"""Chat templating and loss masks for regenerated conversations.

A sample is built token by token from what the target actually saw and produced: the
template-rendered prompt, then the generated answer ids (kept exactly, never re-tokenized),
then — for later turns — only the template text that sits between the previous answer and
the next assistant header. The loss mask is 1 exactly on the generated answer tokens
(including the end-of-turn token the model emitted), 0 on everything the template wrote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mtpkit.data.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass
class Conversation:
    prompt: Prompt
    messages: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    turn: int = 0  # user turns consumed so far


def _render(tokenizer, messages: list[dict]) -> str:
    if tokenizer.chat_template is None:
        raise ValueError(
            "the target's tokenizer has no chat template, so generation mode cannot build prompts; "
            "use --mode corpus, or a model directory whose tokenizer_config.json has a chat_template"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode(tokenizer, text: str) -> list[int]:
    # The rendered template already holds BOS and other special tokens as text.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def start(tokenizer, prompt: Prompt, system_prompt: str | None = None) -> Conversation:
    """A conversation whose ids end with the assistant header of the first user turn."""
    conv = Conversation(prompt)
    system = prompt.system if prompt.system is not None else system_prompt
    if system is not None:
        conv.messages.append({"role": "system", "content": system})
    conv.messages.append({"role": "user", "content": prompt.turns[0]})
    conv.ids = _encode(tokenizer, _render(tokenizer, conv.messages))
    conv.mask = [False] * len(conv.ids)
    conv.turn = 1
    return conv


def add_answer(tokenizer, conv: Conversation, answer_ids: list[int], eos_ids: list[int]) -> None:
    """Append the model's answer (ids as generated, end-of-turn token included) with mask 1."""
    conv.ids += answer_ids
    conv.mask += [True] * len(answer_ids)
    content = answer_ids[:-1] if answer_ids and answer_ids[-1] in eos_ids else answer_ids
    conv.messages.append(
        {"role": "assistant", "content": tokenizer.decode(content, skip_special_tokens=True)}
    )


def next_turn(tokenizer, conv: Conversation, max_tokens: int | None = None) -> bool:
    """Extend `conv` with the next user turn and assistant header; False (and `conv` unchanged)
    when no turn is left or the extended prompt would exceed `max_tokens`.

    The template is rendered for the whole conversation and the text after what we already
    hold is tokenized and appended. A template that rewrites earlier turns (e.g. strips
    reasoning) breaks that prefix property; then the prompt is re-tokenized from scratch and
    the earlier answers lose their loss mask — logged, since it costs training signal.
    """
    if conv.turn >= len(conv.prompt.turns):
        return False
    messages = [*conv.messages, {"role": "user", "content": conv.prompt.turns[conv.turn]}]
    rendered = _render(tokenizer, messages)
    held = tokenizer.decode(conv.ids, skip_special_tokens=False)
    if rendered.startswith(held):
        tail = _encode(tokenizer, rendered[len(held) :])
        ids, mask = conv.ids + tail, conv.mask + [False] * len(tail)
    else:
        log.warning(
            "%s: the chat template rewrites earlier turns; earlier answers are not trained on",
            conv.prompt.source,
        )
        ids = _encode(tokenizer, rendered)
        mask = [False] * len(ids)
    if max_tokens is not None and len(ids) > max_tokens:
        return False
    conv.messages, conv.ids, conv.mask = messages, ids, mask
    conv.turn += 1
    return True
