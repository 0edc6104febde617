"""Speed and peak memory of `mtpkit convert` on a synthetic DeepSeek-V3 checkpoint of ~1 GB.

Run from the repository root (it is disk- and memory-bandwidth bound; serialize it with other
heavy jobs):

    flock /tmp/mtpkit-heavy.lock .venv/bin/python benchmarks/convert_speed.py

A "tiny but wide" DeepSeek-V3 config (MLA, 48 routed experts + 1 shared, first layer dense, one
MTP layer, bf16 random weights, written as 2 safetensors shards) is converted

    HF → Megatron tp2·pp2·ep2 (grouped GEMM) → HF            (checked bit-exact against the source)
    Megatron tp2·pp2·ep2 → Megatron tp1 (sharded-to-sharded)

each conversion in a fresh process. Reported per step: seconds, GB/s of tensor bytes written,
peak RSS (VmHWM: includes the file pages the memory-mapped inputs touch, which the kernel can drop)
and peak anonymous memory (RssAnon sampled every 20 ms: what the conversion really holds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent

CONFIG = dict(
    model_type="deepseek_v3",
    architectures=["DeepseekV3ForCausalLM"],
    vocab_size=32768,
    hidden_size=1024,
    intermediate_size=2048,
    moe_intermediate_size=512,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=48,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=8,
    topk_group=4,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    num_nextn_predict_layers=1,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)


def hf_shapes(c: dict) -> dict[str, list[int]]:
    H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    heads, qk = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for n in range(L + c["num_nextn_predict_layers"]):
        p = f"model.layers.{n}"
        a = f"{p}.self_attn"
        out.update({
            f"{p}.input_layernorm.weight": [H],
            f"{p}.post_attention_layernorm.weight": [H],
            f"{a}.q_a_proj.weight": [c["q_lora_rank"], H],
            f"{a}.q_a_layernorm.weight": [c["q_lora_rank"]],
            f"{a}.q_b_proj.weight": [heads * qk, c["q_lora_rank"]],
            f"{a}.kv_a_proj_with_mqa.weight": [c["kv_lora_rank"] + c["qk_rope_head_dim"], H],
            f"{a}.kv_a_layernorm.weight": [c["kv_lora_rank"]],
            f"{a}.kv_b_proj.weight": [heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]],
            f"{a}.o_proj.weight": [H, heads * c["v_head_dim"]],
        })  # fmt: skip
        mlps = [(f"{p}.mlp", c["intermediate_size"])]
        if n >= c["first_k_dense_replace"]:
            F = c["moe_intermediate_size"]
            mlps = [(f"{p}.mlp.experts.{e}", F) for e in range(c["n_routed_experts"])]
            mlps.append((f"{p}.mlp.shared_experts", F * c["n_shared_experts"]))
            out[f"{p}.mlp.gate.weight"] = [c["n_routed_experts"], H]
            out[f"{p}.mlp.gate.e_score_correction_bias"] = [c["n_routed_experts"]]
        for m, F in mlps:
            out.update(
                {
                    f"{m}.gate_proj.weight": [F, H],
                    f"{m}.up_proj.weight": [F, H],
                    f"{m}.down_proj.weight": [H, F],
                }
            )
        if n >= L:  # MTP layer
            out.update(
                {f"{p}.enorm.weight": [H], f"{p}.hnorm.weight": [H], f"{p}.eh_proj.weight": [H, 2 * H]}
            )
            out.update({f"{p}.shared_head.norm.weight": [H]})
    return out


def make_checkpoint(path: Path) -> int:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIG))
    shapes = hf_shapes(CONFIG)
    g = torch.Generator().manual_seed(0)
    names = list(shapes)
    total, weight_map = 0, {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        tensors = {n: torch.randn(shapes[n], generator=g).to(torch.bfloat16) for n in part}
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    # The MTP layer's copies of the embedding and LM head, as DeepSeek's release stores them.
    from safetensors import safe_open

    with safe_open(str(path / weight_map["model.embed_tokens.weight"]), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    with safe_open(str(path / weight_map["lm_head.weight"]), "pt") as f:
        head = f.get_tensor("lm_head.weight")
    L = CONFIG["num_hidden_layers"]
    extra = {f"model.layers.{L}.embed_tokens.weight": emb, f"model.layers.{L}.shared_head.head.weight": head}
    save_file(extra, str(path / "model-mtp-copies.safetensors"), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(extra, "model-mtp-copies.safetensors"))
    total += sum(t.numel() * 2 for t in extra.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
peak = [0]
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from mtpkit.convert.layout import Layout
from mtpkit.convert import reshard
step, src, out = sys.argv[1:4]
t0 = time.perf_counter()
if step == "hf-to-sharded":
    r = reshard.hf_to_sharded(src, out, Layout(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=-1))
elif step == "sharded-to-hf":
    r = reshard.sharded_to_hf(src, out, max_shard_bytes=512 * 2**20)
else:
    r = reshard.sharded_to_sharded(src, out, Layout(mtp_num_layers=-1))
dt = time.perf_counter() - t0
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps(dict(step=step, seconds=dt, bytes=r.bytes, peak_rss=hwm, peak_anon=peak[0])))
"""


def run_step(step: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, step, str(src), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(f"{step} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bit_exact(a: Path, b: Path) -> bool:
    from mtpkit.convert.hf import HFReader

    ra, rb = HFReader(a), HFReader(b)
    return sorted(ra.names()) == sorted(rb.names()) and all(
        torch.equal(ra.get(n), rb.get(n)) for n in ra.names()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert_speed.json"))
    ap.add_argument("--workdir", help="where the ~3 GB of checkpoints go (default: a temporary dir)")
    ap.add_argument("--small", action="store_true", help="a ~40 MB model, to check the script itself")
    args = ap.parse_args()
    if args.small:
        CONFIG.update(vocab_size=4096, hidden_size=256, n_routed_experts=8, moe_intermediate_size=128)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        size = make_checkpoint(root / "hf")
        print(
            f"synthetic DeepSeek-V3 checkpoint: {size / 1e9:.2f} GB bf16 in {time.perf_counter() - t0:.1f} s"
        )
        rows = [
            run_step("hf-to-sharded", root / "hf", root / "tp2pp2ep2"),
            run_step("sharded-to-hf", root / "tp2pp2ep2", root / "hf-back"),
            run_step("sharded-to-sharded", root / "tp2pp2ep2", root / "tp1"),
        ]
        exact = bit_exact(root / "hf", root / "hf-back")
    print(f"\n{'step':<22}{'seconds':>9}{'GB/s':>8}{'peak RSS GB':>13}{'peak anon GB':>14}")
    for r in rows:
        r["gb_per_s"] = r["bytes"] / 1e9 / r["seconds"]
        print(
            f"{r['step']:<22}{r['seconds']:>9.2f}{r['gb_per_s']:>8.2f}"
            f"{r['peak_rss'] / 1e9:>13.2f}{r['peak_anon'] / 1e9:>14.2f}"
        )
    print(f"\nHF → tp2·pp2·ep2 → HF bit-exact: {exact}")
    result = dict(
        checkpoint_bytes=size,
        config=CONFIG,
        layout="tp2 pp2 ep2, moe-grouped-gemm, 1 MTP layer",
        steps=rows,
        roundtrip_bit_exact=exact,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__),
    )
    if args.small:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
