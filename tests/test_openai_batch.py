"""OpenAI Batch API files: a .jsonl of chat and completion requests (bad lines included, n and
logprobs asked for) through a real local Ray job, results written as the API's result lines,
read back as the API documents them; resume after a driver kill; the line scanner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MODEL, write_job
from test_runner_driver_kill import _cli, _committed, _kill_group, kill_driver_after_commits

from upg_batch.cli import main
from upg_batch.commit import SUCCESS
from upg_batch.openai_batch import parse_request, scan_lines

pytestmark = pytest.mark.usefixtures("local_ray")


def request(i: int) -> dict:
    if i % 3 == 0:
        body = {"model": "anything", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": f"Tell me about {i}."}]}], "max_completion_tokens": 5}
        return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": f"Once upon a time {i}", "max_tokens": 4, "temperature": 0}}


def write_requests(path: Path, n: int) -> dict[str, str]:
    """n requests, some with n/logprobs/stop, and bad lines; returns custom_id -> what is wrong."""
    lines, bad = [], {}
    for i in range(n):
        r = request(i)
        if i == 4:
            r["body"].update({"n": 3, "temperature": 0.9, "seed": 5, "logprobs": 2})
        if i == 6:
            r["body"].update({"logprobs": True, "top_logprobs": 3})
        if i == 7:
            r["body"]["stop"] = ["\n", "x"]
        lines.append(json.dumps(r))
    lines[2] = '{"custom_id": "req-2", "method": "POST", "url": "/v1/embeddings", "body": {}}'
    bad["req-2"] = "url must be"
    lines[5] = "this is not json"
    bad["requests.jsonl:6"] = "not valid JSON"
    lines[8] = json.dumps({"custom_id": "req-8", "url": "/v1/chat/completions", "body": {"messages": "hi"}})
    bad["req-8"] = "body.messages must be a non-empty list"
    path.write_text("\n".join(lines) + "\n")
    return bad


def results(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for f in sorted(out.glob("part-*.jsonl")) for line in f.read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in lines}
    assert len(by_id) == len(lines), "a custom_id answered twice"
    return by_id


def test_a_batch_file_runs_and_answers_as_the_api_does(tmp_path: Path) -> None:
    data = tmp_path / "requests.jsonl"
    bad = write_requests(data, 40)
    out = tmp_path / "out"
    job = write_job(tmp_path, data, out, input={"shard_rows": 6}, output={"format": "openai"})
    assert main(["run", str(job)]) == 0
    got = results(out)
    assert len(got) == 40 and (out / SUCCESS).exists()
    for cid, why in bad.items():
        assert got[cid]["response"] is None and why in got[cid]["error"]["message"], got[cid]
    ok = {cid: r for cid, r in got.items() if cid not in bad}
    for cid, r in ok.items():
        i = int(cid.split("-")[1])
        assert r["error"] is None and r["id"].startswith("batch_req_")
        resp = r["response"]
        assert resp["status_code"] == 200
        body = resp["body"]
        assert body["model"] == MODEL.name
        choice = body["choices"][0]
        if i % 3 == 0:
            assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
            assert isinstance(choice["message"]["content"], str)
        else:
            assert body["object"] == "text_completion" and isinstance(choice["text"], str)
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
    four = ok["req-4"]["response"]["body"]
    assert [c["index"] for c in four["choices"]] == [0, 1, 2]
    assert four["usage"]["completion_tokens"] <= 3 * 4
    for c in four["choices"]:  # completions API logprobs: tokens, token_logprobs, top_logprobs
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
        assert all(len(t) <= 2 for t in lp["top_logprobs"]) and all(v <= 0 for v in lp["token_logprobs"])
    six = ok["req-6"]["response"]["body"]["choices"][0]["logprobs"]["content"]  # chat API logprobs
    assert six and all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 and isinstance(e["token"], str) for e in six)
    assert ok["req-1"]["response"]["body"]["choices"][0]["logprobs"] is None
    # what `show` prints of such a folder
    assert main(["show", str(out)]) == 0


def test_a_killed_batch_job_resumes_to_one_answer_per_request(tmp_path: Path) -> None:
    data = tmp_path / "requests.jsonl"
    write_requests(data, 48)
    out = tmp_path / "out"
    job = write_job(tmp_path, data, out, input={"shard_rows": 6}, output={"format": "openai"})
    log = tmp_path / "log.txt"
    kill_driver_after_commits(job, out, log)
    assert 2 <= _committed(out) < 8 and not (out / SUCCESS).exists()
    again = _cli(job, log)
    try:
        assert again.wait(timeout=240) == 0, log.read_text()
    finally:
        _kill_group(again)
    got = results(out)
    assert sorted(got) == sorted({f"req-{i}" for i in range(48) if i != 5} | {"requests.jsonl:6"})
    # the same job uninterrupted answers every request with the same choices
    ref = tmp_path / "ref"
    assert main(["run", str(write_job(tmp_path, data, ref, input={"shard_rows": 6}, output={"format": "openai"}))]) == 0
    want = results(ref)
    strip = lambda r: None if r["response"] is None else [c.get("text") or c.get("message") for c in r["response"]["body"]["choices"]]  # noqa: E731
    assert {k: strip(v) for k, v in got.items()} == {k: strip(v) for k, v in want.items()}


def test_the_line_scanner_finds_every_shards_first_byte(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    lines = [f'{{"n": {i}, "pad": "{"y" * (i % 7)}"}}' for i in range(23)]
    p.write_text("\n".join(lines))  # no newline after the last line
    n, offsets = scan_lines(str(p), 5)
    assert n == 23 and len(offsets) == 5
    raw = p.read_bytes()
    for k, off in enumerate(offsets):
        assert raw[off:].split(b"\n", 1)[0] == lines[5 * k].encode()
    assert scan_lines(str(tmp_path / "x.jsonl"), 100) == (23, (0,))
    (tmp_path / "empty.jsonl").write_text("")
    assert scan_lines(str(tmp_path / "empty.jsonl"), 5) == (0, (0,))


@pytest.mark.parametrize("line, needle", [
    (b"", "empty line"), (b"[1]", "not a JSON object"), (b'{"url": "/v1/completions", "body": {"prompt": "x"}}', "custom_id"),
    (b'{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}', "method must be POST"),
    (b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": 3}}', "body.prompt"),
    (b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 0}}', "body.max_tokens"),
    (b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "stop": [""]}}', "body.stop"),
    (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}', "content"),
])
def test_bad_requests_name_the_field(line: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_request(line, 1)
