"""The peer side of the CPU benchmark: llama.cpp on the same random-weight model.

Converts a Hugging Face LLaMA folder made by bench_engine.make_model to an F16 GGUF (`upg-batch
quantize`, upg_batch/quantize.py), quantizes it with llama.cpp's llama-quantize, then runs
llama-bench (prefill at 256 tokens, batch-1 decode) and llama-batched-bench (aggregate decode
at 1, 8, 32 parallel sequences) on every type. Optionally (--check) compares llama.cpp's logits
on the F16 file with our engine's, through a tiny C program built against libllama.

    python benches/peer_llama_cpp.py --shape smoke --llama-cpp /path/to/llama.cpp/build/bin --check

Files are cached next to the model folder: benches/models/<name>.gguf-<TYPE>.gguf.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = HERE / "models"

QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q4_K_S"]
BENCH_TYPES = ["F16", "Q8_0", "Q4_0", "Q4_K_S"]


# ----------------------------------------------------------------------------- paths, running


def default_bin() -> Path | None:
    v = os.environ.get("LLAMA_CPP_BIN")
    return Path(v) if v else None


def _env(bin_dir: Path) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(bin_dir) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


class ToolError(RuntimeError):
    def __init__(self, msg: str, returncode: int):
        super().__init__(msg)
        self.returncode = returncode


def _cpu_busy_s() -> float:
    """Seconds of CPU time (all cores, all processes) spent busy since boot, from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait_s: float, threshold_cores: float = 0.15, window_s: float = 1.0) -> float:
    """Wait until other work uses < threshold_cores of CPU over window_s (at most max_wait_s); seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        b = _cpu_busy_s()
        time.sleep(window_s)
        if (_cpu_busy_s() - b) / window_s < threshold_cores:
            break
    return round(time.perf_counter() - t0, 1)


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


WAIT_IDLE_S = 0.0  # set by main(): before each benchmark command, wait up to this long for an idle machine


def _run(cmd: list, bin_dir: Path, log: list | None = None, nice: int = 0, bench: bool = False) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    if log is not None:
        log.append(" ".join(cmd))
    waited = wait_idle(WAIT_IDLE_S) if bench and WAIT_IDLE_S > 0 else 0.0
    busy, mine, t = _cpu_busy_s(), _children_cpu_s(), time.perf_counter()
    p = subprocess.run(cmd, env=_env(bin_dir), capture_output=True, text=True)
    wall = time.perf_counter() - t
    # CPU that other processes used while this command ran, in cores: > ~0.1 means a contended figure.
    p.others_cores = round(max(0.0, (_cpu_busy_s() - busy) - (_children_cpu_s() - mine)) / max(wall, 1e-9), 2)
    p.waited_s = waited
    if p.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}", p.returncode)
    return p


def gguf_path(model_dir: Path, qtype: str) -> Path:
    model_dir = Path(model_dir)
    return model_dir.parent / f"{model_dir.name}.gguf-{qtype}.gguf"


# ----------------------------------------------------------------------------- conversion


def convert_to_gguf_f16(model_dir: Path, out: Path | None = None) -> Path:
    """Write model_dir (a Hugging Face folder) as an F16 GGUF with `upg-batch quantize`; cached."""
    from upg_batch.quantize import quantize as write_gguf

    out = Path(out) if out else gguf_path(Path(model_dir), "F16")
    if not out.exists():
        write_gguf(model_dir, out, "f16")
    return out


def quantize(f16: Path, model_dir: Path, qtype: str, bin_dir: Path, log: list | None = None, threads: int = 2) -> Path:
    out = gguf_path(model_dir, qtype)
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    _run([bin_dir / "llama-quantize", f16, tmp, qtype, threads], bin_dir, log, nice=10)
    tmp.rename(out)
    return out


def tensor_types(path: Path) -> dict:
    """{ggml type name: {"tensors": n, "bytes": b}} for a GGUF file."""
    from gguf import GGUFReader

    out: dict = {}
    for t in GGUFReader(str(path)).tensors:
        d = out.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0, "names": []})
        d["tensors"] += 1
        d["bytes"] += int(t.n_bytes)
        d["names"].append(t.name)
    for d in out.values():  # keep the report short: list names only for the odd ones out
        if d["tensors"] > 6:
            d["names"] = sorted({n.split(".", 2)[-1] if n.startswith("blk.") else n for n in d["names"]})
    return out


# ----------------------------------------------------------------------------- benchmarks


CONTENDED_CORES = 0.2  # other work above this during a measurement: run it again (at most RETRIES times)
RETRIES = 2


def _run_repack(cmd: list, off_flag: list, bin_dir: Path, log: list, nice: int, repack: str) -> tuple[subprocess.CompletedProcess, bool]:
    """Run with weight repacking on (llama.cpp's default), and again with it off if that dies of a signal.

    repack: "auto" (on, off after a crash), "on" or "off". Returns (process, repack used).
    A GGML_NATIVE build on a CPU that advertises AMX but cannot run its tile instructions (some
    VMs) crashes with SIGILL/SIGSEGV in the AMX repacked matmul as soon as a batch has > 1 token.
    A run during which other processes used the CPU is repeated, keeping the least disturbed one.
    """
    rp = repack != "off"
    if rp:
        try:
            p = _run(cmd, bin_dir, log, nice, bench=True)
        except ToolError as e:
            if repack == "on" or e.returncode >= 0:
                raise
            log.append(f"# ^ died of signal {-e.returncode}; again with {' '.join(off_flag)}")
            rp = False
    full = cmd if rp else cmd + off_flag
    if not rp:
        p = _run(full, bin_dir, log, nice, bench=True)
    for _ in range(RETRIES):
        if p.others_cores <= CONTENDED_CORES:
            break
        log.append(f"# ^ other work used {p.others_cores} cores meanwhile; again")
        q = _run(full, bin_dir, log, nice, bench=True)
        if q.others_cores < p.others_cores:
            p = q
    return p, rp


def llama_bench(path: Path, bin_dir: Path, threads: int, log: list, prefill: int = 256, gen: int = 16, nice: int = 10, repack: str = "auto") -> tuple[dict, dict]:
    """Prefill tok/s at `prefill` tokens and batch-1 decode tok/s over `gen` tokens (5 repetitions each).

    The two tests run as separate processes so that a crash of one (see _run_repack) keeps the other's figure.
    """
    res, build = {}, {}
    for key, p_, n_ in ((f"prefill_{prefill}", prefill, 0), ("decode_1", 0, gen)):
        cmd = [bin_dir / "llama-bench", "-m", path, "-t", threads, "-p", p_, "-n", n_, "-o", "json"]
        p, rp = _run_repack(cmd, ["--repack", "0"], bin_dir, log, nice, repack)
        for r in json.loads(p.stdout):
            if r.get("n_prompt") == p_ and r.get("n_gen") == n_:
                res[key] = round(r["avg_ts"], 2)
                res[f"{key}_stdev"] = round(r.get("stddev_ts", 0.0), 2)
                if r.get("samples_ts"):  # robust to a run preempted by other work on the machine
                    res[f"{key}_median"] = round(float(np.median(r["samples_ts"])), 2)
                res.setdefault("repack", {})[key] = rp
                res.setdefault("others_cores", {})[key] = p.others_cores
            build = {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size", "model_n_params", "type_k", "flash_attn")}
    return res, build


def _parse_batched(stdout: str) -> list[dict]:
    """Rows of llama-batched-bench: from its jsonl output, else from its markdown table."""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if rows:
        return rows
    header = None
    for line in stdout.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            vals = dict(zip(header, cells))
            rows.append({"pp": int(vals["PP"]), "tg": int(vals["TG"]), "pl": int(vals["B"]), "speed_tg": float(vals["S_TG t/s"]), "speed_pp": float(vals["S_PP t/s"])})
    return rows


def batched_bench(path: Path, bin_dir: Path, threads: int, log: list, npl=(1, 8, 32), npp: int = 16, ntg: int = 16, ctx: int = 2048, nice: int = 10, repack: str = "auto") -> dict:
    """Aggregate decode tok/s (S_TG) with npl sequences of npp prompt + ntg generated tokens each."""
    cmd = [bin_dir / "llama-batched-bench", "-m", path, "-t", threads, "-c", ctx, "-npp", npp, "-ntg", ntg,
           "-npl", ",".join(map(str, npl)), "--output-format", "jsonl"]
    p, rp = _run_repack(cmd, ["--no-repack"], bin_dir, log, nice, repack)
    res = {"repack": {"batched": rp}, "others_cores": {"batched": p.others_cores}}
    for r in _parse_batched(p.stdout):
        res[f"decode_{r['pl']}"] = round(float(r["speed_tg"]), 2)
    if any(f"decode_{n}" not in res for n in npl):
        res["batched_stdout"] = p.stdout[-3000:]
    return res


def llama_version(bin_dir: Path) -> str:
    p = subprocess.run([str(bin_dir / "llama-bench"), "--version"], env=_env(bin_dir), capture_output=True, text=True)
    return " / ".join(line.strip() for line in (p.stdout + p.stderr).splitlines() if line.strip())


# ----------------------------------------------------------------------------- correctness check

_C_LOGITS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"
static void quiet(enum ggml_log_level l, const char *t, void *u) { (void)l; (void)t; (void)u; }
/* logits MODEL OUT N_GEN THREADS tok... : writes float32 logits of every prompt position and of every
   generated step to OUT ([n_prompt + n_gen - 1, vocab]), prints the greedy tokens on stdout. */
int main(int argc, char **argv) {
    if (argc < 6) return 2;
    llama_log_set(quiet, NULL);
    llama_backend_init();
    int n_gen = atoi(argv[3]), n_threads = atoi(argv[4]), n = argc - 5;
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_threads = n_threads; cp.n_threads_batch = n_threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); return 1; }
    FILE *f = fopen(argv[2], "wb");
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = atoi(argv[5 + i]); b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    int pos = n;
    float *last = llama_get_logits_ith(ctx, n - 1);
    for (int g = 0; g < n_gen; g++) {
        int best = 0;
        for (int v = 1; v < n_vocab; v++) if (last[v] > last[best]) best = v;
        printf("%d\n", best);
        if (g == n_gen - 1) break;
        b.n_tokens = 1; b.token[0] = best; b.pos[0] = pos++; b.n_seq_id[0] = 1; b.seq_id[0][0] = 0; b.logits[0] = 1;
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
        last = llama_get_logits_ith(ctx, 0);
        fwrite(last, sizeof(float), n_vocab, f);
    }
    fclose(f);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def build_c_tool(bin_dir: Path, source: str, stem: str) -> Path | None:
    """Compile a C program against libllama (headers from the llama.cpp source tree); cached
    under the temp folder by the hash of the source and bin_dir. None when it cannot be built."""
    src_root = bin_dir.resolve().parent.parent
    incs = [src_root / "include", src_root / "ggml/include"]
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not all((d / "llama.h").exists() or (d / "ggml.h").exists() for d in incs) or not (bin_dir / "libllama.so").exists():
        return None
    out_dir = Path(tempfile.gettempdir()) / "peer_llama_cpp_tool"
    out_dir.mkdir(exist_ok=True)
    exe = out_dir / f"{stem}-{hashlib.sha1((str(bin_dir.resolve()) + source).encode()).hexdigest()[:12]}"
    if not exe.exists():
        src = out_dir / f"{exe.name}.c"
        src.write_text(source)
        cmd = ["nice", "-n", "10", cc, "-O1", "-o", str(exe), str(src)] + [f"-I{d}" for d in incs] + [
            f"-L{bin_dir}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{bin_dir.resolve()}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"could not build {stem}:\n{p.stderr[-2000:]}", file=sys.stderr)
            return None
    return exe


def _build_logits_tool(bin_dir: Path) -> Path | None:
    return build_c_tool(bin_dir, _C_LOGITS, "logits")


def check_conversion(model_dir: Path, f16: Path, bin_dir: Path, n_prompt: int = 12, n_gen: int = 4, threads: int = 2, log: list | None = None, gap_min: float = 0.01, rel_tol: float = 0.01) -> dict:
    """Our engine (f32 weights) against llama.cpp on the F16 GGUF: logits of every position and greedy tokens."""
    exe = _build_logits_tool(bin_dir)
    if exe is None:
        return {"done": False, "why": "no C compiler, llama.h or libllama.so: check skipped"}
    from upg_batch import Engine, SamplingParams

    eng = Engine(model_dir, weights="f32", threads=threads)
    vocab = eng.info["vocab"]
    rng = np.random.default_rng(7)
    prompt = [int(x) for x in rng.integers(3 + 256, vocab, n_prompt)]
    ours_gen = eng.generate([prompt], SamplingParams(max_tokens=n_gen, temperature=0.0, ignore_eos=True))[0].token_ids
    with tempfile.NamedTemporaryFile(suffix=".f32") as tf:
        cmd = [exe, f16, tf.name, n_gen, threads] + prompt
        p = _run(cmd, bin_dir, log, nice=10)
        theirs_gen = [int(x) for x in p.stdout.split()]
        theirs = np.fromfile(tf.name, dtype=np.float32).reshape(-1, vocab)
    # Our logits along llama.cpp's greedy path (so both are conditioned on the same tokens).
    path = prompt + theirs_gen[:-1]
    ours = eng.logits(path)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    top2 = np.sort(ours, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    decisive = gap > gap_min
    agree = ours.argmax(1) == theirs.argmax(1)
    scale = float(np.abs(ours).max())
    diff = np.abs(ours - theirs)
    gen_decisive = decisive[n_prompt - 1:]
    gen_agree = [a == b for a, b in zip(ours_gen, theirs_gen)]
    # Top-1 agreement is weak evidence on a random model (a Q/K permutation bug still agrees at
    # most positions); the logits themselves must match to within F16 rounding.
    close = float(diff.max()) <= rel_tol * scale
    ok = close and bool(np.all(agree[decisive])) and all(ag or not d for ag, d in zip(gen_agree, gen_decisive))
    return {
        "done": True,
        "ok": ok,
        "prompt": prompt,
        "greedy_ours": list(ours_gen),
        "greedy_llama_cpp": theirs_gen,
        "positions": int(len(ours)),
        "top1_agree": int(agree.sum()),
        "decisive_positions": int(decisive.sum()),
        "decisive_agree": int(agree[decisive].sum()),
        "logits_close": close,
        "max_abs_logit_diff": round(float(diff.max()), 5),
        "mean_abs_logit_diff": round(float(diff.mean()), 6),
        "max_abs_logit": round(scale, 4),
        "corr": round(float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]), 6),
    }


# ----------------------------------------------------------------------------- driver


def run(model_dir: Path, bin_dir: Path, threads: int = 2, types=BENCH_TYPES, check: bool = False, bench: bool = True, repack: str = "auto", wait_idle_s: float | None = None) -> dict:
    global WAIT_IDLE_S
    if wait_idle_s is not None:
        WAIT_IDLE_S = wait_idle_s
    model_dir, bin_dir = Path(model_dir), Path(bin_dir)
    commands: list[str] = []
    timings: dict = {}
    t = time.perf_counter()
    f16 = convert_to_gguf_f16(model_dir)
    timings["convert_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    files = {"F16": f16}
    for q in QUANT_TYPES:
        files[q] = quantize(f16, model_dir, q, bin_dir, commands, threads)
    timings["quantize_s"] = round(time.perf_counter() - t, 2)
    report: dict = {"model": str(model_dir), "threads": threads, "llama_cpp_bin": str(bin_dir), "llama_cpp_version": llama_version(bin_dir)}
    report["tensor_types"] = {q: tensor_types(p) for q, p in files.items()}
    report["files"] = {q: str(p) for q, p in files.items()}
    if check:
        t = time.perf_counter()
        try:
            report["check"] = check_conversion(model_dir, f16, bin_dir, threads=threads, log=commands)
        except Exception as e:  # the check must not cost the benchmark
            report["check"] = {"done": False, "why": f"{type(e).__name__}: {e}"}
        timings["check_s"] = round(time.perf_counter() - t, 2)
    if bench:
        results = {}
        build: dict = {}
        for q in types:
            t = time.perf_counter()
            r, build = llama_bench(files[q], bin_dir, threads, commands, repack=repack)
            b = batched_bench(files[q], bin_dir, threads, commands, repack=repack)
            r.setdefault("repack", {}).update(b.pop("repack"))
            r.setdefault("others_cores", {}).update(b.pop("others_cores"))
            r.update(b)
            r["file_bytes"] = files[q].stat().st_size
            results[q] = r
            timings[f"bench_{q}_s"] = round(time.perf_counter() - t, 2)
        report["results"] = results
        report["build"] = build
        report["load_average"] = os.getloadavg()
    report["timings"] = timings
    report["commands"] = commands
    return report


def main() -> int:
    sys.path.insert(0, str(HERE))
    from bench_engine import SHAPES, make_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smoke", choices=sorted(SHAPES))
    ap.add_argument("--model", type=Path, help="a model folder instead of benches/models/<shape>-float16")
    ap.add_argument("--llama-cpp", type=Path, default=default_bin(), help="llama.cpp build/bin folder (env LLAMA_CPP_BIN)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(BENCH_TYPES))
    ap.add_argument("--check", action="store_true", help="compare llama.cpp's logits on the F16 file with our engine's")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--repack", default="auto", choices=["auto", "on", "off"],
                    help="llama.cpp weight repacking: on (its default), off, or auto: on, off for a run that crashes")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each benchmark command wait up to this many seconds for other CPU use to stop (0: don't)")
    args = ap.parse_args()
    if args.llama_cpp is None:
        ap.error("--llama-cpp DIR (or env LLAMA_CPP_BIN) is required")
    model_dir = args.model or MODELS / f"{args.shape}-float16"
    if not model_dir.exists():
        print(f"creating {model_dir} ...", file=sys.stderr)
        make_model(args.shape, model_dir, "float16")
    report = run(model_dir, args.llama_cpp, args.threads, args.types.split(","), args.check, not args.no_bench, args.repack, args.wait_idle)
    print(json.dumps(report, indent=2))
    if "results" in report:
        print("\nllama-bench figures: median of its 5 repetitions; decode_8/32: llama-batched-bench S_TG; "
              "see results[type]['repack'] and ['others_cores'] for how each was measured")
        print(f"{'type':<8}{'MiB':>9}{'prefill_256':>13}{'decode_1':>10}{'decode_8':>10}{'decode_32':>11}")
        for q, r in report["results"].items():
            print(f"{q:<8}{r['file_bytes'] / 2**20:>9.1f}{r.get('prefill_256_median', 0):>13.1f}{r.get('decode_1_median', 0):>10.1f}"
                  f"{r.get('decode_8', 0):>10.1f}{r.get('decode_32', 0):>11.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report.get("check", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
