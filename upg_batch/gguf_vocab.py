"""SentencePiece-style vocabularies (byte-fallback BPE over "▁" pieces, as Gemma and Llama 2
use) written as GGUF `llama` tokenizer metadata, the way llama.cpp's converter writes them:
pieces in id order, a score per piece (merge priority: earlier pieces first), token types
(normal, control, user-defined, byte, unknown), the merges too (this engine's reader uses them
as they are; llama.cpp uses the scores), special ids, add_bos/add_eos and the chat template."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["write_sentencepiece_vocab"]

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
# llama.cpp scores control pieces so
_CONTROL_SCORE = -1000.0


def _prepends_space(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a "▁" before the text (Llama 2 yes, Gemma no)."""
    norm = tok.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if any(s.get("type") == "Prepend" for s in steps if isinstance(s, dict)):
        return True
    pre = tok.get("pre_tokenizer") or {}
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") in ("always", "first")


def write_sentencepiece_vocab(w: Any, model_dir: Path, tok: dict[str, Any], vocab_size: int, notes: list[str]) -> None:
    import gguf

    from upg_batch.quantize import QuantizeError

    path = model_dir / "tokenizer.json"
    model = tok["model"]
    text: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        text[i] = a["content"]
    if max(text) >= vocab_size:
        raise QuantizeError(f"{path}: token id {max(text)} is beyond the embedding's {vocab_size} rows (config.json vocab_size)")
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        piece = text.get(i, f"[PAD{i}]")
        tokens.append(piece)
        if i in added and added[i].get("special"):
            types.append(_UNKNOWN if piece == unk else _CONTROL)
            scores.append(_CONTROL_SCORE)
        elif i in added or i not in text:
            types.append(_USER_DEFINED)
            scores.append(_CONTROL_SCORE)
        elif _BYTE_PIECE.match(piece):
            types.append(_BYTE)
            scores.append(0.0)
        else:
            types.append(_UNKNOWN if piece == unk else _NORMAL)
            scores.append(-float(i))  # pieces come in merge order: earlier is merged first
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(_prepends_space(tok))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        notes.append("tokenizer.json has no merges: readers recover them from the scores")
    special.add_special_token.setdefault("bos", True)
    special.add_special_token.setdefault("eos", False)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        import json

        eos = json.loads(gen.read_text()).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else [e for e in eos if isinstance(e, int)] if isinstance(eos, list) else []
        if eos_ids:
            special.special_token_ids.setdefault("eos", eos_ids[0])
        for key, tid in zip(("eot", "eom"), [e for e in eos_ids if e != special.special_token_ids.get("eos")]):
            special.special_token_ids.setdefault(key, tid)
    special.add_to_gguf(w, quiet=True)
