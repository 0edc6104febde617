"""The hidden-state store: an append-only directory of safetensors shards plus a manifest.

    store/
      manifest.json              the truth: identity, layout, committed shards, job cursors
      shard-000000.safetensors   input_ids int32 [N], loss_mask uint8 [N],
      shard-000001.safetensors   hidden_states {fp16|bf16} [N, n_layers, H], offsets int64 [S+1]

Two kinds (manifest `kind`): "hidden" stores the target's hidden states (1,157 bytes per token on
SmolLM2-135M); "tokens" stores only ids and masks (5 bytes per token) and the trainer recomputes
the hidden states with the target (one teacher-forced forward per batch).

Crash safety: a shard is written to a temporary file, fsynced and renamed; only then is the
manifest (also written to a temporary file and renamed) updated to list it. Whatever the
moment of a kill -9, the manifest names only complete shards, and anything it does not name
is debris that the next open deletes. Readers use safetensors' memory-mapped slices, so one
sample is read without loading a shard.

Why not HF `datasets`/Arrow: Arrow has no bf16 type and rewriting a dataset to append is
not atomic; a safetensors shard is what the rest of the ecosystem already reads.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from mtpkit.errors import MtpkitError
from mtpkit.io import atomic_write
from mtpkit.models.loader import DTYPES, identity_differences

FORMAT = "mtpkit-store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
STORE_DTYPES = {name: DTYPES[name] for name in ("bfloat16", "float16")}  # hidden states on disk
KINDS = ("hidden", "tokens")  # hidden: ids, masks and hidden states; tokens: ids and masks only
_IDENTITY_KEYS = ("config_hash", "tokenizer_hash", "weights_hash")


class StoreError(MtpkitError, RuntimeError):
    """The store cannot be opened, appended to or read; the message names the file."""


@dataclass
class Sample:
    input_ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # bool [T]
    hidden_states: torch.Tensor | None  # [T, n_layers, H] in the store dtype; None in a tokens store
    source: str = ""


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


class Store:
    """Random-access reader and append-only writer of one store directory.

    Open for reading with `Store(path)`; for appending use `Store.open_for_append`, which
    checks the model identity and layout and takes an exclusive lock.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise StoreError(f"{self.root}: not an mtpkit store (no {MANIFEST})")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: corrupt manifest ({exc})") from exc
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: not an mtpkit store manifest (format={self.manifest.get('format')!r})")
        if self.manifest.get("version") != VERSION:
            raise StoreError(
                f"{path}: store version {self.manifest.get('version')} unsupported (need {VERSION})"
            )
        self._lock_fd: int | None = None
        self._handles: dict[int, object] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._sources: dict[int, list[str]] = {}
        self._reindex()

    # ------------------------------------------------------------------ layout
    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "hidden")  # stores written before kinds existed hold hidden states

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.kind == "tokens" else STORE_DTYPES[self.manifest["dtype"]]

    @property
    def hidden_size(self) -> int:
        return self.manifest["model"]["hidden_size"]

    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"]

    def __len__(self) -> int:
        return self.num_samples

    def _reindex(self) -> None:
        self._starts = [0]
        for shard in self.manifest["shards"]:
            self._starts.append(self._starts[-1] + shard["num_samples"])

    def bytes_on_disk(self) -> int:
        return sum(s["bytes"] for s in self.manifest["shards"]) + (self.root / MANIFEST).stat().st_size

    # ------------------------------------------------------------------ reading
    def _open_shard(self, index: int):
        if index not in self._handles:
            info = self.manifest["shards"][index]
            path = self.root / info["file"]
            if not path.is_file():
                raise StoreError(f"{path}: shard listed in the manifest is missing")
            if path.stat().st_size != info["bytes"]:
                raise StoreError(
                    f"{path}: corrupt shard (size {path.stat().st_size} bytes, manifest says {info['bytes']})"
                )
            try:
                handle = safe_open(str(path), framework="pt")
                offsets = handle.get_tensor("offsets").numpy()
                sources = json.loads((handle.metadata() or {}).get("sources", "[]"))
            except Exception as exc:
                raise StoreError(f"{path}: corrupt shard ({type(exc).__name__}: {exc})") from exc
            self._handles[index] = handle
            self._offsets[index] = offsets
            self._sources[index] = sources
        return self._handles[index], self._offsets[index]

    def __getitem__(self, i: int) -> Sample:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a store of {self.num_samples}")
        i %= self.num_samples
        shard = bisect.bisect_right(self._starts, i) - 1
        handle, offsets = self._open_shard(shard)
        j = i - self._starts[shard]
        a, b = int(offsets[j]), int(offsets[j + 1])
        try:
            sample = Sample(
                input_ids=handle.get_slice("input_ids")[a:b].long(),
                loss_mask=handle.get_slice("loss_mask")[a:b].bool(),
                hidden_states=handle.get_slice("hidden_states")[a:b] if self.kind == "hidden" else None,
            )
        except Exception as exc:
            raise StoreError(
                f"{self.root / self.manifest['shards'][shard]['file']}: corrupt shard ({exc})"
            ) from exc
        sources = self._sources[shard]
        if sources:
            sample.source = sources[j]
        return sample

    def sample_lengths(self) -> list[int]:
        """Token count of every sample, read from the shards' offsets (no hidden states)."""
        lengths: list[int] = []
        for index in range(len(self.manifest["shards"])):
            lengths += np.diff(self._open_shard(index)[1]).tolist()
        return lengths

    def __iter__(self):
        for i in range(self.num_samples):
            yield self[i]

    def verify(self) -> None:
        """Read every shard in full and check its SHA-256 against the manifest."""
        for info in self.manifest["shards"]:
            path = self.root / info["file"]
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            if digest != info["sha256"]:
                raise StoreError(f"{path}: corrupt shard (SHA-256 mismatch with the manifest)")

    # ------------------------------------------------------------------ writing
    @classmethod
    def open_for_append(
        cls,
        root: str | os.PathLike,
        identity: dict,
        layers: list[int],
        dtype: str | None,
        kind: str = "hidden",
    ) -> Store:
        """Create the store or open it for appending, refusing a different model or layout.

        A tokens store has no dtype (pass None); its `layers` are those the trainer recomputes."""
        root = Path(root)
        if kind not in KINDS:
            raise StoreError(f"store kind must be one of {list(KINDS)}, got {kind!r}")
        if kind == "tokens":
            dtype = None
        elif dtype not in STORE_DTYPES:
            raise StoreError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root}: exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreError(f"{root}: another process is writing to this store") from None

        if not (root / MANIFEST).exists():
            # A crash before the first manifest can leave the lock, shards and temporary files.
            foreign = [
                p
                for p in root.iterdir()
                if p.name != LOCK and not p.name.startswith("shard-") and not p.name.endswith(".tmp")
            ]
            if foreign:
                os.close(lock_fd)
                raise StoreError(f"{root}: directory is not empty and holds no mtpkit store")
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "kind": kind,
                "model": identity,
                "layers": list(layers),
                "dtype": dtype,
                "num_samples": 0,
                "num_tokens": 0,
                "num_loss_tokens": 0,
                "shards": [],
                "jobs": {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())

        store = cls(root)
        store._lock_fd = lock_fd
        try:
            store._check_compatible(identity, layers, dtype, kind)
        except StoreError:
            store.close()
            raise
        store._remove_debris()
        return store

    def _check_compatible(self, identity: dict, layers: list[int], dtype: str | None, kind: str) -> None:
        have = self.manifest["model"]
        where = self.root / MANIFEST
        diffs = identity_differences(have, identity, _IDENTITY_KEYS, "store", "this run")
        if diffs:
            raise StoreError(
                f"{where}: refusing to append — the store holds data of model {have.get('model_id')!r}, "
                f"this run uses {identity.get('model_id')!r} ({'; '.join(diffs)}); collect into a new --out directory"
            )
        if self.layers != list(layers):
            raise StoreError(
                f"{where}: refusing to append — store has layers {self.layers}, this run asks for {list(layers)}"
            )
        if self.kind != kind:
            raise StoreError(
                f"{where}: refusing to append — the store is of kind {self.kind!r}, this run asks for {kind!r}"
            )
        if self.manifest["dtype"] != dtype:
            raise StoreError(
                f"{where}: refusing to append — store dtype is {self.manifest['dtype']}, this run asks for {dtype}"
            )

    def _remove_debris(self) -> None:
        """Delete temporary files and shards the manifest does not list (left by a crash)."""
        listed = {s["file"] for s in self.manifest["shards"]}
        for path in self.root.iterdir():
            if path.name.endswith(".tmp") or (path.name.startswith("shard-") and path.name not in listed):
                path.unlink(missing_ok=True)

    def job(self, key: str) -> dict:
        return self.manifest["jobs"].get(key, {"consumed": 0, "samples": 0, "tokens": 0})

    def commit(self, samples: list[Sample], job_key: str, job_state: dict) -> None:
        """Write `samples` as one new shard and advance the job cursor, atomically.

        `job_state` is the job's new cursor (`consumed` items, `samples`, ...). With no
        samples only the cursor moves (e.g. a batch whose prompts were all skipped).
        """
        if self._lock_fd is None:
            raise StoreError(f"{self.root}: store opened read-only")
        manifest = json.loads(json.dumps(self.manifest))  # deep copy; replaced only on success
        if samples:
            index = len(manifest["shards"])
            name = _shard_name(index)
            data = self._encode(samples)
            try:
                atomic_write(self.root / name, data)
            except OSError as exc:
                why = "disk full" if exc.errno == errno.ENOSPC else f"{type(exc).__name__}: {exc}"
                raise StoreError(
                    f"{self.root / name}: could not write shard ({why}); the store still holds its "
                    f"{self.num_samples} committed samples and the run can be resumed"
                ) from exc
            tokens = sum(len(s.input_ids) for s in samples)
            loss_tokens = sum(int(s.loss_mask.sum()) for s in samples)
            manifest["shards"].append(
                {
                    "file": name,
                    "num_samples": len(samples),
                    "num_tokens": tokens,
                    "num_loss_tokens": loss_tokens,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            manifest["num_samples"] += len(samples)
            manifest["num_tokens"] += tokens
            manifest["num_loss_tokens"] += loss_tokens
        manifest["jobs"][job_key] = job_state
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as exc:
            raise StoreError(
                f"{self.root / MANIFEST}: could not update the manifest ({exc}); the store still holds its "
                f"{self.num_samples} committed samples and the run can be resumed"
            ) from exc
        self.manifest = manifest
        self._reindex()

    def _encode(self, samples: list[Sample]) -> bytes:
        n_layers, hidden = len(self.layers), self.hidden_size
        for s in samples if self.kind == "hidden" else ():
            if (
                s.hidden_states is None
                or s.hidden_states.shape[1:] != (n_layers, hidden)
                or s.hidden_states.shape[0] != len(s.input_ids)
            ):
                raise StoreError(
                    f"sample {s.source}: hidden states "
                    f"{None if s.hidden_states is None else tuple(s.hidden_states.shape)} do not match "
                    f"{len(s.input_ids)} tokens x {n_layers} layers x {hidden}"
                )
        lengths = torch.tensor([len(s.input_ids) for s in samples], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        tensors = {
            "input_ids": torch.cat([s.input_ids for s in samples]).to(torch.int32),
            "loss_mask": torch.cat([s.loss_mask for s in samples]).to(torch.uint8),
            "offsets": offsets,
        }
        if self.kind == "hidden":
            tensors["hidden_states"] = (
                torch.cat([s.hidden_states for s in samples]).to(self.dtype).contiguous()
            )
        metadata = {
            "format": FORMAT,
            "layers": json.dumps(self.layers),
            "sources": json.dumps([s.source for s in samples]),
        }
        return safetensors_bytes(tensors, metadata=metadata)

    def close(self) -> None:
        self._handles.clear()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
