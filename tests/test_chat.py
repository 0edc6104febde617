from __future__ import annotations

import pytest

from mtpkit.data import chat
from mtpkit.data.prompts import Prompt
from mtpkit.models.tiny import tiny_tokenizer

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_first_turn_is_the_rendered_template_with_no_loss(tok):
    conv = chat.start(tok, Prompt(("What is 2+2?",), None, "t"), system_prompt="Be brief.")
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert conv.ids == _encode(tok, rendered)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert not any(conv.mask)


def test_mask_covers_exactly_the_answers_over_turns(tok):
    conv = chat.start(tok, Prompt(("Hi", "And now?"), "sys", "t"))
    header = len(conv.ids)
    a1 = _encode(tok, "Hello there") + [EOS]
    chat.add_answer(tok, conv, a1, [EOS])
    assert chat.next_turn(tok, conv)
    a2 = _encode(tok, "Now: 4") + [EOS]
    chat.add_answer(tok, conv, a2, [EOS])
    assert not chat.next_turn(tok, conv)

    # The token sequence is exactly the template rendering of the whole conversation ...
    full = tok.apply_chat_template(conv.messages, tokenize=False)
    assert _encode(tok, full) == conv.ids + _encode(tok, "\n")  # the template closes with a newline
    # ... and the mask selects exactly the two answers, end-of-turn tokens included.
    assert [t for t, m in zip(conv.ids, conv.mask, strict=True) if m] == a1 + a2
    assert conv.messages[2] == {"role": "assistant", "content": "Hello there"}
    assert conv.ids[header : header + len(a1)] == a1  # the answer follows its header, unchanged
    assert conv.mask[header - 1] is False and conv.mask[header : header + len(a1)] == [True] * len(a1)


def test_truncated_answer_is_closed_by_the_template_without_loss(tok):
    conv = chat.start(tok, Prompt(("Hi", "More"), None, "t"))
    cut = _encode(tok, "Hel")  # hit max_new_tokens: no end-of-turn token
    chat.add_answer(tok, conv, cut, [EOS])
    n = len(conv.ids)
    assert chat.next_turn(tok, conv)
    assert conv.ids[n] == EOS and conv.mask[n] is False  # <|im_end|> written by the template
    assert sum(conv.mask) == len(cut)


def test_next_turn_respects_max_tokens(tok):
    conv = chat.start(tok, Prompt(("Hi", "x" * 500), None, "t"))
    chat.add_answer(tok, conv, _encode(tok, "Hello") + [EOS], [EOS])
    before = (list(conv.ids), list(conv.mask), list(conv.messages), conv.turn)
    assert not chat.next_turn(tok, conv, max_tokens=len(conv.ids) + 50)
    assert (conv.ids, conv.mask, conv.messages, conv.turn) == before


def test_template_that_rewrites_history_keeps_only_the_latest_mask(tok, caplog):
    tok = tiny_tokenizer()
    # Like reasoning templates that drop earlier assistant content.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    conv = chat.start(tok, Prompt(("Hi", "Again"), None, "src"))
    chat.add_answer(tok, conv, _encode(tok, "Hello") + [EOS], [EOS])
    assert chat.next_turn(tok, conv)
    assert not any(conv.mask) and "rewrites earlier turns" in caplog.text
    assert conv.ids == _encode(
        tok, tok.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
    )


def test_no_chat_template_is_a_clear_error(tok):
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*--mode corpus"):
        chat.start(tok, Prompt(("Hi",), None, "t"))
