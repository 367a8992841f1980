"""Jobs with sampling.n > 1 and sampling.logprobs: the `samples` and `logprobs` output columns,
reproducible across runs and shardings, error rows null there, and the config checks."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_output, write_job, write_prompts

from upg_batch.config import OUTPUT_COLUMNS, ConfigError, load_config
from upg_batch.fingerprint import config_fields
from upg_batch.runner import Runner

SAMPLING = {"max_tokens": 5, "temperature": 0.9, "seed": 7, "n": 3, "logprobs": 2}


def _rows(job: Path, out: Path) -> tuple[dict, dict]:
    summary = Runner(load_config(job)).run()
    return {r["id"]: r for r in read_output(out).to_pylist()}, summary


@pytest.mark.usefixtures("local_ray")
def test_n_samples_and_logprobs_are_written_as_list_columns(tmp_path: Path) -> None:
    data = write_prompts(tmp_path / "d.parquet", 10, label=pa.array([f"L{i}" for i in range(10)]))
    # row 4's prompt is empty: an error row, with null samples and logprobs
    table = pq.read_table(data)
    table = table.set_column(table.column_names.index("prompt"), "prompt", pa.array([p if i != 4 else "" for i, p in enumerate(table.column("prompt").to_pylist())]))
    pq.write_table(table, data)
    out = tmp_path / "out"
    job = write_job(tmp_path, data, out, sampling=SAMPLING, output={"passthrough": ["label"]})
    rows, summary = _rows(job, out)
    assert read_output(out).column_names == [*OUTPUT_COLUMNS, "logprobs", "samples", "label"]
    generated = 0
    for i, r in rows.items():
        if i == 4:
            assert r["error"] and r["samples"] is None and r["logprobs"] is None
            continue
        samples = r["samples"]
        assert len(samples) == 3
        assert (samples[0]["completion"], samples[0]["finish_reason"], samples[0]["completion_tokens"]) == (r["completion"], r["finish_reason"], r["completion_tokens"])
        assert samples[0]["logprobs"] == r["logprobs"] and len(r["logprobs"]) == r["completion_tokens"]
        for s in samples:
            assert len(s["logprobs"]) == s["completion_tokens"]
            for lp in s["logprobs"]:
                assert lp["logprob"] <= 0 and len(lp["top"]) == 2 and lp["top"][0]["logprob"] >= lp["top"][1]["logprob"]
        generated += sum(s["completion_tokens"] for s in samples)
    assert summary["completion_tokens"] == generated  # every sample's tokens count
    # the same job with another sharding: the same samples (seeds derive from the row id)
    out2 = tmp_path / "out2"
    rows2, _ = _rows(write_job(tmp_path, data, out2, sampling=SAMPLING, input={"shard_rows": 3}, output={"passthrough": ["label"]}), out2)
    assert {i: r["samples"] for i, r in rows2.items()} == {i: r["samples"] for i, r in rows.items()}


def test_n_and_logprobs_are_checked_and_leave_old_fingerprints_alone(tmp_path: Path) -> None:
    data = write_prompts(tmp_path / "d.parquet", 2)
    for bad, needle in [({"n": 0}, "sampling.n"), ({"n": 200}, "sampling.n"), ({"logprobs": 21}, "sampling.logprobs")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(write_job(tmp_path, data, sampling=bad))
    with pytest.raises(ConfigError, match="'samples' clashes"):
        load_config(write_job(tmp_path, data, sampling={"n": 2}, output={"passthrough": ["samples"]}))
    plain = config_fields(load_config(write_job(tmp_path, data)))["sampling"]
    assert "n" not in plain and "logprobs" not in plain
    assert config_fields(load_config(write_job(tmp_path, data, sampling={"n": 2})))["sampling"]["n"] == 2
