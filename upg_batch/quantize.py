"""`upg-batch quantize MODEL_DIR OUT.gguf --format FMT`: a Hugging Face model folder written as
one GGUF file that this engine and llama.cpp both load, so a fleet quantizes once and copies
one file.

The folder's `config.json`, safetensors (f32, f16 or bf16) and byte-level BPE `tokenizer.json`
become GGUF v3 the way llama.cpp's `convert_hf_to_gguf.py` writes them (tensor names and
metadata of the `llama` and `qwen2` architectures, Llama's q/k rows interleaved for its rotary
layout, Llama 3 rope scaling as the `rope_freqs` tensor, the vocabulary with merges, special
tokens and chat template). The weights are converted by the engine's own code
(`_native.quantize_tensor`), in the format the engine's `weights=` rules pick for each matrix
(`_native.weight_format`: the q4_k_m mix, and f16 for matrices whose rows are not whole
blocks), so a GGUF file loaded with its stored formats computes what the folder computes when
loaded with `weights=FMT`. Vectors (norms, biases) are stored f32, as llama.cpp stores them.

The file is written beside OUT under a temporary name and renamed at the end: a failure
leaves no OUT behind.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from upg_batch import _native

__all__ = ["DEFAULT_FORMAT", "FORMATS", "QuantizeError", "QuantizeSummary", "permute_qk", "quantize"]

FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k", "q4_k_m")
DEFAULT_FORMAT = "q4_k_m"
# Hugging Face architecture -> GGUF architecture
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Gemma3ForCausalLM": "gemma3"}
# Gemma 3's extra per-layer tensors and its names for the norms around attention and MLP
_GEMMA3_LAYER_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
# safetensors dtype -> the engine's name for it
_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
# the Hugging Face name of each GGUF tensor of a layer
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# llama.cpp's names of the pre-tokenizers this engine builds, tried in this order against
# tokenizer.json's own pre-tokenizer.
_PRE_TOKENIZERS = ("gpt-2", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o", "smollm")
# llama_token_type
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


class QuantizeError(ValueError):
    """A model folder that cannot be written as GGUF, or a bad argument; the message names
    the file, key or tensor at fault."""


@dataclass
class QuantizeSummary:
    """What `quantize` wrote."""

    path: Path
    format: str
    architecture: str
    tensors: int
    source_bytes: int  # bytes of the tensors read from the safetensors files
    bytes: int  # size of the GGUF file
    types: dict[str, int] = field(default_factory=dict)  # tensors per stored format
    fallbacks: list[str] = field(default_factory=list)  # matrices held f16: rows not whole blocks
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Source tensor bytes per file byte."""
        return self.source_bytes / max(self.bytes, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "format": self.format, "architecture": self.architecture, "tensors": self.tensors,
            "source_bytes": self.source_bytes, "bytes": self.bytes, "ratio": round(self.ratio, 3), "types": self.types,
            "fallbacks": self.fallbacks, "notes": self.notes,
        }

    def format_text(self) -> str:
        types = ", ".join(f"{n} {k}" for k, n in sorted(self.types.items()))
        lines = [
            f"wrote {self.path} ({self.architecture}, {self.format}): {self.tensors} tensors ({types})",
            f"  {_size(self.source_bytes)} of safetensors tensors -> {_size(self.bytes)} of GGUF (ratio {self.ratio:.2f})",
        ]
        if self.fallbacks:
            lines.append(f"  {len(self.fallbacks)} matrices written f16 (rows not whole blocks of their format): {', '.join(self.fallbacks)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotary layout (halves) -> llama.cpp's (interleaved pairs), per head: the
    rows of each head [x0..x_{d/2-1} | y0..y_{d/2-1}] become x0 y0 x1 y1 ... (llama.cpp's
    `LlamaModel.permute`; the engine's GGUF loader undoes it)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- reading the folder


class _Tensor:
    """One tensor of a safetensors file: dtype, shape, and its bytes in the mapped file."""

    def __init__(self, name: str, file: Path, dtype: str, shape: list[int], buf: memoryview):
        self.name, self.file, self.dtype, self.shape, self.buf = name, file, dtype, shape, buf


class _Safetensors:
    """The tensors of a folder's safetensors files, mapped (read without loading them all)."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise QuantizeError(f"{index}: no weight_map")
            files = sorted({model_dir / f for f in weight_map.values()})
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise QuantizeError(f"{model_dir}: no *.safetensors files")
        self.tensors: dict[str, _Tensor] = {}
        self._maps: list[mmap.mmap] = []
        for f in files:
            self._read(f)

    def _read(self, path: Path) -> None:
        if not path.is_file():
            raise QuantizeError(f"{path}: missing (named by model.safetensors.index.json)")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise QuantizeError(f"{path}: not a safetensors file (too short)")
            m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(m)
        (n,) = struct.unpack("<Q", m[:8])
        try:
            header = json.loads(m[8 : 8 + n])
        except ValueError as e:
            raise QuantizeError(f"{path}: not a safetensors file (bad header: {e})") from None
        view = memoryview(m)
        start = 8 + n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise QuantizeError(f"{path}: tensor {name} is {entry.get('dtype')}; only F32, F16 and BF16 can be converted")
            a, b = entry["data_offsets"]
            shape = [int(d) for d in entry["shape"]]
            if start + b > size or b - a != math.prod(shape) * (4 if dtype == "f32" else 2):
                raise QuantizeError(f"{path}: tensor {name}: its byte range does not fit its shape or the file")
            self.tensors[name] = _Tensor(name, path, dtype, shape, view[start + a : start + b])

    def close(self) -> None:
        self.tensors.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still held (an error's traceback): unmapped when collected
                pass


def _json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantizeError(f"{path}: missing") from None
    except ValueError as e:
        raise QuantizeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise QuantizeError(f"{path}: expected a JSON object")
    return obj


@dataclass
class _Config:
    arch: str  # GGUF architecture
    hf_arch: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    eps: float
    theta: float
    tied: bool
    qkv_bias: bool
    o_bias: bool
    rope: dict[str, Any] | None  # the rope section when scaled
    sliding_window: int = 0  # Gemma 3's local layers


def _config(model_dir: Path) -> _Config:
    path = model_dir / "config.json"
    c = _json(path)
    archs = c.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if arch not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise QuantizeError(f"{path}: architectures {archs!r} cannot be quantized (supported: {supported})")

    def num(key: str, default: Any = None, kind: type = int) -> Any:
        v = c.get(key, default)
        if v is None:
            raise QuantizeError(f"{path}: {key} is missing")
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise QuantizeError(f"{path}: {key} must be a positive integer, got {v!r}")
        if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
            raise QuantizeError(f"{path}: {key} must be a positive number, got {v!r}")
        return kind(v)

    hidden, heads = num("hidden_size"), num("num_attention_heads")
    head_dim = c.get("head_dim") or hidden // heads
    if c.get("mlp_bias"):
        raise QuantizeError(f"{path}: mlp_bias is true; MLP biases are not supported")
    if arch == "Qwen2ForCausalLM" and c.get("use_sliding_window"):
        raise QuantizeError(f"{path}: use_sliding_window is true; Qwen2 sliding-window attention is not supported")
    # transformers 5 keeps rope settings in rope_parameters, transformers 4 in rope_theta + rope_scaling
    section_key = "rope_parameters" if isinstance(c.get("rope_parameters"), dict) else "rope_scaling"
    section = c.get(section_key) if isinstance(c.get(section_key), dict) else {}
    theta = section.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = section.get("rope_type", section.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise QuantizeError(f"{path}: {section_key}.rope_type {kind!r} is not supported (default, linear, llama3)")
    if kind == "linear" and not (isinstance(section.get("factor"), (int, float)) and section["factor"] > 0):
        raise QuantizeError(f"{path}: {section_key}.factor must be a positive number for linear rope scaling")
    default_context = {"LlamaForCausalLM": 2048, "Qwen2ForCausalLM": 32768, "Gemma3ForCausalLM": 32768}[arch]
    sliding = 0
    if arch == "Gemma3ForCausalLM":
        sliding = _gemma3_checks(path, c, int(head_dim), num("num_hidden_layers"))
    return _Config(
        arch=ARCHITECTURES[arch], hf_arch=arch, hidden=hidden, ffn=num("intermediate_size"), layers=num("num_hidden_layers"),
        heads=heads, kv_heads=num("num_key_value_heads", heads), head_dim=int(head_dim), vocab=num("vocab_size"),
        context=num("max_position_embeddings", default_context), eps=num("rms_norm_eps", 1e-6, float), theta=float(theta),
        tied=bool(c.get("tie_word_embeddings", False)), qkv_bias=arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias")),
        o_bias=arch == "LlamaForCausalLM" and bool(c.get("attention_bias")), rope=dict(section, rope_type=kind) if kind != "default" else None,
        sliding_window=sliding,
    )


def _gemma3_checks(path: Path, c: dict[str, Any], head_dim: int, layers: int) -> int:
    """What GGUF's gemma3 metadata cannot say is fixed there (as llama.cpp reads it): every 6th
    layer global, local layers rotating with base 10000, queries scaled by 1/sqrt(head_dim).
    A config that differs is refused naming the field. Returns the sliding window."""
    types = c.get("layer_types")
    want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    if types is not None and types != want:
        raise QuantizeError(f"{path}: layer_types is not every 6th layer global, which GGUF's gemma3 assumes")
    if c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6)) != 6:
        raise QuantizeError(f"{path}: sliding_window_pattern must be 6 for GGUF's gemma3")
    local = c.get("rope_local_base_freq", (c.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta", 10000.0))
    if float(local) != 10000.0:
        raise QuantizeError(f"{path}: rope_local_base_freq {local} is not the 10000 GGUF's gemma3 assumes")
    if c.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise QuantizeError(f"{path}: query_pre_attn_scalar {c.get('query_pre_attn_scalar')} differs from head_dim {head_dim}, which GGUF's gemma3 assumes")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(key) is not None:
            raise QuantizeError(f"{path}: {key} is set; logit softcapping is not supported")
    window = c.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        raise QuantizeError(f"{path}: sliding_window must be a positive integer, got {window!r}")
    return window


def _rope_factors(cfg: _Config) -> np.ndarray:
    """Llama 3 rope scaling as llama.cpp stores it: one divisor per rotary pair (`rope_freqs`)."""
    r = cfg.rope or {}
    factor, low, high = float(r.get("factor", 8.0)), float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old = float(r.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(cfg.head_dim // 2):
        freq = 1.0 / cfg.theta ** (2 * i / cfg.head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(path: Path, pre: Any) -> str:
    for name in _PRE_TOKENIZERS:
        if pre == json.loads(_native.gguf_pre_tokenizer(name) or "null"):
            return name
    raise QuantizeError(
        f"{path}: pre_tokenizer {json.dumps(pre)[:200]} matches none of the byte-level pre-tokenizers GGUF names ({', '.join(_PRE_TOKENIZERS)})"
    )


def _tokenizer(w: Any, model_dir: Path, cfg: _Config, summary: QuantizeSummary) -> None:
    """tokenizer.ggml.* from tokenizer.json (byte-level BPE: `gpt2` in GGUF), special tokens,
    add_bos/add_eos and the chat template as llama.cpp's converter finds them (gguf.SpecialVocab)."""
    import gguf

    path = model_dir / "tokenizer.json"
    tok = _json(path)
    model = tok.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and isinstance(model.get("vocab"), dict) and "<0x00>" in model["vocab"]:
        from upg_batch.gguf_vocab import write_sentencepiece_vocab

        return write_sentencepiece_vocab(w, model_dir, tok, cfg.vocab, summary.notes)
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and not tok.get("normalizer")
    if not byte_level or not isinstance(model.get("vocab"), dict):
        raise QuantizeError(
            f"{path}: only byte-level BPE tokenizers (GPT-2 style, as Llama 3 and Qwen2 use) can be written; "
            f"this one is {model.get('type')!r}{' with byte_fallback' if model.get('byte_fallback') else ''}"
            f"{' with a normalizer' if tok.get('normalizer') else ''}"
        )
    pre = _pre_tokenizer_name(path, tok.get("pre_tokenizer"))
    text: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        text[i] = a["content"]
    if max(text) >= cfg.vocab:
        raise QuantizeError(f"{path}: token id {max(text)} is beyond the embedding's {cfg.vocab} rows (config.json vocab_size)")
    tokens, types = [], []
    for i in range(cfg.vocab):
        if i not in text:
            tokens.append(f"[PAD{i}]")
            types.append(_USER_DEFINED)
        elif i in added:
            tokens.append(text[i])
            types.append(_CONTROL if added[i].get("special") else _USER_DEFINED)
        else:
            tokens.append(text[i])
            types.append(_NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=cfg.vocab)
    if not special.merges:
        raise QuantizeError(f"{path}: model.merges is missing or empty")
    # What the folder's tokenizer does when the files say nothing: no BOS, no EOS.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    # EOS ids beyond the first (generation_config.json lists them) as end-of-turn / end-of-message.
    gen = model_dir / "generation_config.json"
    eos = _json(gen).get("eos_token_id") if gen.is_file() else None
    eos_ids = [eos] if isinstance(eos, int) else [e for e in eos if isinstance(e, int)] if isinstance(eos, list) else []
    if eos_ids and "eos" not in special.special_token_ids:
        special.special_token_ids["eos"] = eos_ids[0]
    extra = [e for e in eos_ids if e != special.special_token_ids.get("eos") and 0 <= e < cfg.vocab]
    for key, tid in zip(("eot", "eom"), extra):
        special.special_token_ids.setdefault(key, tid)
    if len(extra) > 2:
        summary.notes.append(f"generation_config.json eos_token_id {extra[2:]} not written (GGUF has eos, eot and eom only)")
    special.add_to_gguf(w, quiet=True)


# ----------------------------------------------------------------------------- writing


@dataclass
class _Out:
    gguf_name: str
    source: _Tensor
    format: str  # the stored format
    rows: int
    cols: int  # 0 for vectors
    permute_heads: int = 0  # Llama q/k: interleave rows per head of this many heads
    add_one: bool = False  # a Gemma norm: stored as 1 + w


def _plan(cfg: _Config, st: _Safetensors, fmt: str, summary: QuantizeSummary) -> list[_Out]:
    """Every tensor to write, in llama.cpp's order, with its stored format."""
    hf: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", "token_embd.weight", (cfg.vocab, cfg.hidden))]
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes = {
        "input_layernorm": (cfg.hidden,), "post_attention_layernorm": (cfg.hidden,),
        "self_attn.q_proj": (q, cfg.hidden), "self_attn.k_proj": (kv, cfg.hidden), "self_attn.v_proj": (kv, cfg.hidden),
        "self_attn.o_proj": (cfg.hidden, q), "mlp.gate_proj": (cfg.ffn, cfg.hidden), "mlp.up_proj": (cfg.ffn, cfg.hidden),
        "mlp.down_proj": (cfg.hidden, cfg.ffn),
    }
    layer_names = dict(_LAYER_NAMES)
    if cfg.arch == "gemma3":
        layer_names.update(_GEMMA3_LAYER_NAMES)
        shapes.update({"pre_feedforward_layernorm": (cfg.hidden,), "post_feedforward_layernorm": (cfg.hidden,),
                       "self_attn.q_norm": (cfg.head_dim,), "self_attn.k_norm": (cfg.head_dim,)})
    for i in range(cfg.layers):
        for name, gname in layer_names.items():
            suffix = ".weight"
            hf.append((f"model.layers.{i}.{name}{suffix}", f"blk.{i}.{gname}{suffix}", shapes[name]))
            if (cfg.qkv_bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) or (cfg.o_bias and name == "self_attn.o_proj"):
                hf.append((f"model.layers.{i}.{name}.bias", f"blk.{i}.{gname}.bias", shapes[name][:1]))
    hf.append(("model.norm.weight", "output_norm.weight", (cfg.hidden,)))
    if not cfg.tied:
        hf.append(("lm_head.weight", "output.weight", (cfg.vocab, cfg.hidden)))
    known = {n for n, _, _ in hf} | {"lm_head.weight"}
    unknown = [n for n in st.tensors if n not in known and not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise QuantizeError(f"tensor {unknown[0]} ({st.tensors[unknown[0]].file.name}) is not part of a {cfg.hf_arch} this engine runs")
    out = []
    for name, gname, shape in hf:
        t = st.tensors.get(name)
        if t is None:
            raise QuantizeError(f"tensor {name} is missing from the safetensors files")
        if tuple(t.shape) != shape:
            raise QuantizeError(f"tensor {name} ({t.file.name}) has shape {t.shape}; config.json implies {list(shape)}")
        permute = 0
        if cfg.arch == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            permute = cfg.heads if ".q_proj." in name else cfg.kv_heads
        if len(shape) == 1:
            # llama.cpp's converter stores Gemma's norms as the 1 + w they apply
            out.append(_Out(gname, t, "f32", 1, shape[0], permute, add_one=cfg.arch == "gemma3" and "norm" in name))
            continue
        stored, fell_back = _native.weight_format(name, fmt, cfg.layers, cfg.tied, t.dtype, shape[1])
        if fell_back:
            summary.fallbacks.append(gname)
        out.append(_Out(gname, t, stored, shape[0], shape[1], permute))
    return out


def _data(o: _Out) -> bytes:
    if o.add_one:
        values = np.frombuffer(_native.quantize_tensor(bytes(o.source.buf), o.source.dtype, o.cols, "f32"), dtype=np.float32)
        return (values + np.float32(1.0)).astype(np.float32).tobytes()
    raw = np.frombuffer(o.source.buf, dtype=np.uint8)
    if o.permute_heads:
        rows = o.rows if len(o.source.shape) == 2 else o.cols
        raw = permute_qk(raw.reshape(rows, -1), o.permute_heads)
    return _native.quantize_tensor(raw.tobytes(), o.source.dtype, o.cols, o.format)


def quantize(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], format: str = DEFAULT_FORMAT) -> QuantizeSummary:
    """Write the Hugging Face folder `model_dir` as the GGUF file `out`, its matrices in
    `format` (one of FORMATS); QuantizeError names what is wrong."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    if format not in FORMATS:
        raise QuantizeError(f"format {format!r} is unknown (expected one of {', '.join(FORMATS)})")
    if not model_dir.is_dir():
        raise QuantizeError(f"{model_dir}: model folder not found")
    if out.is_dir():
        raise QuantizeError(f"{out}: is a folder; OUT is the GGUF file to write")
    if not out.parent.is_dir():
        raise QuantizeError(f"{out.parent}: folder not found (OUT's folder must exist)")
    cfg = _config(model_dir)
    summary = QuantizeSummary(path=out, format=format, architecture=cfg.arch, tensors=0, source_bytes=0, bytes=0)
    st = _Safetensors(model_dir)
    tmp = out.parent / f".{out.name}.{os.getpid()}.partial"
    w = None
    try:
        plan = _plan(cfg, st, format, summary)
        w = gguf.GGUFWriter(str(tmp), cfg.arch)
        _metadata(w, model_dir, cfg, format)
        _tokenizer(w, model_dir, cfg, summary)
        rope = _rope_factors(cfg) if cfg.rope and cfg.rope["rope_type"] == "llama3" else None
        if rope is not None:
            w.add_tensor_info("rope_freqs.weight", (rope.nbytes,), np.dtype(np.uint8), rope.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
        for o in plan:
            ggml = gguf.GGMLQuantizationType[o.format.upper()]
            block, size = gguf.GGML_QUANT_SIZES[ggml]
            row_bytes = o.cols // block * size
            shape = (o.rows, row_bytes) if len(o.source.shape) == 2 else (row_bytes,)
            w.add_tensor_info(o.gguf_name, shape, np.dtype(np.uint8), o.rows * row_bytes, raw_dtype=ggml)
            summary.types[o.format] = summary.types.get(o.format, 0) + 1
            summary.source_bytes += o.source.buf.nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if rope is not None:
            w.write_tensor_data(rope.view(np.uint8))
            summary.types["f32"] = summary.types.get("f32", 0) + 1
        for o in plan:
            w.write_tensor_data(np.frombuffer(_data(o), dtype=np.uint8))
        w.close()
        summary.tensors = len(plan) + (rope is not None)
        summary.bytes = tmp.stat().st_size
        os.replace(tmp, out)
    except BaseException:
        if w is not None:
            w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        st.close()
    return summary


_FILE_TYPES = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q5_0": "MOSTLY_Q5_0",
    # llama.cpp has no file type for Q4_K throughout; Q4_K_S is its mostly-Q4_K type
    "q4_k": "MOSTLY_Q4_K_S", "q6_k": "MOSTLY_Q6_K", "q4_k_m": "MOSTLY_Q4_K_M",
}


def _metadata(w: Any, model_dir: Path, cfg: _Config, fmt: str) -> None:
    import gguf

    w.add_name(model_dir.resolve().name)
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[fmt]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.context)
    w.add_embedding_length(cfg.hidden)
    w.add_block_count(cfg.layers)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.theta)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_vocab_size(cfg.vocab)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.rope and cfg.rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope["factor"]))
