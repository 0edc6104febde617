"""Megatron indexed datasets (.bin/.idx) as a corpus source, on files written here in that format."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from helpers import collect_tiny

from mtpkit.data.prompts import PromptFormatError
from mtpkit.data.store import Store
from mtpkit.train.data import OnlineSource


def write_megatron(prefix, documents: list[list[list[int]]], dtype=np.uint16, code=8):
    """What Megatron's _IndexWriter / preprocess_data.py write: each document a list of
    sequences (sentences), tokens back to back in .bin, lengths/pointers/document indices in .idx."""
    lengths, pointers, doc_index, offset = [], [], [0], 0
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            for seq in doc:
                f.write(np.asarray(seq, dtype=dtype).tobytes())
                lengths.append(len(seq))
                pointers.append(offset)
                offset += len(seq) * np.dtype(dtype).itemsize
            doc_index.append(len(lengths))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index)))
        f.write(np.asarray(lengths, np.int32).tobytes())
        f.write(np.asarray(pointers, np.int64).tobytes())
        f.write(np.asarray(doc_index, np.int64).tobytes())
    return prefix


def _flat(doc):
    return [t for seq in doc for t in seq]


DOCS = [
    [[10, 11, 12], [13, 14, 2]],  # two sentences (--split-sentences), EOD appended
    [list(range(20, 45)) + [2]],
    [[50, 51, 2]],
]


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, 8), (np.int32, 4)])
def test_collect_corpus_windows_a_megatron_dataset(tmp_path, tiny_llama, dtype, code):
    prefix = write_megatron(tmp_path / "corpus_text_document", DOCS, dtype, code)
    for spec in (prefix, f"{prefix}.bin", f"{prefix}.idx"):
        out = tmp_path / f"store-{spec.__str__()[-3:]}"
        collect_tiny(out, tiny_llama, prompts=[str(spec)], mode="corpus", sample_size=10, stride=8)
        st = Store(out)
        flat = [_flat(doc) for doc in DOCS]
        want = [flat[0], flat[1][0:10], flat[1][8:18], flat[1][16:26], flat[2]]
        assert [s.input_ids.tolist() for s in st] == want
        assert [s.source for s in st] == [
            f"{prefix}#{d}@{k}" for d, k in ((0, 0), (1, 0), (1, 8), (1, 16), (2, 0))
        ]
        assert all(bool(s.loss_mask.all()) for s in st)
        torch.testing.assert_close(
            st[1].hidden_states.float(),
            tiny_llama.hidden_states(st[1].input_ids[None])[0].to(torch.bfloat16).float(),
        )


def test_megatron_job_resumes_and_changes_key_with_content(tmp_path, tiny_llama):
    prefix = write_megatron(tmp_path / "c", DOCS)
    kw = dict(prompts=[str(prefix)], mode="corpus", sample_size=10, stride=8)
    assert collect_tiny(tmp_path / "s", tiny_llama, **kw)["run_samples"] == 5
    assert collect_tiny(tmp_path / "s", tiny_llama, **kw)["run_samples"] == 0  # same job: done
    write_megatron(prefix, [*DOCS, [[60, 61, 2]]])
    assert collect_tiny(tmp_path / "s", tiny_llama, **kw)["run_samples"] == 6  # new content: new job


def test_online_training_reads_a_megatron_dataset(tmp_path, tiny_llama):
    from mtpkit.config import from_dict
    from mtpkit.train.config import TrainConfig

    prefix = write_megatron(tmp_path / "c", DOCS * 4)
    online = dict(prompts=[str(prefix)], mode="corpus", sample_size=16, batch_size=2, eval_samples=2)
    cfg = from_dict(TrainConfig, {"out": str(tmp_path / "run"), "data": {"online": online}})
    source = OnlineSource(tiny_llama, cfg.data.online, 64, seed=0)
    batch = source.next_batch()
    rows = {tuple(r[r != 0].tolist()) for r in batch.input_ids}
    flat = {tuple(_flat(doc)[:16]) for doc in DOCS}
    assert rows <= flat and batch.hidden.shape[-1] == tiny_llama.hidden_size


def test_bad_megatron_files_are_named(tmp_path, tiny_llama):
    prefix = write_megatron(tmp_path / "big", [[[5, 400]]])  # id 400 >= tiny vocabulary (320)
    with pytest.raises(PromptFormatError, match=r"big\.bin: document 0 holds token id 400"):
        collect_tiny(tmp_path / "s", tiny_llama, prompts=[str(prefix)], mode="corpus")
    with pytest.raises(PromptFormatError, match="use --mode corpus"):
        collect_tiny(tmp_path / "s", tiny_llama, prompts=[str(prefix)])
    good = write_megatron(tmp_path / "cut", DOCS)
    raw = (tmp_path / "cut.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(raw[:-8])
    with pytest.raises(PromptFormatError, match=r"cut\.idx: truncated index"):
        collect_tiny(tmp_path / "s", tiny_llama, prompts=[str(good)], mode="corpus")
    (tmp_path / "cut.idx").write_bytes(b"NOTMEGA" + raw[7:])
    with pytest.raises(PromptFormatError, match="bad header"):
        collect_tiny(tmp_path / "s", tiny_llama, prompts=[str(good)], mode="corpus")
    (tmp_path / "cut.idx").unlink()
    with pytest.raises(PromptFormatError, match="without its cut.idx"):
        collect_tiny(tmp_path / "s", tiny_llama, prompts=[str(good) + ".bin"], mode="corpus")
    assert not (tmp_path / "s").exists()
