"""`upg-batch quantize`: a model folder written as one GGUF file computes what the folder
computes. The writer converts weights with the engine's own code in the format the engine's
`weights=` rules pick (f16 where rows are not whole blocks), so a GGUF file loaded with its
stored formats gives the logits of the folder loaded with `weights=FMT`: bit for bit, except
Llama 3 rope scaling, which GGUF stores as f32 factors (one divisor per rotary pair) where the
folder computes the scaled frequencies in f64 (measured 3.6e-7 of the largest logit; tested
below 1e-5). Also: the golden reference, the accuracy bounds of each block format, the
tokenizer, the file as the `gguf` package reads it, and the command line."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType, TokenType
from safetensors.numpy import load_file, save_file

from quant_models import BOUNDS, kl_and_top1, make_random_llama
from upg_batch import Engine, SamplingParams, _native
from upg_batch.quantize import FORMATS, QuantizeError, quantize

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = ["llama-tiny", "llama3-tiny", "qwen2-tiny"]
PROMPT = "Once upon a time there was a little robot who lived in a small town by the sea and every day"
# GGUF's f32 rope factors against the folder's f64 Llama 3 frequencies (see above).
ROPE_FACTORS_REL = 1e-5
# The golden reference (transformers in f64 on the stored weights) against f16 weights: the
# bound tests/test_engine_golden.py holds the folder at f16 to; 1e-4 (its f32 bound) where the
# checkpoint already stores f16.
GOLDEN_F16 = {"llama-tiny": 5e-3, "llama3-tiny": 1e-4, "qwen2-tiny": 5e-3}
TEXTS = [
    PROMPT,
    "hello world, once upon a time",
    "<|bos|>start and end<|eos|>",
    "  spaces\tand\nnew lines  ",
    "café naïve 日本語 🙂 12345 it's we'll",
    "",
]


@functools.cache
def golden(name: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    cases = json.loads((FIXTURES / "golden" / f"{name}.json").read_text())["cases"]
    return cases, load_file(FIXTURES / "golden" / f"{name}.prefill_logits.safetensors")


@functools.cache
def folder(name: str, weights: str) -> Engine:
    return Engine(FIXTURES / "models" / name, weights=weights)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def written(out_dir: Path, name: str, fmt: str, src: Path | None = None) -> Path:
    """The fixture `name` (or the folder `src`) quantized to `fmt`, once per module."""
    out = out_dir / f"{name}-{fmt}.gguf"
    if not out.exists():
        quantize(src or FIXTURES / "models" / name, out, fmt)
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def assert_same_logits(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if name == "llama3-tiny":
        assert rel(got, want) < ROPE_FACTORS_REL, f"{name}: {rel(got, want):.2e}"
        assert np.array_equal(got.argmax(-1), want.argmax(-1))
    else:
        assert np.array_equal(got, want), f"{name}: max difference {np.abs(got - want).max()}"


@pytest.mark.parametrize("name", MODELS)
def test_f16_gguf_gives_the_folders_f16_logits_and_the_golden_ones(gguf_dir: Path, name: str) -> None:
    g = Engine(written(gguf_dir, name, "f16"), backend="cpu")
    assert g.info["weights"] == "stored" and g.info["architecture"] == folder(name, "f16").info["architecture"]
    assert (g.info["eos_token_ids"], g.info["bos_token_id"]) == ([1], 0)
    cases, reference = golden(name)
    for i, case in enumerate(cases):
        ids = case["prompt_ids"]
        assert g.tokenize(case["prompt"]) == ids
        got = np.asarray(g.logits(ids))
        assert_same_logits(name, got, np.asarray(folder(name, "f16").logits(ids)))
        assert rel(got, reference[f"prefill_logits_{i}"]) < GOLDEN_F16[name], f"{name} case {i}"
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ids = cases[0]["prompt_ids"]
    assert g.generate([ids], greedy)[0].token_ids == folder(name, "f16").generate([ids], greedy)[0].token_ids


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "f16"])
def test_every_format_gives_the_logits_of_the_folder_loaded_in_it(gguf_dir: Path, name: str, fmt: str) -> None:
    # Llama 3's rope factors differ in the last f32 bit between the two (see ROPE_FACTORS_REL);
    # int8 activations would round such a difference to a whole quantization step somewhere,
    # so that model's block formats are compared with f32 activations.
    acts = "f32" if name == "llama3-tiny" and fmt not in ("f32", "f16", "bf16") else None
    g = Engine(written(gguf_dir, name, fmt), activations=acts)
    f = Engine(FIXTURES / "models" / name, weights=fmt, activations=acts)
    ids = f.tokenize(PROMPT)
    assert_same_logits(name, np.asarray(g.logits(ids)), np.asarray(f.logits(ids)))


def test_the_f32_gguf_matches_the_golden_reference(gguf_dir: Path) -> None:
    g = Engine(written(gguf_dir, "llama-tiny", "f32"))
    cases, reference = golden("llama-tiny")
    for i, case in enumerate(cases):
        assert rel(np.asarray(g.logits(case["prompt_ids"])), reference[f"prefill_logits_{i}"]) < 1e-4


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 256, FFN 768: every row is whole k-quant blocks, nothing falls back
    return make_random_llama(tmp_path_factory.mktemp("models") / "random-256")


@pytest.mark.parametrize("fmt", list(BOUNDS))
def test_block_formats_are_the_folders_and_hold_their_bounds(gguf_dir: Path, random_model: Path, fmt: str) -> None:
    path = written(gguf_dir, "random-256", fmt, random_model)
    g, f = Engine(path), Engine(random_model, weights=fmt)
    assert f.info["weight_fallbacks"] == []
    ids = f.tokenize(PROMPT)
    got = np.asarray(g.logits(ids))
    assert np.array_equal(got, np.asarray(f.logits(ids)))
    kl_max, kl_mean, top1 = kl_and_top1(np.asarray(Engine(random_model, weights="f32").logits(ids)), got)
    mean_bound, max_bound, top1_bound = BOUNDS[fmt]
    assert kl_mean < mean_bound and kl_max < max_bound and top1 >= top1_bound, f"{fmt}: KL mean {kl_mean:.4f} max {kl_max:.4f} top-1 {top1:.2f}"


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def field(reader: GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_q4_k_m_writes_llama_cpps_mix(gguf_dir: Path, random_model: Path) -> None:
    path = written(gguf_dir, "random-256", "q4_k_m", random_model)
    types = tensor_types(path)
    # 2 layers: llama.cpp's rule widens the output and layer 1's attn_v and ffn_down to Q6_K
    wide = {"output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    assert {n for n, t in types.items() if t == "Q6_K"} == wide
    assert {n for n, t in types.items() if t == "F32"} == {"output_norm.weight"} | {f"blk.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "ffn")}
    assert all(t == "Q4_K" for n, t in types.items() if n not in wide and not n.endswith("_norm.weight"))
    assert field(GGUFReader(path), "general.file_type") == LlamaFileType.MOSTLY_Q4_K_M


@pytest.mark.parametrize("name,fmt", [("llama-tiny", "q8_0"), ("llama3-tiny", "f16"), ("qwen2-tiny", "q4_k")])
def test_the_gguf_package_reads_the_file(gguf_dir: Path, name: str, fmt: str) -> None:
    path = written(gguf_dir, name, fmt)
    r = GGUFReader(path)
    cfg = json.loads((FIXTURES / "models" / name / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]]
    assert field(r, "general.architecture") == arch
    assert field(r, "general.file_type") == {"q8_0": LlamaFileType.MOSTLY_Q8_0, "f16": LlamaFileType.MOSTLY_F16, "q4_k": LlamaFileType.MOSTLY_Q4_K_S}[fmt]
    assert field(r, f"{arch}.block_count") == cfg["num_hidden_layers"]
    assert field(r, f"{arch}.embedding_length") == cfg["hidden_size"]
    assert field(r, f"{arch}.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == cfg["vocab_size"] and tokens[:3] == ["<|bos|>", "<|eos|>", "!"]
    assert types[:3] == [TokenType.CONTROL, TokenType.CONTROL, TokenType.NORMAL]
    assert len(field(r, "tokenizer.ggml.merges")) == len(json.loads((FIXTURES / "models" / name / "tokenizer.json").read_text())["model"]["merges"])
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (0, 1)
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    types_by_name = tensor_types(path)
    tied = cfg.get("tie_word_embeddings", False)
    assert ("output.weight" in types_by_name) == (not tied)
    matrix = "F16" if fmt in ("f16", "q4_k") else "Q8_0"  # q4_k: rows of 64 are no 256-weight block
    if name == "llama-tiny":  # FFN 176 is not whole 32-weight blocks: ffn_down falls back
        assert types_by_name["blk.0.ffn_down.weight"] == "F16" and types_by_name["blk.0.ffn_up.weight"] == matrix
    assert types_by_name["token_embd.weight"] == matrix and types_by_name["blk.1.attn_q.weight"] == matrix
    assert types_by_name["output_norm.weight"] == "F32"
    if name == "qwen2-tiny":
        assert types_by_name["blk.0.attn_q.bias"] == "F32" and "blk.0.attn_output.bias" not in types_by_name
    if name == "llama3-tiny":  # Llama 3 rope scaling: one f32 divisor per rotary pair, 1 to factor
        rope = next(t for t in r.tensors if t.name == "rope_freqs.weight")
        factors = np.asarray(rope.data)
        assert rope.tensor_type == GGMLQuantizationType.F32 and factors.shape == (8,)
        assert factors[0] == 1.0 and factors[-1] == cfg["rope_scaling"]["factor"] and np.all(np.diff(factors) >= 0)


def with_added_tokens(dest: Path) -> Path:
    """llama-tiny with its two last merged tokens replaced by added tokens (a special one and a
    plain one, at ids the embedding has) and a chat template."""
    shutil.copytree(FIXTURES / "models" / "llama-tiny", dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    gone = {t for t, i in vocab.items() if i >= 510}
    tok["model"]["vocab"] = {t: i for t, i in vocab.items() if i < 510}
    tok["model"]["merges"] = [m for m in tok["model"]["merges"] if not ({m[0], m[1], m[0] + m[1]} & gone)]
    common = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    tok["added_tokens"] += [{"id": 510, "content": "<|im_start|>", **common, "special": True}, {"id": 511, "content": "[tool]", **common, "special": False}]
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    tc = json.loads((dest / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (dest / "tokenizer_config.json").write_text(json.dumps(tc))
    return dest


def test_the_gguf_tokenizer_is_the_folders(tmp_path: Path) -> None:
    model = with_added_tokens(tmp_path / "added")
    path = tmp_path / "added.gguf"
    quantize(model, path, "f16")
    g, f = Engine(path), Engine(model, weights="f16")
    texts = TEXTS + ["<|im_start|>user [tool] call<|eos|>", "a[tool]b <|im_start|><|im_start|>"]
    for text in texts:
        ids = f.tokenize(text)
        assert g.tokenize(text) == ids, text
        assert g.detokenize(ids) == f.detokenize(ids), text
    assert f.tokenize("<|im_start|>[tool]") == [510, 511]
    r = GGUFReader(path)
    assert field(r, "tokenizer.ggml.token_type")[510:] == [TokenType.CONTROL, TokenType.USER_DEFINED]
    template, special = _native.gguf_chat_template(str(path))
    assert template == json.loads((model / "tokenizer_config.json").read_text())["chat_template"]
    assert ("eos_token", "<|eos|>") in special


def test_a_sharded_checkpoint_writes_the_same_file(gguf_dir: Path, tmp_path: Path) -> None:
    model = shutil.copytree(FIXTURES / "models" / "llama3-tiny", tmp_path / "sharded")
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, model / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = tmp_path / "sharded.gguf"
    quantize(model, sharded, "q8_0")
    whole = written(gguf_dir, "llama3-tiny", "q8_0")
    a, b = GGUFReader(sharded), GGUFReader(whole)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.tensors, b.tensors))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "upg_batch", "quantize", *args], capture_output=True, text=True, timeout=300, env=env)


def test_the_command_writes_a_file_the_engine_loads(tmp_path: Path) -> None:
    out = tmp_path / "llama-tiny-q8_0.gguf"
    p = run_cli(str(FIXTURES / "models" / "llama-tiny"), str(out), "--format", "q8_0")
    assert p.returncode == 0, p.stderr
    assert "21 tensors" in p.stdout and "2 matrices written f16" in p.stdout and "blk.0.ffn_down.weight" in p.stdout
    assert os.listdir(tmp_path) == [out.name]
    ids = folder("llama-tiny", "q8_0").tokenize(PROMPT)
    assert np.array_equal(np.asarray(Engine(out).logits(ids)), np.asarray(folder("llama-tiny", "q8_0").logits(ids)))
    p = run_cli(str(FIXTURES / "models" / "qwen2-tiny"), str(out), "--json")  # the default format; OUT replaced
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["format"] == "q4_k_m" and summary["architecture"] == "qwen2" and summary["bytes"] == out.stat().st_size
    assert len(summary["fallbacks"]) == 15 and summary["types"] == {"f16": 15, "f32": 11}
    assert Engine(out).info["architecture"] == "Qwen2ForCausalLM"


def broken(tmp_path: Path, what: str) -> Path:
    model = shutil.copytree(FIXTURES / "models" / "llama-tiny", tmp_path / what)
    if what == "other-arch":
        cfg = json.loads((model / "config.json").read_text())
        cfg["architectures"] = ["Phi3ForCausalLM"]
        (model / "config.json").write_text(json.dumps(cfg))
    elif what == "missing-tensor":
        tensors = load_file(model / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, model / "model.safetensors")
    elif what == "no-tokenizer":
        (model / "tokenizer.json").unlink()
    return model


@pytest.mark.parametrize(
    "args,message",
    [
        (["{tmp}/nope", "{out}"], "nope: model folder not found"),
        (["{llama}", "{out}", "--format", "q3_k"], "invalid choice: 'q3_k'"),
        (["{other-arch}", "{out}"], "architectures ['Phi3ForCausalLM'] cannot be quantized (supported: LlamaForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM"),
        (["{missing-tensor}", "{out}"], "tensor model.layers.1.mlp.up_proj.weight is missing"),
        (["{no-tokenizer}", "{out}"], "tokenizer.json: missing"),
        (["{llama}", "{tmp}/no-such-folder/x.gguf"], "no-such-folder: folder not found"),
    ],
)
def test_the_command_names_what_is_wrong_and_leaves_no_file(tmp_path: Path, args: list[str], message: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.gguf"
    out.write_bytes(b"an earlier file")  # kept as it was: OUT is replaced only by a whole file
    names = {"tmp": str(tmp_path), "out": str(out), "llama": str(FIXTURES / "models" / "llama-tiny")}
    for what in ("other-arch", "missing-tensor", "no-tokenizer"):
        if any("{" + what + "}" in a for a in args):
            names[what] = str(broken(tmp_path, what))
    p = run_cli(*[a.format(**names) for a in args])
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2  # one line (argparse adds its usage line)
    assert os.listdir(work) == ["out.gguf"] and out.read_bytes() == b"an earlier file"


def test_the_api_rejects_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="format 'q3_k' is unknown"):
        quantize(FIXTURES / "models" / "llama-tiny", tmp_path / "x.gguf", "q3_k")
    assert not (tmp_path / "x.gguf").exists()
