"""A random-weight LLaMA model whose rows are whole k-quant blocks (hidden 256, FFN 768), made
once per test session next to the fixtures' tokenizer, and the distance measures the
quantization tests hold each format to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"

# Bounds on the random model (hidden 256, 2 layers, logits of std ~1.2), CPU and GPU: KL mean,
# KL max, top-1 agreement. Measured: q8_0 0.001/0.002/0.92, q6_k 0.006/0.016/0.77,
# q5_0 0.036/0.072/0.58, q4_k 0.093/0.203/0.40, q4_k_m 0.087/0.195/0.31, q4_0 0.116/0.256/0.35.
BOUNDS = {
    "q8_0": (0.003, 0.008, 0.85),
    "q6_k": (0.015, 0.04, 0.65),
    "q5_0": (0.07, 0.15, 0.45),
    "q4_k": (0.18, 0.4, 0.25),
    "q4_k_m": (0.17, 0.4, 0.2),
    "q4_0": (0.22, 0.5, 0.25),
}


def make_random_llama(dest: Path, hidden: int = 256, ffn: int = 768, layers: int = 2, seed: int = 0) -> Path:
    """LlamaForCausalLM folder with gaussian weights scaled as trained models' are (rows of
    norm ~1.2, so logits spread over a few units), untied output, f16 storage."""
    src = FIXTURES / "llama-tiny"
    cfg = json.loads((src / "config.json").read_text())
    heads, kv_heads, vocab = 4, 2, cfg["vocab_size"]
    hd = hidden // heads
    cfg.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd, tie_word_embeddings=False)
    rng = np.random.default_rng(seed)

    def rand(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 1.2 / np.sqrt(cols)).astype(np.float16)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float16)

    t = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden), "model.norm.weight": norm()}
    for i in range(layers):
        p = f"model.layers.{i}"
        t.update({
            f"{p}.input_layernorm.weight": norm(),
            f"{p}.post_attention_layernorm.weight": norm(),
            f"{p}.self_attn.q_proj.weight": rand(heads * hd, hidden),
            f"{p}.self_attn.k_proj.weight": rand(kv_heads * hd, hidden),
            f"{p}.self_attn.v_proj.weight": rand(kv_heads * hd, hidden),
            f"{p}.self_attn.o_proj.weight": rand(hidden, heads * hd),
            f"{p}.mlp.gate_proj.weight": rand(ffn, hidden),
            f"{p}.mlp.up_proj.weight": rand(ffn, hidden),
            f"{p}.mlp.down_proj.weight": rand(hidden, ffn),
        })
    dest.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    return dest


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def kl_and_top1(reference: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """Per-position KL(reference || other) of the next-token distributions (max, mean) and the
    share of positions whose top-1 token agrees."""
    p, q = softmax(reference.astype(np.float64)), softmax(other.astype(np.float64))
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    return float(kl.max()), float(kl.mean()), float((reference.argmax(-1) == other.argmax(-1)).mean())
