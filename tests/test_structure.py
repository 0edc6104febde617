"""The package's structure as contracts: what a head family must provide, which packages may
import which, and which head families joint training trains or refuses."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mtpkit.config import ConfigError, from_dict
from mtpkit.export import FORMATS, NATIVE
from mtpkit.heads import FAMILIES, DraftHead, HeadError, HeadFamily, build_head, check_family, save_head
from mtpkit.heads.base import TargetModules
from mtpkit.heads.mtp import MTPConfig, MTPDrafter, MTPHead
from mtpkit.joint.mtp_loss import MTPLossConfig, mtp_loss
from mtpkit.joint.sft import SFTConfig, SFTDataConfig, SFTError, sft

PACKAGE = Path(__file__).resolve().parents[1] / "mtpkit"

# ---------------------------------------------------------------------------- head families
FAMILY_PIECES = ("config (a dataclass)", "model (a DraftHead)", "drafter", "export formats with writers")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_provides_every_piece(name, tiny_llama):
    family = FAMILIES[name]
    check_family(family)  # raises naming the missing piece
    assert dataclasses.is_dataclass(family.config) and issubclass(family.model, DraftHead)
    assert all(fmt in FORMATS and fmt != NATIVE for fmt in family.export_formats)
    head = build_head(tiny_llama, name, {"layers": [0, 1, 2]} if name == "eagle3" else {})
    assert isinstance(head.make_drafter(1, torch.float32, lambda x: (int(x.argmax()), None)), family.drafter)
    # Borrowed target modules are shared, never saved or trained.
    assert head.embed_tokens is tiny_llama.embed_tokens and head.target_lm_head is tiny_llama.lm_head
    names = set(head.state_dict())
    assert not any(n.startswith(("embed_tokens", "target_lm_head", "borrowed")) for n in names)
    assert all(p is not tiny_llama.lm_head.weight for p in head.parameters())


def test_every_export_format_belongs_to_exactly_one_family():
    owners = {fmt: [f.name for f in FAMILIES.values() if fmt in f.export_formats] for fmt in FORMATS}
    assert owners.pop(NATIVE) == []
    assert all(len(o) == 1 for o in owners.values()), owners


class _NoDrafter:
    pass


class _HalfHead(DraftHead):  # implements the training forward but no drafting
    head_type = "half"

    def forward_train(self, input_ids, inputs, depths=None):
        return []


@pytest.mark.parametrize(
    "family, missing",
    [
        (HeadFamily("half", MTPConfig, _HalfHead, MTPDrafter), "make_drafter"),
        (HeadFamily("mtp", MTPConfig, MTPHead, _NoDrafter), "lacks ['start', 'commit', 'draft']"),
        (HeadFamily("mtp", dict, MTPHead, MTPDrafter), "config must be a dataclass"),
        (HeadFamily("mtp", MTPConfig, torch.nn.Linear, MTPDrafter), "must subclass"),
        (HeadFamily("other", MTPConfig, MTPHead, MTPDrafter), "head_type must be 'other'"),
    ],
)
def test_a_family_missing_a_piece_is_refused(family, missing):
    with pytest.raises(HeadError, match=missing.replace("[", r"\[").replace("]", r"\]")):
        check_family(family)


def test_cast_copies_the_head_and_shares_the_borrowed_modules(tiny_llama):
    head = build_head(tiny_llama, "mtp", {})
    assert head.cast(torch.float32) is head
    low = head.cast(torch.bfloat16)
    assert low is not head and low.borrowed is head.borrowed
    assert next(low.layers.parameters()).dtype == torch.bfloat16
    assert next(head.layers.parameters()).dtype == torch.float32
    assert low.rotary_emb.inv_freq.dtype == torch.float32


def test_borrowing_swaps_and_restores_the_target_modules(tiny_llama):
    head = build_head(tiny_llama, "mtp", {})
    other = TargetModules(torch.nn.Embedding(*tiny_llama.embed_tokens.weight.shape), tiny_llama.lm_head)
    with head.borrowing(other):
        assert head.embed_tokens is other.embed_tokens
    assert head.embed_tokens is tiny_llama.embed_tokens


# ---------------------------------------------------------------------------- import directions
# The pipeline, bottom to top: a package may import its own and those below it, never above.
LAYERS = [
    {"errors", "io", "progress", "config", "models"},
    {"data"},
    {"heads"},
    {"distributed"},
    {"train"},
    {"decode"},
    {"export", "convert"},
    {"joint"},
    {"demo", "cli"},
]


def _layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"mtpkit.{name} is in no layer of LAYERS; add it")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtpkit."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mtpkit.")}
    return found


def test_no_package_imports_one_above_it_in_the_pipeline():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        here = rel.parts[0].removesuffix(".py")
        for name in _imports(path):
            if _layer(name) > _layer(here):
                upward.append(f"{rel} imports mtpkit.{name}")
    assert not upward, "\n".join(upward)


def test_no_private_names_imported_across_packages():
    crossing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtpkit."):
                there = node.module.split(".")[1]
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                if private and there != here:
                    crossing.append(f"{path.relative_to(PACKAGE)}: {private} from {node.module}")
    assert not crossing, "\n".join(crossing)


def test_no_head_attribute_probing_outside_the_head_package():
    probes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "heads":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
                and node.args
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id == "head"
            ):
                probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "_frozen":
                probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno} touches head._frozen")
    assert not probes, "\n".join(probes)


# ---------------------------------------------------------------------------- joint training
def test_mtp_loss_config_is_the_head_trainers_loss_config_plus_joint_fields():
    cfg = from_dict(MTPLossConfig, {"target": "soft_ce"})
    assert cfg.kind == "kl"  # the older name still loads
    assert from_dict(MTPLossConfig, {"kind": "tv"}).kind == "tv"
    with pytest.raises(ConfigError, match="mtp.target must be one of"):
        from_dict(MTPLossConfig, {"target": "kl2"})


@pytest.mark.parametrize("name", ["mtp", "medusa", "diffusion"])
def test_joint_mtp_loss_trains_every_supported_family(name, tiny_llama):
    """Each family the joint recipes accept gets a finite loss and head gradients from the model's
    final hidden states, with no gradient reaching the (detached) model."""
    assert FAMILIES[name].model.supports_joint
    head = build_head(tiny_llama, name, {})
    head.train()
    hidden = torch.randn(2, 9, tiny_llama.hidden_size, requires_grad=True)
    ids = torch.randint(3, 200, (2, 9))
    loss, stats = mtp_loss(head, hidden, ids, torch.ones(2, 9, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and stats
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert hidden.grad is None and tiny_llama.lm_head.weight.grad is None


def _sft_data(tmp_path: Path) -> Path:
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}. #### {2 * i}"}) + "\n"
            for i in range(8)
        )
    )
    return data


@pytest.mark.parametrize("name", ["medusa", "diffusion"])
def test_sft_runs_with_non_mtp_heads(name, tmp_path):
    cfg = SFTConfig(
        model="tiny-llama",
        out=str(tmp_path / "run"),
        head_type=name,
        data=SFTDataConfig(paths=[str(_sft_data(tmp_path))], max_seq_len=128, batch_size=2, eval_examples=2),
        max_steps=2,
        save_every=2,
        eval_every=2,
        progress=False,
    )
    result = sft(cfg)
    assert (
        result["step"] == 2
        and json.loads((Path(result["head"]) / "config.json").read_text())["head_type"] == name
    )


def test_joint_training_refuses_eagle3_up_front(tmp_path, tiny_llama):
    with pytest.raises(
        ConfigError, match=r"'eagle3' cannot be trained jointly.*supported: \['diffusion', 'medusa', 'mtp'\]"
    ):
        from_dict(SFTConfig, {"head_type": "eagle3"})
    from mtpkit.joint.rl import RLConfig

    with pytest.raises(ConfigError, match="cannot be trained jointly"):
        from_dict(RLConfig, {"head_type": "eagle3"})
    # A trained EAGLE-3 head passed as init_head is refused before any work, too.
    save_head(build_head(tiny_llama, "eagle3", {"layers": [0, 1, 2]}), tmp_path / "e3", tiny_llama)
    cfg = SFTConfig(
        model="tiny-llama",
        out=str(tmp_path / "run"),
        init_head=str(tmp_path / "e3"),
        data=SFTDataConfig(paths=[str(_sft_data(tmp_path))], max_seq_len=128, batch_size=2),
        progress=False,
    )
    with pytest.raises(HeadError, match="cannot be trained jointly"):
        sft(cfg)
    assert not (tmp_path / "run" / "head").exists()
    assert SFTError  # the recipe's own error type stays importable
