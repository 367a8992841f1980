"""Writes the seed corpus of the GGUF fuzzer (native/fuzz/corpus/gguf/*.gguf) with the `gguf`
PyPI package (llama.cpp's own writer), so the seeds come from a writer independent of the
reader under test. Small files: every metadata value type, string and nested arrays, and a few
tiny tensors of each format the engine reads.

    python3 native/fuzz/make_corpus.py        # needs `pip install gguf numpy` (tested: 0.19)
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES

OUT = Path(__file__).resolve().parent / "corpus" / "gguf"
rng = np.random.default_rng(0)


def write(name: str, fill, alignment: int | None = None, version: int | None = None) -> None:
    path = OUT / name
    w = GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version is not None:
        # v2 files have the v3 layout (little endian); only the version number differs.
        data = bytearray(path.read_bytes())
        data[4:8] = version.to_bytes(4, "little")
        path.write_bytes(bytes(data))
    print(f"{path.relative_to(OUT.parents[3])}: {path.stat().st_size} bytes")


def tensor(w: GGUFWriter, name: str, qtype: T, shape: tuple[int, ...]) -> None:
    """A tensor of `shape` (numpy order: shape[-1] is the row length) in `qtype`."""
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F32:
        w.add_tensor(name, values)
    elif qtype == T.F16:
        w.add_tensor(name, values.astype(np.float16))
    elif qtype in (T.BF16, T.Q8_0, T.Q4_0, T.Q5_0):
        w.add_tensor(name, quants.quantize(values, qtype), raw_dtype=qtype)
    else:
        # The k-quants have no quantizer in gguf-py: random blocks (the reader never decodes).
        per_block, block_bytes = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1]))
        blocks = rng.integers(0, 256, (rows, shape[-1] // per_block * block_bytes), dtype=np.uint8)
        w.add_tensor(name, blocks, raw_dtype=qtype)


def all_value_types(w: GGUFWriter) -> None:
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 1.5)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo, wörld")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", -2.25)
    w.add_array("test.strings", ["a", "bc", "", "déf"])
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, -1.0])
    w.add_array("test.bools", [True, False, True])
    w.add_key_value("test.u16s", [1, 2, 65535], V.ARRAY, sub_type=V.UINT16)
    w.add_array("test.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_array("test.nested_strings", [["x", "y"], ["z"]])
    tensor(w, "t.f32", T.F32, (2, 8))


def tensors_every_format(w: GGUFWriter) -> None:
    w.add_uint32("llama.block_count", 1)
    tensor(w, "t.f32", T.F32, (3, 4))
    tensor(w, "t.f16", T.F16, (2, 16))
    tensor(w, "t.bf16", T.BF16, (2, 8))
    tensor(w, "t.q8_0", T.Q8_0, (2, 32))
    tensor(w, "t.q4_0", T.Q4_0, (1, 64))
    tensor(w, "t.q5_0", T.Q5_0, (2, 32))
    tensor(w, "t.q4_k", T.Q4_K, (2, 256))
    tensor(w, "t.q6_k", T.Q6_K, (1, 256))


def tokenizer_like(w: GGUFWriter) -> None:
    w.add_string("general.name", "tiny")
    w.add_uint32("llama.context_length", 128)
    w.add_uint32("llama.embedding_length", 32)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"▁tok{i}" for i in range(40)]
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(len(tokens))])
    w.add_key_value("tokenizer.ggml.token_type", [2, 3, 3] + [1] * 40, V.ARRAY, sub_type=V.INT32)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    tensor(w, "token_embd.weight", T.Q8_0, (len(tokens), 32))
    tensor(w, "output_norm.weight", T.F32, (32,))


def shapes_aligned(w: GGUFWriter) -> None:
    tensor(w, "t.3d", T.F16, (2, 3, 4))
    tensor(w, "t.4d", T.F32, (2, 1, 2, 3))
    tensor(w, "t.q4_k", T.Q4_K, (1, 256))


def metadata_only(w: GGUFWriter) -> None:
    w.add_string("general.name", "no tensors")
    w.add_uint64("test.u64", 7)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    write("all_value_types.gguf", all_value_types)
    write("every_format.gguf", tensors_every_format)
    write("tokenizer_like.gguf", tokenizer_like)
    write("aligned_64.gguf", shapes_aligned, alignment=64)
    write("metadata_only_v2.gguf", metadata_only, version=2)
