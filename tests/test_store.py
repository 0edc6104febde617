from __future__ import annotations

import errno
import json

import pytest
import torch

from mtpkit.data import store as store_mod
from mtpkit.data.store import MANIFEST, Sample, Store, StoreError

IDENTITY = {"model_id": "m", "config_hash": "c", "tokenizer_hash": "t", "weights_hash": "w", "hidden_size": 8}
LAYERS = [1, 3]


def _samples(n, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(1, 12, (1,), generator=g))
        out.append(
            Sample(
                input_ids=torch.randint(0, 50000, (t,), generator=g),
                loss_mask=torch.rand(t, generator=g) > 0.5,
                hidden_states=(torch.randn(t, len(LAYERS), 8, generator=g) * 100).to(dtype),
                source=f"src:{seed}:{i}",
            )
        )
    return out


def _open(path, dtype="bfloat16", **identity):
    return Store.open_for_append(path, {**IDENTITY, **identity}, LAYERS, dtype)


def _assert_same(a: Sample, b: Sample):
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.loss_mask, b.loss_mask)
    assert a.hidden_states.dtype == b.hidden_states.dtype
    assert torch.equal(a.hidden_states, b.hidden_states)
    assert a.source == b.source


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_trip_is_bit_exact_with_random_access(tmp_path, dtype):
    torch_dtype = store_mod.STORE_DTYPES[dtype]
    first, second = _samples(5, 0, torch_dtype), _samples(7, 1, torch_dtype)
    with _open(tmp_path, dtype) as st:
        st.commit(first, "job", {"consumed": 5, "samples": 5})
        st.commit(second, "job", {"consumed": 12, "samples": 12})
    st = Store(tmp_path)
    written = first + second
    assert len(st) == 12 and st.num_tokens == sum(len(s.input_ids) for s in written)
    assert st.manifest["num_loss_tokens"] == sum(int(s.loss_mask.sum()) for s in written)
    assert st.manifest["model"] == IDENTITY and st.layers == LAYERS and st.dtype == torch_dtype
    for i in [11, 0, 6, 5, 4, -1]:  # out of order, across the shard boundary
        _assert_same(st[i], written[i])
    assert len(st._handles) == 2
    st.verify()
    with pytest.raises(IndexError):
        st[12]


def test_only_the_touched_shard_is_opened(tmp_path):
    with _open(tmp_path) as st:
        for k in range(4):
            st.commit(_samples(3, k), "job", {"consumed": 3 * (k + 1)})
    st = Store(tmp_path)
    _assert_same(st[10], _samples(3, 3)[1])
    assert list(st._handles) == [3]


def test_refuses_other_model_layers_or_dtype_and_leaves_store_alone(tmp_path):
    with _open(tmp_path) as st:
        st.commit(_samples(2), "job", {"consumed": 2})
    before = (tmp_path / MANIFEST).read_bytes()
    for kwargs, match in [
        ({"config_hash": "other"}, "config_hash"),
        ({"tokenizer_hash": "other"}, "tokenizer_hash"),
        ({"weights_hash": "other"}, "weights_hash"),
    ]:
        with pytest.raises(StoreError, match=f"refusing to append.*{match}"):
            _open(tmp_path, **kwargs)
    with pytest.raises(StoreError, match="layers"):
        Store.open_for_append(tmp_path, IDENTITY, [3], "bfloat16")
    with pytest.raises(StoreError, match="dtype"):
        _open(tmp_path, "float16")
    assert (tmp_path / MANIFEST).read_bytes() == before
    assert len(Store(tmp_path)) == 2


def test_a_second_writer_is_locked_out(tmp_path):
    with _open(tmp_path), pytest.raises(StoreError, match="another process"):
        _open(tmp_path)
    _open(tmp_path).close()  # released


def test_crash_debris_is_removed_and_ignored(tmp_path):
    with _open(tmp_path) as st:
        st.commit(_samples(2), "job", {"consumed": 2})
    # A kill between shard rename and manifest rename, and one mid-write.
    (tmp_path / "shard-000001.safetensors").write_bytes(b"orphan")
    (tmp_path / "shard-000002.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "manifest.json.tmp").write_bytes(b"{")
    with _open(tmp_path) as st:
        assert len(st) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", MANIFEST, "shard-000000.safetensors"]
        st.commit(_samples(1, 9), "job", {"consumed": 3})
    _assert_same(Store(tmp_path)[2], _samples(1, 9)[0])


def test_failed_manifest_update_keeps_the_committed_state(tmp_path, monkeypatch):
    st = _open(tmp_path)
    st.commit(_samples(2), "job", {"consumed": 2})
    real = store_mod.atomic_write

    def crash_on_manifest(path, data):
        if path.name == MANIFEST:
            raise OSError(errno.EIO, "I/O error")
        real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write", crash_on_manifest)
    with pytest.raises(StoreError, match="still holds its 2 committed samples"):
        st.commit(_samples(3, 1), "job", {"consumed": 5})
    assert len(st) == 2 and st.job("job")["consumed"] == 2  # in memory too
    st.close()
    monkeypatch.setattr(store_mod, "atomic_write", real)
    with _open(tmp_path) as st:
        assert len(st) == 2 and not (tmp_path / "shard-000001.safetensors").exists()


def test_disk_full_is_reported_and_harmless(tmp_path, monkeypatch):
    with _open(tmp_path) as st:
        st.commit(_samples(2), "job", {"consumed": 2})
        before = (tmp_path / MANIFEST).read_bytes()
        real_open = open

        def full_disk(path, mode="r", *args, **kwargs):
            if "w" in mode and ".safetensors." in str(path) and str(path).endswith(".tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", full_disk)
        with pytest.raises(StoreError, match="disk full.*2 committed samples"):
            st.commit(_samples(3, 1), "job", {"consumed": 5})
        monkeypatch.undo()
    assert (tmp_path / MANIFEST).read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
    assert len(Store(tmp_path)) == 2


def test_corrupt_shard_is_named(tmp_path):
    with _open(tmp_path) as st:
        st.commit(_samples(3), "job", {"consumed": 3})
    shard = tmp_path / "shard-000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-000000.safetensors: corrupt shard .SHA-256"):
        Store(tmp_path).verify()
    shard.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(StoreError, match="shard-000000.safetensors: corrupt shard .size"):
        Store(tmp_path)[0]
    shard.unlink()
    with pytest.raises(StoreError, match="missing"):
        Store(tmp_path)[0]


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not an mtpkit store"):
        Store(tmp_path)
    (tmp_path / MANIFEST).write_text("{oops")
    with pytest.raises(StoreError, match="corrupt manifest"):
        Store(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(StoreError, match="not an mtpkit store manifest"):
        Store(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        _open(other)
    assert (other / "notes.txt").read_text() == "mine"


def test_sample_shape_mismatch_is_refused(tmp_path):
    bad = _samples(1)[0]
    bad.hidden_states = bad.hidden_states[:, :1]
    with _open(tmp_path) as st, pytest.raises(StoreError, match="do not match"):
        st.commit([bad], "job", {"consumed": 1})


def test_tokens_store_keeps_ids_and_masks_and_training_recomputes_hidden(tmp_path, tiny_llama):
    """A tokens store holds what a hidden store holds minus the hidden states (5 bytes per token);
    StoreSource recomputes them with the target: the batches equal the hidden store's up to bf16."""
    from helpers import collect_tiny

    from mtpkit.train.data import DataError, StoreSource

    def run(name, kind):
        return collect_tiny(
            tmp_path / name, tiny_llama, batch_size=3, max_prompts=9, layers=[1, 2], store_kind=kind
        )

    hidden, tokens = run("hidden", "hidden"), run("tokens", "tokens")
    h, t = Store(tmp_path / "hidden"), Store(tmp_path / "tokens")
    assert t.kind == "tokens" and h.kind == "hidden" and t.dtype is None
    assert [s.input_ids.tolist() for s in h] == [s.input_ids.tolist() for s in t]
    assert [s.loss_mask.tolist() for s in h] == [s.loss_mask.tolist() for s in t]
    assert all(s.hidden_states is None for s in t)
    assert tokens["bytes_per_token"] < 12 < hidden["bytes_per_token"]  # 5 B/token + headers, vs 5 + 2*2*H
    with pytest.raises(DataError, match="needs the target"):
        StoreSource(t, 256, 64, 0.2, 4, seed=0)
    a = StoreSource(h, 256, 64, 0.2, 4, seed=0, feature_layers=[1])
    b = StoreSource(t, 256, 64, 0.2, 4, seed=0, feature_layers=[1], target=tiny_llama)
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
        torch.testing.assert_close(x.hidden, y.hidden, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(x.features, y.features, rtol=1e-2, atol=1e-2)
    with pytest.raises(StoreError, match="kind 'tokens'"):
        Store.open_for_append(tmp_path / "tokens", tiny_llama.identity(), [1, 2], "bfloat16", "hidden")
