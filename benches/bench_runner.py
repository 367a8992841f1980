"""Runner overhead: a job's tokens/s on one node against the engine's raw tokens/s.

Both sides generate the same completions for the same prompts with the same settings
(greedy, the engine is deterministic): the engine directly, with one `generate` call over all
prompts; and a whole `upg-batch run` on a local one-node Ray (Parquet in, shards, actor,
Arrow commit with fsync, manifest). The job's rate counts from the first shard dispatched to
the last commit (Ray start and model load are reported separately, in wall time). Prints JSON
and a table; the target is a ratio >= 0.95.

With --vary-lengths every row gets its own max_tokens (1 to --max-tokens, as completions of
real data end at different lengths), which is where a batch that drains at each shard's end
costs most; UPG_BATCH_ACTOR_SHARDS_AT_ONCE=1 makes the actor run its queued shards one after
another instead of at once (the behaviour before the streaming scheduler), to compare.

    python benches/bench_runner.py --shape llama-110m --weights f32 --threads 2
    python benches/bench_runner.py --vary-lengths --max-tokens 64 --shard-rows 32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _bench_engine():
    """benches/bench_engine.py: its random-weight model shapes and machine description."""
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "benches" / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _prompts(n: int) -> list[str]:
    subjects = ["rivers", "clocks", "bread", "glass", "trains", "bees", "copper", "snow"]
    return [f"Item {i}: write three sentences about {subjects[i % len(subjects)]} and the number {i}." for i in range(n)]


def _max_tokens(n: int, args: argparse.Namespace) -> list[int]:
    """Each row's max_tokens: all --max-tokens, or (--vary-lengths) spread over 1..max."""
    if not args.vary_lengths:
        return [args.max_tokens] * n
    return [1 + (i * 37) % args.max_tokens for i in range(n)]


def raw_engine(model: Path, prompts: list[str], args: argparse.Namespace) -> dict:
    from upg_batch import Engine, SamplingParams

    eng = Engine(model, weights=args.weights, threads=args.threads, max_batch=args.max_batch)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in _max_tokens(len(prompts), args)]
    eng.generate([eng.tokenize("warm up")], SamplingParams(max_tokens=2, temperature=0.0))
    ids = [eng.tokenize(p) for p in prompts]  # the runner tokenizes outside generate too
    t = time.perf_counter()
    out = eng.generate(ids, params)
    elapsed = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for c in out)
    return {"completion_tokens": tokens, "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2)}


def runner_job(model: Path, prompts: list[str], work: Path, args: argparse.Namespace) -> dict:
    import ray

    from upg_batch.config import load_config
    from upg_batch.runner import Runner

    columns = {"id": list(range(len(prompts))), "prompt": prompts}
    if args.vary_lengths:
        columns["max_tokens"] = _max_tokens(len(prompts), args)
    pq.write_table(pa.table(columns), work / "prompts.parquet")
    job = {
        "model": {"path": str(model), "weights": args.weights, "threads": args.threads, "max_batch": args.max_batch},
        "input": {"path": "prompts.parquet", "id_column": "id", "shard_rows": args.shard_rows},
        "output": {"path": "out"},
        "sampling": {"max_tokens": args.max_tokens, "temperature": 0.0},
        "cluster": {"address": None},
        "metrics": {"port": 0},
        "progress": {"bar": "off", "log_interval_s": 3600},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    try:
        s = Runner(load_config(work / "job.yaml")).run()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return {
        "completion_tokens": s["completion_tokens"],
        "seconds": s["processing_s"],
        "tokens_per_s": round(s["tokens_per_s"], 2),
        "wall_s_with_ray_start_and_model_load": s["wall_s"],
        "shards": s["shards_total"],
        "rows_error": s["rows_error"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-110m", help="a shape of benches/bench_engine.py")
    ap.add_argument("--weights", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--shard-rows", type=int, default=64)
    ap.add_argument("--vary-lengths", action="store_true", help="per-row max_tokens from 1 to --max-tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    be = _bench_engine()
    stored = "float32" if args.weights == "f32" else "float16"
    model = ROOT / "benches" / "models" / f"{args.shape}-{stored}"
    if not model.exists():
        print(f"creating {model} ...", file=sys.stderr)
        be.make_model(args.shape, model, stored)
    prompts = _prompts(args.rows)

    raw = raw_engine(model, prompts, args)
    work = Path(tempfile.mkdtemp(prefix="bench-runner-"))
    try:
        job = runner_job(model, prompts, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = job["tokens_per_s"] / raw["tokens_per_s"]
    result = {
        "benchmark": "runner_overhead",
        "machine": be.machine(),
        "shape": args.shape,
        "weights": args.weights,
        "threads": args.threads,
        "rows": args.rows,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "shard_rows": args.shard_rows,
        "vary_lengths": args.vary_lengths,
        "actor_shards_at_once": int(os.environ.get("UPG_BATCH_ACTOR_SHARDS_AT_ONCE", "8") or 8),
        "engine": raw,
        "job": job,
        "job_over_engine": round(ratio, 3),
        "target": 0.95,
        "same_tokens": raw["completion_tokens"] == job["completion_tokens"],
    }
    print(json.dumps(result, indent=1))
    print()
    print(f"{'':24}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'engine.generate (raw)':24}{raw['completion_tokens']:>10}{raw['seconds']:>10.2f}{raw['tokens_per_s']:>12.2f}")
    print(f"{'upg-batch run (1 node)':24}{job['completion_tokens']:>10}{job['seconds']:>10.2f}{job['tokens_per_s']:>12.2f}")
    print(f"job / engine: {ratio:.3f} (target >= 0.95); job wall time with Ray start and model load: {job['wall_s_with_ray_start_and_model_load']:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
