"""Type stubs of the native engine module (native/src/lib.rs), built by maturin as
`upg_batch._native`. The documented API is `upg_batch.engine`; this module takes and returns
plain values. tests/test_engine_stubs.py checks these stubs against the built module."""

from os import PathLike
from typing import Any, Sequence, final

__all__ = [
    "EngineError",
    "NativeEngine",
    "dequantize",
    "gguf_chat_template",
    "gguf_pre_tokenizer",
    "gguf_tokenizer_json",
    "measure_gpu_read_bandwidth",
    "measure_read_bandwidth",
    "measure_fma_peak",
    "quantize",
    "quantize_tensor",
    "weight_format",
]

# (max_tokens, temperature, top_k, top_p, min_p, seed, stop, stop_token_ids, ignore_eos, logprobs)
_NativeParams = tuple[int, float, int, float, float, int | None, Sequence[str], Sequence[int], bool, int | None]
# (token_ids, text, finish_reason, prompt_tokens, ttft_s, latency_s, logprobs); finish_reason
# "stop" | "length"; logprobs None or per token (logprob, [(token id, logprob)] of the top k)
_NativeOutput = tuple[list[int], str, str, int, float, float, list[tuple[float, list[tuple[int, float]]]] | None]

class EngineError(Exception):
    """An error of the native engine: bad model files, bad input, an unavailable backend."""

@final
class NativeEngine:
    def __new__(
        cls,
        model_dir: str | PathLike[str],
        backend: str,
        weights: str,
        threads: int | None,
        max_batch: int,
        context: int | None,
        fused: bool = True,
        activations: str = ...,
        kv_cache: str = ...,
        kv_cache_bytes: int | None = None,
    ) -> NativeEngine: ...
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def logits(self, ids: Sequence[int]) -> tuple[bytes, int, int]:
        """(float32 bytes, rows, vocab)"""
    def generate(self, prompts: Sequence[str | Sequence[int]], params: Sequence[_NativeParams]) -> list[_NativeOutput]: ...
    def info(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, int | float]: ...

def quantize(values: bytes, format: str) -> bytes:
    """GGUF/ggml blocks of little-endian f32 `values` (whole blocks) in `format` (q8_0, q4_0,
    q5_0, q4_k, q6_k), quantized as ggml's reference quantizer does."""

def dequantize(blocks: bytes, format: str) -> bytes:
    """The weights of whole blocks of `format`, as little-endian f32 bytes."""

def quantize_tensor(data: bytes, dtype: str, cols: int, format: str) -> bytes:
    """`data` (little-endian `dtype` values: f32, f16 or bf16; whole rows of `cols`) in
    `format` (f32, f16, bf16 or a block format whose blocks divide a row), converted exactly as
    the engine converts a checkpoint matrix it loads in that format. ValueError otherwise."""

def weight_format(name: str, scheme: str, layers: int, tied: bool, stored: str, cols: int) -> tuple[str, bool]:
    """The format the engine holds checkpoint matrix `name` (Hugging Face names) in under the
    `weights=` scheme (f32, ..., q4_k_m, stored) for a model of `layers` layers (`tied`: the
    embedding is the output matrix), stored as `stored` with rows of `cols`; and whether that
    is the f16 fallback for rows that are not whole blocks."""

def gguf_pre_tokenizer(pre: str) -> str | None:
    """The pre-tokenizer (tokenizer.json's JSON) the engine builds for a GGUF file whose
    `tokenizer.ggml.pre` is `pre`; None for a name it does not know."""

def measure_fma_peak(threads: int = 1) -> float: ...
def measure_read_bandwidth(bytes: int = ..., threads: int = 1, repeats: int = 5) -> float:
    """Memory read bandwidth of this machine in bytes/s: the best of `repeats` parallel reads
    of a `bytes`-sized buffer on `threads` threads (for benchmarks' ceilings)."""

def measure_gpu_read_bandwidth(bytes: int = ..., repeats: int = 10) -> tuple[float, str]:
    """Streaming read bandwidth of the GPU in bytes/s through a plain WGSL kernel, and the
    adapter's name (the adapter the `gpu` backend would use)."""

def gguf_chat_template(path: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A GGUF file's chat template (None if it has none) and special-token texts, from its
    metadata only."""

def gguf_tokenizer_json(path: str) -> str:
    """A GGUF file's tokenizer, built from its metadata as the engine builds it, as the
    tokenizer.json of a Hugging Face folder."""
