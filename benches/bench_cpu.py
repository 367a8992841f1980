"""The CPU engine beside llama.cpp, for every shape and weight format, in one command.

For each shape (default: the TinyLlama-1.1B shape and a ~110M shape) this measures the
machine's read bandwidth and f32 multiply-add peak, runs `bench_engine.py` for each format
(decode tokens/s at batch 1, 8 and 32, prefill tokens/s, batch 1 as a fraction of its
bandwidth ceiling) and, with `--llama-cpp`, `peer_llama_cpp.py` on a GGUF of the same shape
quantized by llama.cpp's own `llama-quantize`; then prints one table per shape with the
ratios to the peer's same format (q4_k against llama.cpp's Q4_K_S).

    python benches/bench_cpu.py --llama-cpp /path/to/llama.cpp/build/bin --json benches/results/cpu-both-shapes.json

Each run is its own process (a fresh engine, nothing shared). The peer is built outside the
repository (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_TYPE = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_S"}
COLUMNS = (("decode_batch_1", "decode_1_median"), ("decode_batch_8", "decode_8"), ("decode_batch_32", "decode_32"),
           ("prefill", "prefill_256_median"))


def run_json(script: str, *args: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tinyllama-1.1b,llama-110m")
    ap.add_argument("--formats", default="f16,q8_0,q4_0,q4_k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp build/bin folder; without it the peer is not run")
    ap.add_argument("--json", type=Path, help="also write the whole report here")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from upg_batch import _native

    formats = args.formats.split(",")
    report: dict[str, Any] = {
        "threads": args.threads,
        "read_bandwidth_GBps": round(_native.measure_read_bandwidth(1 << 30, args.threads, 5) / 1e9, 2),
        "fma_peak_GFLOPs": round(_native.measure_fma_peak(args.threads) / 1e9, 1),
        "shapes": {},
    }
    for shape in args.shapes.split(","):
        ours = {f: run_json("bench_engine.py", "--shape", shape, "--weights", f, "--threads", str(args.threads)) for f in formats}
        peer = None
        if args.llama_cpp:
            types = ",".join(PEER_TYPE[f] for f in formats if f in PEER_TYPE)
            peer = run_json("peer_llama_cpp.py", "--shape", shape, "--llama-cpp", str(args.llama_cpp), "--threads", str(args.threads),
                            "--types", types)
        report["shapes"][shape] = {"engine": ours, "llama_cpp": peer}

    print(f"read bandwidth {report['read_bandwidth_GBps']} GB/s, f32 FMA peak {report['fma_peak_GFLOPs']} GFLOP/s "
          f"({args.threads} threads)")
    for shape, r in report["shapes"].items():
        print(f"\n{shape}: tok/s (ours / llama.cpp's same format = ratio)")
        print(f"{'format':<8}{'of ceiling':>11}" + "".join(f"{c:>26}" for c, _ in COLUMNS))
        for f, e in r["engine"].items():
            res = e["results"]
            peer_res = ((r["llama_cpp"] or {}).get("results") or {}).get(PEER_TYPE.get(f, ""), {})
            cells = []
            for ours_key, peer_key in COLUMNS:
                mine = res.get(ours_key, {}).get("tokens_per_s")
                theirs = peer_res.get(peer_key)
                cell = f"{mine:.1f}" if mine is not None else "-"
                if mine is not None and theirs:
                    cell += f" / {theirs:.1f} = {mine / theirs:.2f}x"
                cells.append(f"{cell:>26}")
            frac = res.get("decode_batch_1", {}).get("fraction_of_ceiling")
            print(f"{f:<8}{(f'{frac:.0%}' if frac is not None else '-'):>11}" + "".join(cells))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
