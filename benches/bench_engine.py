"""Engine throughput on a random-weight model of a real shape.

Creates the model under benches/models/ if it is missing, then prints, as JSON and a table:
decode tokens/s at batch 1, 8 and 32, prefill tokens/s, the machine's measured read
bandwidth, and batch-1 decode as a fraction of its ceiling (bandwidth / bytes of weights
read per token).

    python benches/bench_engine.py --shape tinyllama-1.1b --weights f16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # name: hidden, layers, heads, kv heads, ffn, vocab
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632, vocab_size=32000),
    "llama-110m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, intermediate_size=2048, vocab_size=32000),
    "smoke": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688, vocab_size=4096),
}

# Bytes per weight of each held format (block bytes / block weights).
BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q6_k": 210 / 256, "q5_0": 22 / 32, "q4_k": 144 / 256, "q4_0": 18 / 32}


def make_model(shape: str, dest: Path, stored_dtype: str) -> None:
    """A LlamaForCausalLM folder with N(0, 0.02) weights (norms 1) stored in `stored_dtype`."""
    from safetensors.numpy import save_file

    s = SHAPES[shape]
    h, ffn, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    np_dtype = {"float16": np.float16, "float32": np.float32}[stored_dtype]
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)

    tensors = {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h), "model.norm.weight": np.ones(h, np_dtype)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors.update({
            f"{p}.input_layernorm.weight": np.ones(h, np_dtype),
            f"{p}.post_attention_layernorm.weight": np.ones(h, np_dtype),
            f"{p}.self_attn.q_proj.weight": rand(q, h),
            f"{p}.self_attn.k_proj.weight": rand(kv, h),
            f"{p}.self_attn.v_proj.weight": rand(kv, h),
            f"{p}.self_attn.o_proj.weight": rand(h, q),
            f"{p}.mlp.gate_proj.weight": rand(ffn, h),
            f"{p}.mlp.up_proj.weight": rand(ffn, h),
            f"{p}.mlp.down_proj.weight": rand(h, ffn),
        })
    tmp = dest.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype=stored_dtype,
                  bos_token_id=0, eos_token_id=1, **s)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(ROOT / "tests/fixtures/models/llama-tiny/tokenizer.json", tmp / "tokenizer.json")
    tmp.rename(dest)


def timed_generate(eng, prompts, max_tokens: int) -> tuple[float, float, float]:
    """(wall seconds of the call, seconds from the first token to the end, CPU seconds of this
    process over the call / wall seconds: below the thread count when other processes took
    the cores)."""
    from upg_batch import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t, c = time.perf_counter(), time.process_time()
    out = eng.generate(prompts, params)
    wall = time.perf_counter() - t
    cpu_share = (time.process_time() - c) / max(wall, 1e-9)
    # Every sequence gets its first token from the prefill step; what follows is decode.
    decode = max(c.latency_s for c in out) - max(c.ttft_s for c in out)
    return wall, decode, cpu_share


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--weights", default="f16", choices=sorted(BYTES_PER_WEIGHT) + ["q4_k_m"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--decode-tokens", type=int, default=16, help="tokens generated per sequence in decode runs")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from upg_batch import Engine, _native

    stored = "float32" if args.weights == "f32" else "float16"
    model_dir = ROOT / "benches/models" / f"{args.shape}-{stored}"
    if not model_dir.exists():
        print(f"creating {model_dir} ...", file=sys.stderr)
        make_model(args.shape, model_dir, stored)

    bandwidth = _native.measure_read_bandwidth(1 << 30, args.threads, 5)
    eng = Engine(model_dir, weights=args.weights, threads=args.threads, max_batch=max(int(b) for b in args.batches.split(",")))
    info = eng.info
    rng = np.random.default_rng(1)
    vocab = info["vocab"]
    # q4_k_m holds an untied embedding as q4_k
    untied_embedding = info["vocab"] * info["hidden_size"] * BYTES_PER_WEIGHT[args.weights.replace("q4_k_m", "q4_k")]
    bytes_per_token = info["weight_bytes"] - untied_embedding  # the embedding is read one row per token
    ceiling = bandwidth / bytes_per_token

    timed_generate(eng, [[5, 6, 7]], 2)  # warm up: page in the weights
    results = {}
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [rng.integers(2, vocab, args.prompt_len).tolist() for _ in range(b)]
        _, t_decode, share = timed_generate(eng, prompts, 1 + args.decode_tokens)
        tps = b * args.decode_tokens / max(t_decode, 1e-9)
        results[f"decode_batch_{b}"] = {"tokens_per_s": round(tps, 2), "fraction_of_ceiling": round(tps / ceiling, 3) if b == 1 else None, "cpu_per_wall": round(share, 2)}
    prompt = [rng.integers(2, vocab, args.prefill_len).tolist()]
    t, _, share = timed_generate(eng, prompt, 1)
    results["prefill"] = {"tokens_per_s": round(args.prefill_len / t, 2), "cpu_per_wall": round(share, 2)}

    b1 = results.get("decode_batch_1", {}).get("tokens_per_s")
    report = {
        "shape": args.shape,
        "weights": args.weights,
        "threads": args.threads,
        "simd": info["simd"],
        "machine": machine(),
        "weight_bytes": info["weight_bytes"],
        "bytes_per_token": bytes_per_token,
        "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "ceiling_tokens_per_s": round(ceiling, 2),
        "results": results,
        "batch32_over_batch1": round(results["decode_batch_32"]["tokens_per_s"] / b1, 2) if b1 and "decode_batch_32" in results else None,
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=2))
    print(f"\n{'run':<18}{'tokens/s':>12}{'of ceiling':>12}{'cpu/wall':>10}")
    for name, r in results.items():
        frac = f"{r['fraction_of_ceiling']:.0%}" if r.get("fraction_of_ceiling") is not None else ""
        print(f"{name:<18}{r['tokens_per_s']:>12.2f}{frac:>12}{r['cpu_per_wall']:>10.2f}")
    print(f"ceiling (batch 1): {ceiling:.2f} tok/s = {bandwidth / 1e9:.1f} GB/s / {bytes_per_token / 1e9:.2f} GB per token")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}"


if __name__ == "__main__":
    sys.exit(main())
