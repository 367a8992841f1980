"""OpenAI Batch API files: requests in (an `input.path` of `.jsonl` files) and results out
(`output.format: openai`).

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}`; the body's `messages` (chat) or `prompt` (completions),
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `n`, and
`logprobs` / `top_logprobs` are read, the rest (`model` included: the job's model answers) is
ignored. A line that is not JSON or not such a request becomes an error row naming the line
and the field. The driver never loads a file: planning streams it once to count lines and note
the byte offset of every shard's first line; each actor reads only its shard's bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pyarrow as pa

__all__ = ["REQUEST_SCHEMA", "RequestError", "read_requests", "result_lines", "scan_lines"]

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# What a shard of request lines becomes: the columns the runner reads from Parquet rows, plus
# `url` (which API the result answers as) and `_request_error` (why a line is no request).
REQUEST_SCHEMA = pa.schema([
    ("custom_id", pa.string()),
    ("url", pa.string()),
    ("prompt", pa.string()),
    ("messages", MESSAGE_TYPE),
    ("max_tokens", pa.int64()),
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("seed", pa.int64()),
    ("stop", pa.list_(pa.string())),
    ("n", pa.int64()),
    ("logprobs", pa.int64()),
    ("_request_error", pa.string()),
])
OVERRIDES = ("max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs")
_BLOCK = 1 << 20


class RequestError(ValueError):
    """A line that is not a valid batch request; the message names the field."""


def scan_lines(path: str, every: int) -> tuple[int, tuple[int, ...]]:
    """(lines in the file, byte offset of lines 0, every, 2 * every, ...), streaming the file
    once in blocks. A last line without a newline counts; an empty file has no lines."""
    offsets = [0]
    lines, pos, pending = 0, 0, False
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            start = 0
            while (nl := block.find(b"\n", start)) != -1:
                lines += 1
                start = nl + 1
                if lines % every == 0:
                    offsets.append(pos + start)
            pending = start < len(block)
            pos += len(block)
    if pending:
        lines += 1
    return lines, tuple(offsets)


def read_requests(path: str, key: str, offset: int, first_line: int, count: int) -> pa.Table:
    """`count` request lines from byte `offset` (line number `first_line`) as REQUEST_SCHEMA
    rows; a line that is not a request gets only its id and `_request_error`."""
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        for k in range(count):
            raw = f.readline()
            lineno = first_line + k + 1  # 1-based, as editors count
            try:
                rows.append(parse_request(raw, lineno))
            except RequestError as e:
                rows.append({"custom_id": _custom_id(raw) or f"{key}:{lineno}", "_request_error": f"{key} line {lineno}: {e}"})
    return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)


def _custom_id(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and cid else None


def _int(body: dict[str, Any], name: str, low: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise RequestError(f"body.{name} must be an integer >= {low}, got {v!r}")
    return v


def _number(body: dict[str, Any], name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise RequestError(f"body.{name} must be a number, got {v!r}")
    return float(v)


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise RequestError(f"{where} must be a string or a list of text parts")


def parse_request(raw: bytes, lineno: int) -> dict[str, Any]:
    """One request line as a REQUEST_SCHEMA row (without `_request_error`)."""
    if not raw.strip():
        raise RequestError("empty line")
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise RequestError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RequestError("not a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise RequestError("custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise RequestError(f"method must be POST, got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise RequestError(f"url must be {CHAT_URL} or {COMPLETIONS_URL}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise RequestError("body must be an object")
    row: dict[str, Any] = {"custom_id": cid, "url": url}
    if url == CHAT_URL:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("body.messages must be a non-empty list")
        out = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"body.messages[{j}] must be an object with a role")
            out.append({"role": m["role"], "content": _content(m.get("content"), f"body.messages[{j}].content")})
        row["messages"] = out
        top = _int(body, "top_logprobs", 0)
        wants = body.get("logprobs")
        if wants not in (None, True, False):
            raise RequestError(f"body.logprobs must be true or false, got {wants!r}")
        row["logprobs"] = (top or 0) if wants else None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("body.prompt must be a string")
        row["prompt"] = prompt
        row["logprobs"] = _int(body, "logprobs", 0)
    row["max_tokens"] = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
    row["temperature"] = _number(body, "temperature")
    row["top_p"] = _number(body, "top_p")
    row["seed"] = _int(body, "seed", 0)
    row["n"] = _int(body, "n", 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("body.stop must be a string or a list of non-empty strings")
    row["stop"] = stop
    return row


def _hash(*parts: Any) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:24]


def _logprobs(entries: list[dict[str, Any]] | None, chat: bool) -> Any:
    if entries is None:
        return None
    if chat:
        return {"content": [
            {"token": e["token"], "token_id": e["token_id"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "token_id": t["token_id"], "logprob": t["logprob"]} for t in e["top"]]}
            for e in entries
        ]}
    return {
        "tokens": [e["token"] for e in entries],
        "token_ids": [e["token_id"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries],
    }


def result_lines(batch: pa.RecordBatch, model: str) -> bytes:
    """A committed shard's rows as result lines of the Batch API: `{"id", "custom_id",
    "response": {"status_code": 200, "request_id", "body"}, "error": null}`; a row that could
    not run has `"response": null` and `"error": {"code", "message"}` naming why."""
    created = int(time.time())
    out = []
    for row in batch.to_pylist():
        cid, url = row["id"], row.get("url") or COMPLETIONS_URL
        req = _hash(cid, url)
        line: dict[str, Any] = {"id": f"batch_req_{req}", "custom_id": cid, "error": None}
        if row["error"] is not None:
            line["response"] = None
            line["error"] = {"code": "invalid_request", "message": row["error"]}
        else:
            chat = url == CHAT_URL
            samples = row.get("samples") or [{"completion": row["completion"], "finish_reason": row["finish_reason"], "completion_tokens": row["completion_tokens"], "logprobs": row.get("logprobs")}]
            choices = []
            for j, s in enumerate(samples):
                choice: dict[str, Any] = {"index": j, "finish_reason": s["finish_reason"], "logprobs": _logprobs(s.get("logprobs"), chat)}
                if chat:
                    choice["message"] = {"role": "assistant", "content": s["completion"]}
                else:
                    choice["text"] = s["completion"]
                choices.append(choice)
            completion_tokens = sum(s["completion_tokens"] for s in samples)
            line["response"] = {"status_code": 200, "request_id": req, "body": {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{req}",
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": {"prompt_tokens": row["prompt_tokens"], "completion_tokens": completion_tokens, "total_tokens": row["prompt_tokens"] + completion_tokens},
            }}
        out.append(json.dumps(line, ensure_ascii=False))
    return ("\n".join(out) + "\n").encode() if out else b""
