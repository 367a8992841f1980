"""Writes the seed corpus of the Hugging Face folder fuzz targets (native/fuzz/corpus/{safetensors,
config,index,tokenizer}/) from the repository's tiny fixture models (tests/fixtures/models/) plus
small synthetic files for what the fixtures lack (Gemma 3 and Mistral configs, the tokenizer model
types and normalizers). Standard library only; deterministic.

    python3 native/fuzz/make_model_corpus.py
"""

import base64
import json
import random
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
OUT = Path(__file__).resolve().parent / "corpus"
rng = random.Random(0)
SIZES = {"F32": 4, "F16": 2, "BF16": 2}


def write(target: str, name: str, data: bytes) -> None:
    path = OUT / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"{path.relative_to(ROOT)}: {len(data)} bytes")


def write_json(target: str, name: str, obj) -> None:
    write(target, name, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def fixture_header(model: str) -> dict:
    with open(FIXTURES / model / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def safetensors(tensors: list[tuple[str, str, list[int]]], metadata: dict | None = None) -> bytes:
    """A safetensors file as the Python writer lays it out: offsets in order, header padded
    with spaces to 8 bytes, random data."""
    header, data = {}, bytearray()
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        size = SIZES[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += bytes(rng.randrange(256) for _ in range(size))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(data)


def shrunk(model: str, dtype: str | None = None) -> list[tuple[str, str, list[int]]]:
    """The fixture's tensors (names, dtypes) with every dimension cut to at most 2."""
    header = fixture_header(model)
    return [(n, dtype or t["dtype"], [min(d, 2) for d in t["shape"]]) for n, t in sorted(header.items()) if n != "__metadata__"]


def safetensors_seeds() -> None:
    write("safetensors", "llama-tiny-f32.safetensors", safetensors(shrunk("llama-tiny"), {"format": "pt"}))
    write("safetensors", "qwen2-tiny-bf16.safetensors", safetensors(shrunk("qwen2-tiny")[:8]))
    write("safetensors", "llama3-tiny-f16.safetensors", safetensors(shrunk("llama3-tiny")[:6], {"format": "pt", "note": "x"}))
    # An empty tensor, scalars and a 4-D shape: the shapes the header allows beyond matrices.
    write("safetensors", "shapes.safetensors", safetensors([("empty", "F32", [0, 4]), ("scalar", "F16", []), ("t4", "BF16", [1, 2, 1, 3])]))
    write("safetensors", "no-tensors.safetensors", safetensors([], {"format": "pt"}))


def config_seeds() -> None:
    for model in ("llama-tiny", "qwen2-tiny", "llama3-tiny"):
        write("config", f"{model}.json", (FIXTURES / model / "config.json").read_bytes())
    base = json.loads((FIXTURES / "llama-tiny" / "config.json").read_text())
    mistral = dict(base, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64, rope_theta=1e6, eos_token_id=[1, 2])
    del mistral["rope_parameters"]
    write_json("config", "mistral-sliding.json", mistral)
    write_json("config", "llama-linear-rope.json", dict(base, rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}, attention_bias=True))
    # Gemma 3 (transformers 4 and 5 layouts), dimensions of the fixtures' size.
    gemma = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None, "sliding_window": 32,
        "query_pre_attn_scalar": 16, "_sliding_window_pattern": 2, "max_position_embeddings": 512, "vocab_size": 512,
        "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
    }
    write_json("config", "gemma3-t4.json", gemma)
    t5 = {k: v for k, v in gemma.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling", "_sliding_window_pattern", "torch_dtype")}
    t5.update(dtype="bfloat16", layer_types=["sliding_attention", "full_attention"] * 2, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    })
    write_json("config", "gemma3-t5.json", t5)


def index_seeds() -> None:
    tensors = shrunk("llama-tiny")
    half = len(tensors) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [tensors[:half], tensors[half:]]
    total = 0
    for name, part in zip(names, shards):
        data = safetensors(part, {"format": "pt"})
        total += len(data)
        write("index", name, data)
    weight_map = {n: names[i] for i, part in enumerate(shards) for n, _, _ in part}
    write_json("index", "two-shards.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json("index", "one-shard.index.json", {"weight_map": {n: names[0] for n, _, _ in shards[0]}})


def tokenizer(model: dict, normalizer=None, pre_tokenizer=None, post_processor=None, decoder=None, added=(), truncation=None, padding=None) -> dict:
    added_tokens = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True} for i, c in added]
    return {"version": "1.0", "truncation": truncation, "padding": padding, "added_tokens": added_tokens, "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer, "post_processor": post_processor, "decoder": decoder, "model": model}


def bos_template(bos: str, bos_id: int) -> dict:
    return {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def charsmap(mapping: dict[str, str]) -> str:
    """A SentencePiece precompiled charsmap (a darts-clone double array over the UTF-8 of the
    keys, then the NUL-separated replacements), each trie node given its own 256-unit block."""
    blob, values = b"", {}
    for key, norm in mapping.items():
        values[key.encode()] = len(blob)
        blob += norm.encode() + b"\0"
    nodes = sorted({k[:i] for k in values for i in range(len(k) + 1)}, key=lambda p: (len(p), p))
    block = {p: i for i, p in enumerate(nodes)}
    units = [0] * (256 * len(nodes))
    for p in nodes:
        if p:
            base = 256 * block[p]
            pos = 256 * block[p[:-1]] ^ p[-1]
            # label | has_leaf (bit 8) | offset (bits 10..) from this unit to the node's block
            units[pos] = p[-1] | ((1 << 8) if p in values else 0) | ((pos ^ base) << 10)
            if p in values:
                units[base] = (1 << 31) | values[p]
    return base64.b64encode(struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + blob).decode()


def tokenizer_seeds() -> None:
    write("tokenizer", "bpe-byte-level.json", (FIXTURES / "llama-tiny" / "tokenizer.json").read_bytes())
    # Llama 2 style: SentencePiece BPE with byte fallback.
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "ll", "▁w", "or", "▁he", "▁hell", "▁hello", "▁wor", "▁world"]
    merges = ["▁ h", "l l", "▁ w", "o r", "▁h e", "▁he ll", "▁hell o", "▁w or", "▁wor l", "▁worl d"]
    vocab = {p: i for i, p in enumerate(pieces)}
    vocab["▁worl"] = len(vocab)
    write_json("tokenizer", "spm-bpe-byte-fallback.json", tokenizer(
        {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None,
         "fuse_unk": True, "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges},
        normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        post_processor=bos_template("<s>", 1),
        decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        added=[(0, "<unk>"), (1, "<s>"), (2, "</s>")]))
    # Unigram with a precompiled charsmap (T5/ALBERT style) and Metaspace.
    uni = [["<unk>", 0.0], ["<s>", 0.0], ["</s>", 0.0], ["▁", -2.0], ["▁hello", -3.0], ["▁world", -3.5], ["A", -4.0], ["fi", -4.5]]
    uni += [[c, -6.0] for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    write_json("tokenizer", "unigram-precompiled.json", tokenizer(
        {"type": "Unigram", "unk_id": 0, "vocab": uni, "byte_fallback": False},
        normalizer={"type": "Sequence", "normalizers": [{"type": "Precompiled", "precompiled_charsmap": charsmap({"Ａ": "A", "ﬁ": "fi"})},
                                                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
        pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        post_processor={"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                        "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}},
        decoder={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        added=[(0, "<unk>"), (1, "<s>"), (2, "</s>")]))
    # WordPiece (BERT), with the truncation and padding a tokenizer.json may carry.
    wp = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "un", "##aff", "##able", ",", "!", "."] + list("abcdefghijklmnopqrstuvwxyz")
    write_json("tokenizer", "wordpiece-bert.json", tokenizer(
        {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": {t: i for i, t in enumerate(wp)}},
        normalizer={"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None, "lowercase": True},
        pre_tokenizer={"type": "BertPreTokenizer"},
        post_processor={"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
        added=[(0, "[PAD]"), (1, "[UNK]"), (2, "[CLS]"), (3, "[SEP]")],
        truncation={"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 0},
        padding={"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}))
    # WordLevel behind a sequence of pre-tokenizers, a regex split among them.
    wl = ["<unk>", "hello", "world", ",", "!", "1", "2", "3"]
    write_json("tokenizer", "wordlevel-split.json", tokenizer(
        {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(wl)}, "unk_token": "<unk>"},
        normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True}]},
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{L}+|\\p{N}"}, "behavior": "Isolated", "invert": False},
            {"type": "Digits", "individual_digits": True}, {"type": "Punctuation", "behavior": "Isolated"}, {"type": "WhitespaceSplit"}]},
        decoder=None, added=[(0, "<unk>")]))


if __name__ == "__main__":
    safetensors_seeds()
    config_seeds()
    index_seeds()
    tokenizer_seeds()
