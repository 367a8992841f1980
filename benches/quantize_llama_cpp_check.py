"""`upg-batch quantize` against llama.cpp, run by hand (CI has no llama.cpp).

Writes each model folder as GGUF at each format with upg_batch.quantize, then has llama.cpp
(through libllama, a small C program compiled here) load every file, tokenize a few texts
(special tokens, whitespace, non-ASCII) and compute the logits of a prompt and of 4 greedy steps.
Reported per file: whether llama.cpp loads it, whether its token ids equal the engine's on the
same file, and how far its logits are from the engine's on the same file (max |diff| over the
largest logit, top-1 agreement, greedy tokens). For a model without f16 fallbacks, the q4_k_m
file's tensor types are also compared with those llama.cpp's llama-quantize gives the f16 file
at Q4_K_M, and the tensors whose bytes are identical are counted.

    python benches/quantize_llama_cpp_check.py --llama-cpp /path/to/llama.cpp/build/bin [MODEL_DIR ...]

Models by default: the three test fixtures, and a random Llama 256 wide (tests/quant_models.py)
whose rows are whole k-quant blocks. Weight repacking is off in the C program: on the VM of
docs/benchmarks.md llama.cpp's repacked (AMX) kernels crash on batches of more than one token.
Writes benches/results/quantize-llama-cpp-check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from peer_llama_cpp import build_c_tool, llama_version  # noqa: E402

FORMATS = ["f16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k", "q4_k_m", "bf16", "f32"]
TEXTS = [
    "hello world, once upon a time there was",
    "The quick brown fox jumps over 12345 lazy dogs!",
    "<|bos|>start and end<|eos|>",
    "  spaces\tand\nnew lines  ",
    "café naïve 日本 🙂",
    "it's we'll they're",
]

_C_TOOL = r"""
/* tool MODEL tok TEXT: token ids (add_special, parse_special), then add_bos add_eos.
   tool MODEL logits OUT N_GEN THREADS tok...: float32 logits of every prompt position and
   every greedy step to OUT, the greedy tokens on stdout. Weight repacking off. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"
static void quiet(enum ggml_log_level l, const char *t, void *u) { (void)l; (void)t; (void)u; }
int main(int argc, char **argv) {
    if (argc < 4) return 2;
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.use_extra_bufts = false;
    int tok = strcmp(argv[2], "tok") == 0;
    mp.vocab_only = tok;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    const struct llama_vocab *v = llama_model_get_vocab(model);
    if (tok) {
        static llama_token ids[8192];
        int n = llama_tokenize(v, argv[3], (int)strlen(argv[3]), ids, 8192, true, true);
        for (int i = 0; i < n; i++) printf("%d ", ids[i]);
        printf("\n%d %d\n", llama_vocab_get_add_bos(v), llama_vocab_get_add_eos(v));
        return 0;
    }
    if (argc < 7) return 2;
    int n_gen = atoi(argv[4]), n_threads = atoi(argv[5]), n = argc - 6;
    int n_vocab = llama_vocab_n_tokens(v);
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_threads = n_threads; cp.n_threads_batch = n_threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); return 1; }
    FILE *f = fopen(argv[3], "wb");
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = atoi(argv[6 + i]); b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    int pos = n;
    float *last = llama_get_logits_ith(ctx, n - 1);
    for (int g = 0; g < n_gen; g++) {
        int best = 0;
        for (int t = 1; t < n_vocab; t++) if (last[t] > last[best]) best = t;
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


def check_file(tool: Path, bin_dir: Path, path: Path, threads: int) -> dict:
    from upg_batch import Engine

    env = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    eng = Engine(path, threads=threads)
    out: dict = {"file": path.name, "bytes": path.stat().st_size}
    tok_agree = 0
    for text in TEXTS:
        p = subprocess.run([str(tool), str(path), "tok", text], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            return {**out, "loads": False, "why": f"tokenize: exit {p.returncode} {p.stderr.strip()[-300:]}"}
        ids_line, flags = p.stdout.split("\n")[:2]
        tok_agree += [int(x) for x in ids_line.split()] == eng.tokenize(text)
        out["llama_cpp_add_bos_eos"] = [int(x) for x in flags.split()]
    out["tokenize_agree"] = f"{tok_agree}/{len(TEXTS)}"
    prompt = eng.tokenize(TEXTS[0])
    with tempfile.NamedTemporaryFile(suffix=".f32") as tf:
        p = subprocess.run([str(tool), str(path), "logits", tf.name, "4", str(threads)] + [str(i) for i in prompt], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            return {**out, "loads": False, "why": f"logits: exit {p.returncode} {p.stderr.strip()[-300:]}"}
        theirs = np.fromfile(tf.name, dtype=np.float32).reshape(-1, eng.info["vocab"])
    theirs_gen = [int(x) for x in p.stdout.split()]
    ours = np.asarray(eng.logits(prompt + theirs_gen[:-1]))
    from upg_batch import SamplingParams

    ours_gen = eng.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0].token_ids
    return {
        **out,
        "loads": True,
        "positions": int(len(ours)),
        "max_abs_diff_over_max_logit": float(f"{np.abs(ours - theirs).max() / np.abs(ours).max():.3g}"),
        "top1_agree": f"{int((ours.argmax(1) == theirs.argmax(1)).sum())}/{len(ours)}",
        "greedy_engine": list(ours_gen),
        "greedy_llama_cpp": theirs_gen,
    }


def compare_with_llama_quantize(bin_dir: Path, f16: Path, ours: Path) -> dict:
    from gguf import GGUFReader

    theirs = ours.with_name(ours.stem + "-llama-quantize.gguf")
    p = subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(theirs), "Q4_K_M", "2"], env=dict(os.environ, LD_LIBRARY_PATH=str(bin_dir)), capture_output=True, text=True)
    if p.returncode != 0:
        return {"done": False, "why": p.stderr.strip()[-300:]}
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    differ = sorted(n for n in a.keys() | b.keys() if n not in a or n not in b or a[n].tensor_type != b[n].tensor_type)
    same_bytes = [n for n in a if n in b and np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))]
    return {"done": True, "types_differ": differ, "byte_identical": f"{len(same_bytes)}/{len(a)}", "bytes_differ": sorted(set(a) - set(same_bytes))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", type=Path, help="Hugging Face model folders (default: the fixtures and a random 256-wide Llama)")
    ap.add_argument("--llama-cpp", type=Path, required=True, metavar="BIN", help="llama.cpp's build/bin (libllama.so)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quantize-llama-cpp-check.json")
    args = ap.parse_args()
    from upg_batch.quantize import quantize

    tool = build_c_tool(args.llama_cpp, _C_TOOL, "quantize-check")
    if tool is None:
        print("cannot build the libllama tool (compiler, llama.h or libllama.so missing)", file=sys.stderr)
        return 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = list(args.models)
        if not models:
            from quant_models import make_random_llama

            models = [ROOT / "tests" / "fixtures" / "models" / n for n in ("llama-tiny", "llama3-tiny", "qwen2-tiny")]
            models.append(make_random_llama(Path(tmp) / "random-256"))
        for model in models:
            for fmt in args.formats.split(","):
                path = Path(tmp) / f"{model.name}-{fmt}.gguf"
                summary = quantize(model, path, fmt)
                r = {"model": model.name, "format": fmt, "types": summary.types, **check_file(tool, args.llama_cpp, path, args.threads)}
                if fmt == "q4_k_m" and not summary.fallbacks and "f16" in args.formats.split(","):
                    r["llama_quantize_q4_k_m"] = compare_with_llama_quantize(args.llama_cpp, Path(tmp) / f"{model.name}-f16.gguf", path)
                results.append(r)
                print(json.dumps(r))
    report = {"llama_cpp": llama_version(args.llama_cpp), "texts": TEXTS, "results": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    bad = [r for r in results if not r["loads"] or r["tokenize_agree"] != f"{len(TEXTS)}/{len(TEXTS)}"]
    print(f"{len(results) - len(bad)}/{len(results)} files load in llama.cpp and tokenize as the engine does; report in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
