"""The VNNI kernel families (int8 products of block formats with `vpdpbusd`, on 256-bit or
512-bit registers) against the plain AVX2 family on the same processor, forced in turn with UPG_BATCH_SIMD: both
take exact integer sums, so logits and greedy tokens must be bit-identical for every block
format, batched or alone. The kernel choice is made once per process, so each family runs in
its own subprocess. On a processor without VNNI (or without AVX2) the test is skipped and says
which path it could run; the families it compared are printed (`pytest -s` shows them)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from quant_models import make_random_llama

FORMATS = ("q8_0", "q4_0", "q5_0", "q4_k", "q6_k")
AVX2 = "avx2+fma+f16c"
# UPG_BATCH_SIMD value -> (the /proc/cpuinfo flags it needs, the name info["simd"] reports)
VNNI = {
    "avx-vnni": (("avx2", "fma", "f16c", "avx_vnni"), AVX2 + "+avx-vnni"),
    "avx512-vnni": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"), AVX2 + "+avx512-vnni"),
    "avx512-vnni-zmm": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"), AVX2 + "+avx512-vnni-zmm"),
}

CHECK = r"""
import json, sys
import numpy as np
from upg_batch import Engine, SamplingParams

model, formats = sys.argv[1], sys.argv[2].split(",")
texts = ["Once upon a time there was a little robot", "The quick brown fox jumps over the lazy dog and runs", "Hi"]
params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
out = {}
for fmt in formats:
    eng = Engine(model, weights=fmt, max_batch=4)
    prompts = [eng.tokenize(t) for t in texts]
    logits = [eng.logits(p).astype(np.float32).tobytes().hex() for p in prompts]
    batched = [c.token_ids for c in eng.generate(prompts, params)]
    alone = [eng.generate([p], params)[0].token_ids for p in prompts]
    out[fmt] = {"logits": logits, "batched": batched, "alone": alone, "simd": eng.info["simd"]}
print(json.dumps(out))
"""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def run_family(simd: str, model: Path) -> dict:
    env = dict(os.environ, UPG_BATCH_SIMD=simd)
    proc = subprocess.run([sys.executable, "-c", CHECK, str(model), ",".join(FORMATS)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_vnni_families_give_the_avx2_bits(tmp_path: Path) -> None:
    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip(f"no AVX2 on this processor ({platform.machine()}): neither family runs here")
    families = [name for name, (needs, _) in VNNI.items() if set(needs) <= flags]
    if not families:
        pytest.skip("no AVX-VNNI or AVX-512 VNNI on this processor: only the AVX2 path runs here")
    model = make_random_llama(tmp_path / "random-256")
    want = run_family("avx2", model)
    for fmt in FORMATS:
        assert want[fmt]["simd"] == AVX2
        assert want[fmt]["batched"] == want[fmt]["alone"], fmt
    for family in families:
        got = run_family(family, model)
        for fmt in FORMATS:
            assert got[fmt]["simd"] == VNNI[family][1], (family, got[fmt]["simd"])
            assert got[fmt]["logits"] == want[fmt]["logits"], (family, fmt)
            assert got[fmt]["batched"] == want[fmt]["batched"] == got[fmt]["alone"], (family, fmt)
    print(f"compared {', '.join(VNNI[f][1] for f in families)} against {AVX2} bit for bit on {', '.join(FORMATS)}")
