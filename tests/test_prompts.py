from __future__ import annotations

import json

import pytest
from helpers import shared_prompts

from mtpkit.data.prompts import PromptFormatError, load_documents, load_prompts

# (file, prompts it yields, first user turn starts with)
SHARED = [
    ("vicuna_bench.jsonl", 80, "How can I improve my time management skills?"),  # turns
    ("gsm8k_train.jsonl", 7473, "Natalia sold clips to 48 of her friends"),  # question
    ("arena_hard_v0.1.jsonl", 500, "Use ABC notation to write a melody"),  # prompt
    ("arena_hard_v2.jsonl", 750, "Write me a zig program"),  # prompt
    (
        "self_instruct_seed_tasks.jsonl",
        175,
        "Is there anything I can eat for a breakfast",
    ),  # instruction+instances
    ("self_instruct_user_oriented.jsonl", 252, "The sentence you are given might be too wordy"),
]


@pytest.mark.parametrize(("name", "count", "first"), SHARED)
def test_real_prompt_files(name, count, first):
    prompts = load_prompts([shared_prompts(name)])
    assert len(prompts) == count
    assert prompts[0].turns[0].startswith(first)
    assert prompts[0].source.endswith(f"{name}:1") or prompts[0].source.endswith(f"{name}:1:0")
    assert all(p.turns and all(t.strip() for t in p.turns) for p in prompts)


def test_self_instruct_appends_instance_input():
    path = shared_prompts("self_instruct_user_oriented.jsonl")
    record = json.loads(path.read_text().splitlines()[0])
    prompt = load_prompts([path])[0]
    assert prompt.turns[0] == record["instruction"] + "\n\n" + record["instances"][0]["input"]


def _write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_chat_formats_and_alpaca(tmp_path):
    path = _write(
        tmp_path,
        "mix.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                    {"from": "human", "value": "Bye"},
                ]
            },
            {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
            {"instruction": "Translate", "input": "chat"},
            {"instruction": "Say hi", "input": ""},
            {"turns": ["t1", "t2"]},
            {"text": "plain"},
        ],
    )
    p = load_prompts([path])
    assert [x.turns for x in p] == [
        ("Hi", "Bye"),
        ("Q1",),
        ("Translate\n\nchat",),
        ("Say hi",),
        ("t1", "t2"),
        ("plain",),
    ]
    assert p[0].system == "Be brief." and p[1].system is None
    assert [x.source for x in p][:2] == [f"{path}:1", f"{path}:2"]


def test_format_override_and_text_field(tmp_path):
    path = _write(tmp_path, "x.jsonl", [{"question": "q", "prompt": "p", "body": "b"}])
    assert load_prompts([path])[0].turns == ("q",)  # detection order: question before prompt
    assert load_prompts([path], record_format="prompt")[0].turns == ("p",)
    assert load_prompts([path], text_field="body")[0].turns == ("b",)
    with pytest.raises(
        PromptFormatError, match=r"--format turns needs field 'turns'.*\['body', 'prompt', 'question'\]"
    ):
        load_prompts([path], record_format="turns")
    with pytest.raises(PromptFormatError, match="no field 'nope'"):
        load_prompts([path], text_field="nope")


def test_unrecognised_record_lists_fields_and_flags(tmp_path):
    path = _write(tmp_path, "x.jsonl", [{"turns": ["ok"]}, {"foo": 1, "bar": 2}])
    with pytest.raises(PromptFormatError) as err:
        load_prompts([path])
    msg = str(err.value)
    assert f"{path}:2" in msg and "['bar', 'foo']" in msg and "--format" in msg and "--text-field" in msg


def test_malformed_line_names_file_and_line(tmp_path, caplog):
    path = _write(tmp_path, "bad.jsonl", [{"turns": ["a"]}, "", '{"turns": ["b"]', {"turns": ["c"]}])
    with pytest.raises(PromptFormatError, match=rf"{path}:3: malformed JSON.*--skip-bad"):
        load_prompts([path])
    prompts = load_prompts([path], skip_bad=True)
    assert [p.turns[0] for p in prompts] == ["a", "c"]
    assert f"{path}:3" in caplog.text


def test_wrong_types_are_reported(tmp_path):
    path = _write(tmp_path, "x.jsonl", [{"turns": "not a list"}])
    with pytest.raises(PromptFormatError, match="'turns' must be a list"):
        load_prompts([path])
    path = _write(tmp_path, "y.jsonl", [[1, 2]])
    with pytest.raises(PromptFormatError, match="must be a JSON object"):
        load_prompts([path])
    with pytest.raises(PromptFormatError, match="prompt file not found"):
        load_prompts([tmp_path / "missing.jsonl"])
    with pytest.raises(PromptFormatError, match="unsupported file type"):
        load_prompts([_write(tmp_path, "x.xml", ["<a/>"])])


def test_parquet_csv_json_through_datasets(tmp_path):
    import datasets

    rows = {"question": ["first?", "second?"], "id": [1, 2]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(tmp_path / "p.parquet")
    ds.to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "p.json").write_text(json.dumps([{"q": "first?"}, {"q": "second?"}]))
    for name, field in [("p.parquet", None), ("p.csv", "question"), ("p.json", "q")]:
        prompts = load_prompts([tmp_path / name], text_field=field)
        assert [p.turns[0] for p in prompts] == ["first?", "second?"], name
        assert prompts[1].source == f"{tmp_path / name}:row 2"


def test_text_files_and_builtin(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \n")
    assert [p.turns[0] for p in load_prompts([path])] == ["first prompt", "second prompt"]
    docs = load_documents([path])
    assert len(docs) == 1 and docs[0].text == path.read_text()
    builtin = load_prompts(["builtin"])
    assert len(builtin) >= 5 and any(len(p.turns) > 1 for p in builtin)


def test_documents_prefer_text_field(tmp_path):
    path = _write(tmp_path, "c.jsonl", [{"text": "doc one"}, {"question": "q", "answer": "a"}])
    assert [d.text for d in load_documents([path])] == ["doc one", "q"]
