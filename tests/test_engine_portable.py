"""The plain-Rust kernels (the path Apple Silicon and other non-AVX2 processors run) against
the reference fixtures, forced on this machine with UPG_BATCH_SIMD=portable. The kernel
choice is made once per process, so the check runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

CHECK = r"""
import json, sys
import numpy as np
from safetensors.numpy import load_file
from upg_batch import Engine, SamplingParams

fixtures, name = sys.argv[1], sys.argv[2]
out = {}
for weights in ("f32", "f16"):
    eng = Engine(f"{fixtures}/models/{name}", weights=weights, max_batch=4)
    golden = json.load(open(f"{fixtures}/golden/{name}.json"))["cases"]
    ref = load_file(f"{fixtures}/golden/{name}.prefill_logits.safetensors")
    errs = []
    for i, case in enumerate(golden):
        got = eng.logits(case["prompt_ids"])
        want = ref[f"prefill_logits_{i}"]
        errs.append(float(np.abs(got - want).max() / np.abs(want).max()))
    prompts = [c["prompt_ids"] for c in golden]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    batched = [c.token_ids for c in eng.generate(prompts, params)]
    alone = [eng.generate([p], params)[0].token_ids for p in prompts]
    out[weights] = {"errs": errs, "batched": batched, "alone": alone, "simd": eng.info["simd"]}
print(json.dumps(out))
"""


def run_portable(name: str) -> dict:
    env = dict(os.environ, UPG_BATCH_SIMD="portable")
    proc = subprocess.run([sys.executable, "-c", CHECK, str(FIXTURES), name], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_portable_kernels_match_the_reference_and_stay_batch_invariant() -> None:
    for name in ("llama-tiny", "qwen2-tiny", "llama3-tiny"):
        result = run_portable(name)
        golden = json.loads((FIXTURES / "golden" / f"{name}.json").read_text())["cases"]
        for weights, r in result.items():
            assert r["simd"] == "portable"
            # f32 weights: the fixtures' bound; f16 weights: rounding of the weights themselves
            bound = 1e-4 if weights == "f32" else 5e-3
            assert max(r["errs"]) < bound, (name, weights, r["errs"])
            assert r["batched"] == r["alone"], (name, weights)
            if weights == "f32":
                for case, tokens in zip(golden, r["alone"]):
                    stop = next((i for i, m in enumerate(case["step_margin"]) if m < 1e-3), len(tokens))
                    assert tokens[:stop] == case["greedy_ids"][:stop], (name, case["prompt"])
