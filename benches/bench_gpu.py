"""GPU engine throughput (wgpu: Vulkan or Metal) on a random-weight model of a real shape, fused
and unfused, beside Hugging Face transformers on the same weights where torch sees a CUDA GPU.

Prints, as JSON and a table, per path: decode tokens/s at each batch size, prefill tokens/s,
dispatches per decode step (= per token at batch 1), GPU time per step (timestamp queries)
against wall time and CPU encode time, and batch-1 decode as a fraction of the streaming
ceiling measured in the same run (read bandwidth of a plain WGSL kernel / bytes of weights
read per token). It also runs on lavapipe, where the numbers are small.

    UPG_BATCH_GPU_ADAPTER=nvidia python benches/bench_gpu.py --batches 1,8,32,128 --peer
    UPG_BATCH_GPU_ADAPTER=llvmpipe python benches/bench_gpu.py --shape smoke --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import BYTES_PER_WEIGHT, ROOT, SHAPES, make_model, machine, timed_generate  # noqa: E402


def profile_delta(eng: Any, before: dict[str, Any]) -> dict[str, Any]:
    after = eng.info["gpu_profile"]
    steps = max(after["steps"] - before["steps"], 1)
    gpu = None if after["gpu_s"] is None else (after["gpu_s"] - before["gpu_s"]) / steps * 1e3
    return {
        "steps": steps,
        "dispatches_per_step": round((after["dispatches"] - before["dispatches"]) / steps, 1),
        "encode_ms_per_step": round((after["encode_s"] - before["encode_s"]) / steps * 1e3, 3),
        "wall_ms_per_step": round((after["wall_s"] - before["wall_s"]) / steps * 1e3, 3),
        "gpu_ms_per_step": None if gpu is None else round(gpu, 3),
    }


def run_engine(model_dir: Path, args: argparse.Namespace, fused: bool, ceiling: float,
               batches: list[int] | None = None, prefill: bool = True) -> dict[str, Any]:
    from upg_batch import Engine

    batches = batches or [int(b) for b in args.batches.split(",")]
    eng = Engine(model_dir, backend="gpu", weights=args.weights, fused=fused, max_batch=max(batches), context=args.context)
    rng = np.random.default_rng(1)
    vocab = eng.info["vocab"]
    timed_generate(eng, [[5, 6, 7]], 2)  # warm up: pipelines, bind groups, KV cache
    results: dict[str, Any] = {}
    for b in batches:
        prompts = [rng.integers(2, vocab, args.prompt_len).tolist() for _ in range(b)]
        timed_generate(eng, prompts, 2)  # the workspace for this batch size
        before = eng.info["gpu_profile"]
        _, t_decode, _ = timed_generate(eng, prompts, 1 + args.decode_tokens)
        tps = b * args.decode_tokens / max(t_decode, 1e-9)
        results[f"decode_batch_{b}"] = {
            "tokens_per_s": round(tps, 2),
            "fraction_of_ceiling": round(tps / ceiling, 3) if b == 1 else None,
            **profile_delta(eng, before),
        }
    if prefill:
        prompt = [rng.integers(2, vocab, args.prefill_len).tolist()]
        timed_generate(eng, prompt, 1)
        before = eng.info["gpu_profile"]
        t, _, _ = timed_generate(eng, prompt, 1)
        results["prefill"] = {"tokens_per_s": round(args.prefill_len / t, 2), **profile_delta(eng, before)}
    info = eng.info
    return {"fused": fused, "adapter": info["adapter"], "api": info["gpu_api"],
            "shader_checks": info["gpu_shader_checks"], "results": results}


def sweep_settings(model_dir: Path, args: argparse.Namespace, ceiling: float) -> dict[str, Any]:
    """The fused path with each setting asked for: decode tiles (RxG) at batch 1, batch tiles
    (RxTBxG) at the largest batch asked for and in prefill, shader checks at every batch and
    in prefill. Each engine reads these from the environment when it opens the GPU."""
    import os

    out: dict[str, Any] = {}
    every = [int(b) for b in args.batches.split(",")]
    for var, tiles, batches, prefill in (("UPG_BATCH_GPU_DECODE_TILE", args.decode_tiles, [1], False),
                                         ("UPG_BATCH_GPU_BATCH_TILE", args.batch_tiles, [max(every)], True),
                                         ("UPG_BATCH_GPU_SHADER_CHECKS", args.shader_checks, every, True)):
        for tile in filter(None, (tiles or "").split(",")):
            os.environ[var] = tile
            try:
                out[f"{var}={tile}"] = run_engine(model_dir, args, True, ceiling, batches, prefill)["results"]
            finally:
                del os.environ[var]
    return out


def kernel_profile(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """GPU time per kernel at batch 1 (fused): each dispatch in its own timed pass
    (UPG_BATCH_GPU_PROFILE_KERNELS=1), so the sum is a little above a normal step's time."""
    import os

    from upg_batch import Engine

    os.environ["UPG_BATCH_GPU_PROFILE_KERNELS"] = "1"
    try:
        eng = Engine(model_dir, backend="gpu", weights=args.weights, max_batch=1, context=args.context)
    finally:
        del os.environ["UPG_BATCH_GPU_PROFILE_KERNELS"]
    prompt = [list(range(2, 2 + args.prompt_len))]
    timed_generate(eng, prompt, 2)
    start = eng.info["gpu_profile"]["kernels"]
    timed_generate(eng, prompt, 1)  # the prompt's step alone, subtracted below
    mid = eng.info["gpu_profile"]["kernels"]
    timed_generate(eng, prompt, 1 + args.decode_tokens)
    end = eng.info["gpu_profile"]["kernels"]
    steps = args.decode_tokens
    out = {}
    for name, (c2, s2) in end.items():
        c0, s0 = start.get(name, (0, 0.0))
        c1, s1 = mid.get(name, (0, 0.0))
        count, seconds = (c2 - c1) - (c1 - c0), (s2 - s1) - (s1 - s0)
        if count > 0:
            out[name] = {"per_step": round(count / steps, 2), "us_per_call": round(seconds / count * 1e6, 2),
                         "ms_per_step": round(seconds / steps * 1e3, 4)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms_per_step"]))


def run_peer(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """transformers `generate` in bf16 on the same weights: eager, and with the static cache
    (which compiles its decode step), at the same batch sizes."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "device": torch.cuda.get_device_name()}

    def gen(ids: Any, new: int, **kw: Any) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    # The static cache compiles one graph per (batch, cache length): every shape timed below
    # is warmed up first, and the compile cache holds them all (its default limit is 8).
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the older one
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    for mode, kw in (("eager", {}), ("static_compiled", {"cache_implementation": "static"})):
        res: dict[str, Any] = {}
        for b in (int(x) for x in args.batches.split(",")):
            ids = torch.tensor(rng.integers(2, vocab, (b, args.prompt_len)), device="cuda")
            for _ in range(2):  # warm up (and compile, for the static cache) both shapes timed
                gen(ids, 1, **kw)
                gen(ids, 1 + args.decode_tokens, **kw)
            t1 = gen(ids, 1, **kw)
            tn = gen(ids, 1 + args.decode_tokens, **kw)
            res[f"decode_batch_{b}"] = {"tokens_per_s": round(b * args.decode_tokens / max(tn - t1, 1e-9), 2)}
        ids = torch.tensor(rng.integers(2, vocab, (1, args.prefill_len)), device="cuda")
        gen(ids, 1, **kw)
        gen(ids, 1, **kw)
        res["prefill"] = {"tokens_per_s": round(args.prefill_len / gen(ids, 1, **kw), 2)}
        out[mode] = res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--weights", default="f16", choices=sorted(BYTES_PER_WEIGHT) + ["q4_k_m"])
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--context", type=int, default=512, help="engine context (sizes the GPU KV cache)")
    ap.add_argument("--paths", default="fused,unfused")
    ap.add_argument("--peer", action="store_true", help="also run transformers on CUDA (bf16, eager and static cache)")
    ap.add_argument("--models", type=Path, default=ROOT / "benches/models")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--decode-tiles", help="also run the fused path at batch 1 with each matrix-product tile RxG "
                    "(R output rows, G groups of 32 lanes a workgroup), e.g. 1x8,2x4,4x4")
    ap.add_argument("--batch-tiles", help="also run the fused path at the largest batch and in prefill with each "
                    "tile RxTBxG (TB batch rows), e.g. 8x8x1,4x8x2")
    ap.add_argument("--shader-checks", help="also run the fused path at every batch and in prefill with each "
                    "UPG_BATCH_GPU_SHADER_CHECKS value, e.g. all,none (bounds is the default)")
    ap.add_argument("--kernel-profile", action="store_true", help="also time each kernel at batch 1 (fused)")
    args = ap.parse_args()

    from upg_batch import Engine, _native

    stored = "float32" if args.weights == "f32" else "float16"
    model_dir = args.models / f"{args.shape}-{stored}"
    if not model_dir.exists():
        print(f"creating {model_dir} ...", file=sys.stderr)
        make_model(args.shape, model_dir, stored)

    bandwidth, adapter = _native.measure_gpu_read_bandwidth(1 << 30, 10)
    probe = Engine(model_dir, backend="gpu", weights=args.weights, max_batch=1, context=args.context)
    info = probe.info
    del probe
    bpe = BYTES_PER_WEIGHT[args.weights.replace("q4_k_m", "q4_k")]  # an untied embedding of q4_k_m is q4_k
    bytes_per_token = info["weight_bytes"] - info["vocab"] * info["hidden_size"] * bpe  # one embedding row per token
    ceiling = bandwidth / bytes_per_token
    report: dict[str, Any] = {
        "shape": args.shape,
        "weights": args.weights,
        "adapter": adapter,
        "machine": machine(),
        "weight_bytes": info["weight_bytes"],
        "bytes_per_token": bytes_per_token,
        "read_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "ceiling_tokens_per_s": round(ceiling, 1),
        "paths": {},
    }
    for path in args.paths.split(","):
        report["paths"][path] = run_engine(model_dir, args, path == "fused", ceiling)
    if args.decode_tiles or args.batch_tiles or args.shader_checks:
        report["tile_sweep"] = sweep_settings(model_dir, args, ceiling)
    if args.kernel_profile:
        report["kernel_profile_batch_1"] = kernel_profile(model_dir, args)
    if args.peer:
        report["peer_transformers_bf16"] = run_peer(model_dir, args)
    print(json.dumps(report, indent=2))
    print(f"\n{adapter}: streaming read {bandwidth / 1e9:.1f} GB/s; ceiling {ceiling:.1f} tok/s at batch 1 "
          f"({bytes_per_token / 1e9:.2f} GB per token)")
    print(f"{'path':<10}{'run':<18}{'tok/s':>10}{'of ceil':>9}{'disp/step':>11}{'enc ms':>9}{'gpu ms':>9}{'wall ms':>9}")
    for path, r in report["paths"].items():
        for name, v in r["results"].items():
            frac = f"{v['fraction_of_ceiling']:.0%}" if v.get("fraction_of_ceiling") is not None else ""
            gpu = f"{v['gpu_ms_per_step']:.2f}" if v.get("gpu_ms_per_step") is not None else "-"
            print(f"{path:<10}{name:<18}{v['tokens_per_s']:>10.1f}{frac:>9}{v['dispatches_per_step']:>11}"
                  f"{v['encode_ms_per_step']:>9.2f}{gpu:>9}{v['wall_ms_per_step']:>9.2f}")
    for tile, results in report.get("tile_sweep", {}).items():
        for name, v in results.items():
            gpu = f"{v['gpu_ms_per_step']:.2f}" if v.get("gpu_ms_per_step") is not None else "-"
            print(f"{tile:<34}{name:<18}{v['tokens_per_s']:>10.1f}{gpu:>9}{v['wall_ms_per_step']:>9.2f}")
    kernels = report.get("kernel_profile_batch_1", {})
    if kernels:
        print(f"\n{'kernel (workgroups)':<44}{'per step':>9}{'us/call':>10}{'ms/step':>10}")
        for name, v in kernels.items():
            print(f"{name:<44}{v['per_step']:>9}{v['us_per_call']:>10.1f}{v['ms_per_step']:>10.3f}")
        print(f"{'total':<44}{sum(v['per_step'] for v in kernels.values()):>9.0f}{'':>10}"
              f"{sum(v['ms_per_step'] for v in kernels.values()):>10.3f}")
    peer = report.get("peer_transformers_bf16", {})
    for mode in ("eager", "static_compiled"):
        for name, v in peer.get(mode, {}).items():
            print(f"{'hf ' + mode[:6]:<10}{name:<18}{v['tokens_per_s']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
