"""Bad model folders: each raises `EngineError` (never a Rust panic, never a bare
TypeError/OverflowError from the bindings) whose message names the file, field or tensor at
fault. Plus what must load: sharded checkpoints and both config.json styles. (Bad arguments
and prompts: test_engine_inputs.py.)"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from upg_batch import Engine, EngineError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = FIXTURES / "models"
PROMPT = [53, 445, 222, 439, 274, 10, 99, 300, 7, 2, 511, 256, 128, 64, 32, 16, 8, 4]


def expect_engine_error(fn: Callable[[], Any], *needles: str) -> str:
    """Runs fn; it must raise EngineError itself (not a subclass of BaseException such as
    pyo3's PanicException) with every needle in its message."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - a panic is a BaseException
        assert type(e) is EngineError, f"expected EngineError, got {type(e).__module__}.{type(e).__qualname__}: {e}"
        msg = str(e)
        for needle in needles:
            assert needle in msg, f"{needle!r} not in the message: {msg}"
        return msg
    raise AssertionError("no error raised")


def copy_model(tmp_path: Path, name: str = "llama-tiny") -> Path:
    dst = tmp_path / name
    shutil.copytree(MODELS / name, dst)
    return dst


def edit_json(path: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def edit_tensors(model: Path, fn: Callable[[dict[str, np.ndarray]], Any]) -> None:
    tensors = load_file(model / "model.safetensors")
    fn(tensors)
    save_file(tensors, model / "model.safetensors")


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


# ---------------------------------------------------------------- config.json


def test_missing_config(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (m / "config.json").unlink()
    expect_engine_error(lambda: Engine(m), str(m / "config.json"), "missing")


def test_malformed_config(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (m / "config.json").write_text('{"hidden_size": 64, "vocab_size": ')
    expect_engine_error(lambda: Engine(m), "config.json", "JSON")


def test_config_not_an_object(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (m / "config.json").write_text("[1, 2, 3]")
    expect_engine_error(lambda: Engine(m), "config.json")


def test_unsupported_architecture(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    expect_engine_error(lambda: Engine(m), "config.json", "architectures", "GPT2LMHeadModel")


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.pop(field))
    expect_engine_error(lambda: Engine(m), "config.json", field)


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", -64), ("hidden_size", "64"), ("hidden_size", 0), ("num_key_value_heads", 3),
        ("hidden_act", "gelu"), ("rms_norm_eps", -1.0), ("tie_word_embeddings", "yes"), ("head_dim", 15),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}), ("rope_parameters", {"rope_type": "llama3", "factor": 8.0}),
        ("rope_parameters", 10000.0), ("eos_token_id", "eos"), ("mlp_bias", True),
    ],
)
def test_bad_field_value(tmp_path: Path, field: str, value: Any) -> None:
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.update({field: value}))
    expect_engine_error(lambda: Engine(m), "config.json", field)


@pytest.mark.parametrize("field, value, tensor", [
    ("vocab_size", 500, "model.embed_tokens.weight"),
    ("num_hidden_layers", 3, "model.layers.2."),
    ("intermediate_size", 10**6, "model.layers.0.mlp.gate_proj.weight"),
    ("hidden_size", 2**20, "model.embed_tokens.weight"),
])
def test_config_disagreeing_with_the_tensors(tmp_path: Path, field: str, value: int, tensor: str) -> None:
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.update({field: value}))
    expect_engine_error(lambda: Engine(m), tensor, "model.safetensors")


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "vocab_size", "num_attention_heads"])
def test_dimensions_too_large_for_any_model_name_the_field(tmp_path: Path, field: str) -> None:
    # products of two dimensions must not overflow: each is bounded by 2**24
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.update({field: 2**40}))
    expect_engine_error(lambda: Engine(m), "config.json", field, "16777216")


@pytest.mark.parametrize("scaling, field", [
    ({"rope_type": "linear", "factor": 0}, "rope_scaling.factor"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4, "original_max_position_embeddings": 64},
     "rope_scaling.high_freq_factor"),
    ({"rope_type": "llama3", "factor": "x", "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 64},
     "rope_scaling.factor"),
    ({"rope_type": "linear", "factor": 1e30}, "rope_scaling.factor"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 1e30, "original_max_position_embeddings": 64},
     "rope_scaling.high_freq_factor"),
])
def test_rope_scaling_values_are_checked_and_named(tmp_path: Path, scaling: dict, field: str) -> None:
    m = copy_model(tmp_path, "llama3-tiny")
    edit_json(m / "config.json", lambda c: c.update({"rope_scaling": scaling}))
    expect_engine_error(lambda: Engine(m), "config.json", field)


def test_absurd_but_loadable_values_are_refused_naming_the_field(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.update({"rms_norm_eps": 1e308}))
    expect_engine_error(lambda: Engine(m), "config.json", "rms_norm_eps", "1e308")
    m = copy_model(tmp_path / "layers")
    edit_json(m / "config.json", lambda c: c.update({"num_hidden_layers": 1}))  # two are stored
    expect_engine_error(lambda: Engine(m), "num_hidden_layers", "model.layers.1")
    m = copy_model(tmp_path / "eos")
    edit_json(m / "generation_config.json", lambda c: c.update({"eos_token_id": [2, 70000]}))
    expect_engine_error(lambda: Engine(m), "eos_token_id", "70000", "vocabulary of 512")


def test_bad_generation_config(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (m / "generation_config.json").write_text("{")
    expect_engine_error(lambda: Engine(m), "generation_config.json")
    (m / "generation_config.json").write_text('{"eos_token_id": [1, -2]}')
    expect_engine_error(lambda: Engine(m), "generation_config.json", "eos_token_id")


@pytest.mark.parametrize("content", [None, "{", '{"model": {}}'])
def test_bad_tokenizer(tmp_path: Path, content: str | None) -> None:
    m = copy_model(tmp_path)
    if content is None:
        (m / "tokenizer.json").unlink()
    else:
        (m / "tokenizer.json").write_text(content)
    expect_engine_error(lambda: Engine(m), "tokenizer.json")


# ---------------------------------------------------------------- safetensors


def test_missing_tensor(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    edit_tensors(m, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_engine_error(lambda: Engine(m), "model.layers.1.mlp.up_proj.weight", "missing")


def test_missing_lm_head_when_untied(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    edit_tensors(m, lambda t: t.pop("lm_head.weight"))
    expect_engine_error(lambda: Engine(m), "lm_head.weight")


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.self_attn.k_proj.weight", (16, 64)),
    ("model.layers.0.self_attn.q_proj.weight", (64, 32)),
    ("model.norm.weight", (63,)),
    ("model.layers.1.input_layernorm.weight", (64, 1)),
    ("model.embed_tokens.weight", (64, 512)),
])
def test_misshapen_tensor(tmp_path: Path, name: str, shape: tuple[int, ...]) -> None:
    m = copy_model(tmp_path)
    edit_tensors(m, lambda t: t.update({name: np.zeros(shape, np.float32)}))
    expect_engine_error(lambda: Engine(m), name, "shape")


@pytest.mark.parametrize("dtype", [np.int8, np.float64, np.int32, np.uint8, np.bool_])
def test_unsupported_dtype(tmp_path: Path, dtype: Any) -> None:
    m = copy_model(tmp_path)
    edit_tensors(m, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": t["model.layers.0.mlp.down_proj.weight"].astype(dtype)}))
    expect_engine_error(lambda: Engine(m), "model.layers.0.mlp.down_proj.weight", "dtype")


@pytest.mark.parametrize("keep", [0, 4, 7, 8, 100, 0.5, -1])
def test_truncated_safetensors(tmp_path: Path, keep: float) -> None:
    m = copy_model(tmp_path)
    data = (m / "model.safetensors").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    (m / "model.safetensors").write_bytes(data[:n])
    expect_engine_error(lambda: Engine(m), "model.safetensors")


@pytest.mark.parametrize("how", ["garbage-header", "garbage-file", "huge-length", "bad-json", "offsets-past-end", "overlapping"])
def test_corrupt_header(tmp_path: Path, how: str) -> None:
    m = copy_model(tmp_path)
    path = m / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    rng = np.random.default_rng(0)
    if how == "garbage-header":
        data = data[:8] + rng.integers(0, 256, n, dtype=np.uint8).tobytes() + data[8 + n :]
    elif how == "garbage-file":
        data = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    elif how == "huge-length":
        data = (2**63).to_bytes(8, "little") + data[8:]
    elif how == "bad-json":
        text = data[8 : 8 + n].replace(b'"F32"', b"F32__", 1)
        data = data[:8] + text + data[8 + n :]
    else:
        entry = header["model.norm.weight"]
        if how == "offsets-past-end":
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 10**6]
        else:
            other = header["model.layers.0.input_layernorm.weight"]
            entry["data_offsets"] = list(other["data_offsets"])
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = len(text).to_bytes(8, "little") + text + data[8 + n :]
    path.write_bytes(data)
    expect_engine_error(lambda: Engine(m), "model.safetensors")


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    tensors = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump({k: v.tolist() for k, v in list(tensors.items())[:2]}, f)
    expect_engine_error(lambda: Engine(m), "pytorch_model.bin", "pickle")


def test_pickle_named_safetensors_is_refused(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (m / "model.safetensors").write_bytes(pickle.dumps({"model.norm.weight": [1.0] * 64}, protocol=4))
    expect_engine_error(lambda: Engine(m), "model.safetensors", "pickle")


def test_no_checkpoint(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (m / "model.safetensors").unlink()
    expect_engine_error(lambda: Engine(m), "model.safetensors")


def test_missing_model_folder(tmp_path: Path) -> None:
    expect_engine_error(lambda: Engine(tmp_path / "nowhere"), "nowhere")
    (tmp_path / "file").write_text("{}")
    expect_engine_error(lambda: Engine(tmp_path / "file"), "file")


# ---------------------------------------------------------------- sharded checkpoints


Raw = dict[str, tuple[str, list[int], bytes]]


def read_raw(path: Path) -> Raw:
    """name -> (dtype, shape, bytes) of a safetensors file, any dtype (numpy has no bfloat16)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]) for k, v in header.items()}


def write_raw(path: Path, tensors: Raw) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(t[2] for t in tensors.values()))


def shard(model: Path, parts: int = 2) -> dict[str, str]:
    """Splits model.safetensors into `parts` shards plus an index; returns the weight map."""
    tensors = read_raw(model / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::parts]}
        write_raw(model / file, part)
        weight_map.update({n: file for n in part})
    (model / "model.safetensors").unlink()
    index = {"metadata": {"total_size": sum(len(t[2]) for t in tensors.values())}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "llama3-tiny"])
def test_sharded_checkpoint_equals_single_file(tmp_path: Path, name: str) -> None:
    m = copy_model(tmp_path, name)
    shard(m, parts=2 if name != "qwen2-tiny" else 3)
    assert not (m / "model.safetensors").exists()
    single, sharded = Engine(MODELS / name), Engine(m)
    assert sharded.info["parameters"] == single.info["parameters"]
    assert np.array_equal(bits(sharded.logits(PROMPT)), bits(single.logits(PROMPT)))


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    weight_map = shard(m)
    missing = sorted(set(weight_map.values()))[1]
    (m / missing).unlink()
    expect_engine_error(lambda: Engine(m), missing)


def test_index_missing_a_tensor(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    weight_map = shard(m)
    gone = "model.layers.0.mlp.gate_proj.weight"
    file = weight_map[gone]
    tensors = read_raw(m / file)
    del tensors[gone]
    write_raw(m / file, tensors)
    expect_engine_error(lambda: Engine(m), gone, "missing")


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    weight_map = shard(m)
    files = sorted(set(weight_map.values()))
    a, b = read_raw(m / files[0]), read_raw(m / files[1])
    dup = next(iter(a))
    b[dup] = a[dup]
    write_raw(m / files[1], b)
    expect_engine_error(lambda: Engine(m), dup)


@pytest.mark.parametrize("index", ['{"weight_map": {"model.norm.weight": "../model.safetensors"}}', '{"weight_map": {}}', '{"metadata": {}}', "{"])
def test_bad_index(tmp_path: Path, index: str) -> None:
    m = copy_model(tmp_path)
    (m / "model.safetensors.index.json").write_text(index)
    expect_engine_error(lambda: Engine(m), "model.safetensors.index.json")


# ---------------------------------------------------------------- config styles


def to_legacy(cfg: dict[str, Any]) -> None:
    """transformers-5 style -> transformers-4 style."""
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.45.0"


def to_new(cfg: dict[str, Any]) -> None:
    """transformers-4 style -> transformers-5 style."""
    rope = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    rope.update(cfg.pop("rope_scaling", None) or {})
    cfg["rope_parameters"] = rope
    cfg["dtype"] = cfg.pop("torch_dtype")
    cfg["transformers_version"] = "5.0.0"


@pytest.mark.parametrize("name, convert", [("llama-tiny", to_legacy), ("qwen2-tiny", to_legacy), ("llama3-tiny", to_new)])
def test_both_config_styles_load_the_same_model(tmp_path: Path, name: str, convert: Callable[[dict[str, Any]], None]) -> None:
    m = copy_model(tmp_path, name)
    edit_json(m / "config.json", convert)
    converted = json.loads((m / "config.json").read_text())
    assert ("rope_parameters" in converted) != ("rope_theta" in converted)
    a, b = Engine(MODELS / name), Engine(m)
    assert a.info["stored_dtype"] == b.info["stored_dtype"]
    assert np.array_equal(bits(a.logits(PROMPT)), bits(b.logits(PROMPT)))


@pytest.mark.parametrize("name, convert", [("llama-tiny", to_legacy), ("llama3-tiny", lambda c: None), ("llama3-tiny", to_new)])
def test_rope_settings_are_read_in_either_style(tmp_path: Path, name: str, convert: Callable[[dict[str, Any]], None]) -> None:
    """A changed rope_theta (or dropped llama3 scaling) changes the logits in either style, so
    the equality above is not the default settings agreeing with themselves."""
    m = copy_model(tmp_path, name)

    def change(c: dict[str, Any]) -> None:
        convert(c)
        if "rope_parameters" in c:
            c["rope_parameters"]["rope_theta"] *= 3
        else:
            c["rope_theta"] *= 3

    edit_json(m / "config.json", change)
    assert not np.array_equal(Engine(MODELS / name).logits(PROMPT), Engine(m).logits(PROMPT))
    if name == "llama3-tiny":
        m2 = copy_model(tmp_path / "unscaled", name)

        def drop_scaling(c: dict[str, Any]) -> None:
            convert(c)
            if "rope_parameters" in c:
                c["rope_parameters"] = {"rope_theta": c["rope_parameters"]["rope_theta"], "rope_type": "default"}
            else:
                c.pop("rope_scaling")

        edit_json(m2 / "config.json", drop_scaling)
        assert not np.array_equal(Engine(MODELS / name).logits(PROMPT), Engine(m2).logits(PROMPT))


def test_mistral_sliding_window(tmp_path: Path) -> None:
    """llama-tiny relabelled as Mistral: a window covering the prompt changes nothing; a
    window of w changes the logits only from position w on."""
    base = Engine(MODELS / "llama-tiny").logits(PROMPT)
    for window, first_changed in ((64, None), (5, 5)):
        m = copy_model(tmp_path / str(window))
        edit_json(m / "config.json", lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window))
        eng = Engine(m)
        assert eng.info["architecture"] == "MistralForCausalLM"
        got = eng.logits(PROMPT)
        same = [bool(np.array_equal(bits(got[i]), bits(base[i]))) for i in range(len(PROMPT))]
        if first_changed is None:
            assert all(same)
        else:
            assert all(same[:first_changed]) and not any(same[first_changed:])


def test_llama_attention_bias(tmp_path: Path) -> None:
    """attention_bias: true needs q/k/v/o biases; zero biases change nothing, others do."""
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.update(attention_bias=True))
    expect_engine_error(lambda: Engine(m), "model.layers.0.self_attn.q_proj.bias", "missing")
    sizes = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64}
    biases = {f"model.layers.{i}.self_attn.{p}.bias": np.zeros(n, np.float32) for i in range(2) for p, n in sizes.items()}
    edit_tensors(m, lambda t: t.update(biases))
    base = Engine(MODELS / "llama-tiny").logits(PROMPT)
    assert np.array_equal(bits(Engine(m).logits(PROMPT)), bits(base))
    for p in sizes:
        edit_tensors(m, lambda t: t.update({f"model.layers.1.self_attn.{p}.bias": np.full(sizes[p], 0.5, np.float32)}))
        assert not np.array_equal(Engine(m).logits(PROMPT), base), f"a {p} bias has no effect"
        edit_tensors(m, lambda t: t.update({f"model.layers.1.self_attn.{p}.bias": np.zeros(sizes[p], np.float32)}))


def test_tied_embeddings_follow_the_config(tmp_path: Path) -> None:
    """tie_word_embeddings: true ignores a stored lm_head (as transformers does)."""
    m = copy_model(tmp_path)
    edit_json(m / "config.json", lambda c: c.update(tie_word_embeddings=True))
    tied = Engine(m)
    assert tied.info["parameters"] == Engine(MODELS / "llama-tiny").info["parameters"] - 512 * 64
    edit_tensors(m, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    m2 = copy_model(tmp_path / "untied")
    edit_tensors(m2, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert np.array_equal(bits(tied.logits(PROMPT)), bits(Engine(m2).logits(PROMPT)))


def test_unused_files_are_ignored(tmp_path: Path) -> None:
    """A stray pickle beside model.safetensors is never opened; safetensors wins."""
    m = copy_model(tmp_path)
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    (m / "README.md").write_text("hello")
    os.symlink(m / "README.md", m / "extra.json")
    assert np.array_equal(bits(Engine(m).logits(PROMPT)), bits(Engine(MODELS / "llama-tiny").logits(PROMPT)))


def test_a_safetensors_header_length_that_looks_like_pickle_still_loads(tmp_path: Path) -> None:
    # A header length of 0x10280 starts the file with 0x80 0x02, a pickle stream's first two
    # bytes: the file is valid safetensors and must load as such.
    m = copy_model(tmp_path)
    raw = (m / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    target = 0x10280
    assert n < target
    padded = raw[8 : 8 + n] + b" " * (target - n)
    (m / "model.safetensors").write_bytes(target.to_bytes(8, "little") + padded + raw[8 + n :])
    assert (m / "model.safetensors").read_bytes()[:2] == b"\x80\x02"
    ids = [5, 6, 7]
    assert np.array_equal(Engine(m).logits(ids), Engine(MODELS / "llama-tiny").logits(ids))
