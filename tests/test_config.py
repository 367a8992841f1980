"""The job file: validation, suggestions, defaults, path resolution, and the CLI's answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from upg_batch.cli import main
from upg_batch.config import ConfigError, JobConfig, load_config, parse_config

BASE = {"model": {"path": "m"}, "input": {"path": "data/"}, "output": {"path": "out/"}}


def _with(section: str, **values):
    data = {k: dict(v) for k, v in BASE.items()}
    data.setdefault(section, {}).update(values)
    return data


def test_defaults_are_sensible():
    cfg = parse_config(BASE)
    assert cfg.model.backend == "cpu" and cfg.model.weights is None and cfg.model.max_batch == 32
    assert cfg.model.fused is True
    assert cfg.sampling.max_tokens == 128 and cfg.sampling.temperature == 0.0
    assert cfg.output.format == "arrow" and cfg.output.passthrough == ()
    assert cfg.cluster.address is None and cfg.cluster.max_attempts == 3
    assert cfg.metrics.host == "127.0.0.1" and cfg.metrics.port == 9464


@pytest.mark.parametrize(
    "data, wrong, hint",
    [
        (_with("sampling", max_token=5), "sampling.max_token", "sampling.max_tokens"),
        (_with("model", bakend="cpu"), "model.bakend", "model.backend"),
        (_with("input", prompt_colum="p"), "input.prompt_colum", "input.prompt_column"),
        ({**BASE, "sampeling": {}}, "sampeling", "sampling"),
    ],
)
def test_unknown_key_names_the_nearest_valid_one(data, wrong, hint):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert f"unknown key '{wrong}'" in str(e.value)
    assert f"did you mean '{hint}'" in str(e.value)


def test_unknown_key_without_a_near_name_has_no_suggestion():
    with pytest.raises(ConfigError, match="unknown key 'model.zzzzzz'") as e:
        parse_config(_with("model", zzzzzz=1))
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize(
    "data, field",
    [
        (_with("sampling", max_tokens="many"), "sampling.max_tokens"),
        (_with("sampling", max_tokens=0), "sampling.max_tokens"),
        (_with("sampling", temperature=True), "sampling.temperature"),
        (_with("sampling", top_p=1.5), "sampling.top_p"),
        (_with("model", backend="tpu"), "model.backend"),
        (_with("model", backend="GPU"), "model.backend"),
        (_with("model", backend="metal"), "model.backend"),
        (_with("model", fused="yes"), "model.fused"),
        (_with("model", fused=1), "model.fused"),
        (_with("model", fused=None), "model.fused"),
        (_with("model", max_batch="8"), "model.max_batch"),
        (_with("output", format="csv"), "output.format"),
        (_with("input", shard_rows=0), "input.shard_rows"),
        (_with("output", passthrough=["completion"]), "output.passthrough"),
    ],
)
def test_wrong_type_or_value_names_the_field(data, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        parse_config(data)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "auto"])
@pytest.mark.parametrize("fused", [True, False])
def test_backend_and_fused_values(backend, fused):
    m = parse_config(_with("model", backend=backend, fused=fused)).model
    assert m.backend == backend and m.fused is fused


def test_a_bad_backend_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        parse_config(_with("model", backend="cuda"))
    assert "'model.backend'" in str(e.value) and "'cuda'" in str(e.value)
    assert all(f"'{name}'" in str(e.value) for name in ("cpu", "gpu", "auto"))


def test_fused_misspelled_is_suggested():
    with pytest.raises(ConfigError, match="did you mean 'model.fused'"):
        parse_config(_with("model", fuse=False))


def test_a_gpu_job_with_one_actor_per_gpu_parses(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m, backend: gpu, fused: false}\ninput: {path: d}\noutput: {path: o}\ncluster: {actors: per_gpu}\n")
    cfg = load_config(job)
    assert (cfg.model.backend, cfg.model.fused, cfg.cluster.actors) == ("gpu", False, "per_gpu")


def test_engine_kwargs_are_every_model_field_and_engine_takes_them():
    import inspect

    from upg_batch.engine import Engine

    m = parse_config(_with("model", backend="auto", weights="bf16", threads=2, max_batch=4, context=64, fused=False, activations="f32", kv_cache="f16", kv_cache_bytes=4096)).model
    kwargs = m.engine_kwargs()
    assert kwargs == {"backend": "auto", "weights": "bf16", "threads": 2, "max_batch": 4, "context": 64, "fused": False, "activations": "f32", "kv_cache": "f16", "kv_cache_bytes": 4096}
    assert set(kwargs) == set(type(m).model_fields) - {"path"}
    params = inspect.signature(Engine.__init__).parameters
    assert set(kwargs) == set(params) - {"self", "model_dir"}, "Engine's arguments and the model section differ"


def test_validate_report_names_the_backend():
    from upg_batch.validate import format_report

    model = {"path": "/m", "architecture": "LlamaForCausalLM", "context": 64, "chat_template": False}
    report = {"model": model, "files": 1, "rows": 2, "shards": 1, "prompt_tokens": 5, "too_long": 0, "error_rows": 0, "error_kinds": {}, "examples": []}
    gpu = format_report({**report, "model": {**model, "backend": "gpu", "adapter": "Apple M2"}})
    assert "backend gpu on Apple M2," in gpu.splitlines()[0]
    cpu = format_report({**report, "model": {**model, "backend": "cpu", "adapter": None}})
    assert "backend cpu," in cpu.splitlines()[0]


def test_missing_section_is_named():
    with pytest.raises(ConfigError, match="'output' is required"):
        parse_config({"model": {"path": "m"}, "input": {"path": "x"}})


def test_stop_accepts_one_string_or_a_list():
    assert parse_config(_with("sampling", stop="###")).sampling.stop == ("###",)
    assert parse_config(_with("sampling", stop=["a", "b"])).sampling.stop == ("a", "b")
    with pytest.raises(ConfigError, match="sampling.stop"):
        parse_config(_with("sampling", stop=[""]))


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path):
    sub = tmp_path / "jobs"
    sub.mkdir()
    job = sub / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"path": "../models/x"}, "input": {"path": "data/*.parquet"}, "output": {"path": "/abs/out"}}))
    cfg = load_config(job)
    assert cfg.model.path == tmp_path / "models" / "x"
    assert cfg.input.path == str(sub / "data" / "*.parquet")
    assert cfg.output.path == Path("/abs/out")


def test_not_a_mapping_and_bad_yaml(tmp_path: Path):
    p = tmp_path / "job.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)
    p.write_text("model: {path: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_every_field_is_documented():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    for section_name, field in JobConfig.model_fields.items():
        model = field.annotation
        assert f"`{section_name}`" in doc, section_name
        for name in getattr(model, "model_fields", ()):  # top-level fields that are not sections have none
            assert f"`{section_name}.{name}`" in doc, f"{section_name}.{name} is not in docs/config.md"


def test_cli_bad_config_exits_non_zero_with_one_line(tmp_path: Path, capsys):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(_with("sampling", max_tokenz=3)))
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown key 'sampling.max_tokenz'" in err[0] and "did you mean 'sampling.max_tokens'" in err[0]


def test_cli_missing_job_file(tmp_path: Path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the job file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["validate", "--help"], ["show", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: upg-batch" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, field",
    [
        ("temperature: .inf", "sampling.temperature"),
        ("temperature: .nan", "sampling.temperature"),
        ("max_tokens: 100000000000000000000", "sampling.max_tokens"),
        ("max_tokens: 1e20", "sampling.max_tokens"),
        ("max_tokens: 1.0e+20", "sampling.max_tokens"),
        ("max_tokens: 2147483648", "sampling.max_tokens"),
        ("top_k: 2147483648", "sampling.top_k"),
        ("min_p: .inf", "sampling.min_p"),
    ],
)
def test_out_of_range_sampling_fails_at_config_time(tmp_path: Path, capsys, text, field):
    """The job's sampling values meet the limits a row's values meet: an infinite temperature
    or a max_tokens past 2**31 - 1 is a bad job (exit 2), not a job of error rows."""
    p = tmp_path / "job.yaml"
    p.write_text(f"model: {{path: m}}\ninput: {{path: d}}\noutput: {{path: o}}\nsampling: {{{text}}}\n")
    assert main(["run", str(p)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"'{field}'" in line


def test_sampling_limits_are_the_ones_a_row_meets():
    from upg_batch.engine import SamplingParams

    assert parse_config(_with("sampling", max_tokens=2**31 - 1, top_k=2**31 - 1)).sampling.max_tokens == 2**31 - 1
    SamplingParams(max_tokens=2**31 - 1, top_k=2**31 - 1)
    for name, value in (("max_tokens", 2**31), ("temperature", float("inf")), ("top_k", 2**31)):
        with pytest.raises(ConfigError, match=f"'sampling.{name}'"):
            parse_config(_with("sampling", **{name: value}))
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})


@pytest.mark.parametrize(
    "content, expect",
    [
        ("model: {path: café}\ninput: {path: d}\noutput: {path: o}\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 17)"),
        (("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested deeper than 64 levels"),
        ("".join(" " * i + "k:\n" for i in range(5000)).encode(), "nested deeper than 64 levels"),
        (b"model: {path: m}\ninput: {path: d}\noutput: {path: o}\nsampling:\n  max_tokens: 5\n  max_tokens: 6\n", "duplicate key 'sampling.max_tokens' (line 6; first given on line 5)"),
        (b"model: {path: m}\ninput: {path: d}\noutput: {path: o}\nmodel: {path: x}\n", "duplicate key 'model' (line 4; first given on line 1)"),
    ],
    ids=["latin-1", "nested-flow", "nested-block", "duplicate-field", "duplicate-section"],
)
def test_a_job_file_that_cannot_be_read_as_a_job_is_named(tmp_path: Path, capsys, content: bytes, expect: str):
    p = tmp_path / "job.yaml"
    p.write_bytes(content)
    for command in ("run", "validate"):
        assert main([command, str(p)]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"upg-batch: error: {p}: ") and expect in line, line


def test_yaml_merges_and_aliases_are_not_duplicates(tmp_path: Path):
    p = tmp_path / "job.yaml"
    p.write_text("model: {path: m}\ninput: &in {path: d}\noutput: {<<: *in, path: o}\nsampling: {stop: &s [a], max_tokens: 3}\n")
    cfg = load_config(p)
    assert cfg.output.path == tmp_path / "o" and cfg.sampling.stop == ("a",)


@pytest.mark.parametrize("text, bar", [("off", "off"), ("on", "on"), ("'off'", "off"), ("auto", "auto"), ("false", "off"), ("yes", "on")])
def test_progress_bar_unquoted_on_and_off(tmp_path: Path, text: str, bar: str):
    """YAML 1.1 reads an unquoted off/on (no/yes) as a boolean: accepted as the word."""
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{path: m}}\ninput: {{path: d}}\noutput: {{path: o}}\nprogress: {{bar: {text}}}\n")
    assert load_config(job).progress.bar == bar


def test_max_error_fraction_is_a_top_level_key():
    assert parse_config(BASE).max_error_fraction == 0.1
    assert parse_config({**BASE, "max_error_fraction": 1}).max_error_fraction == 1.0
    with pytest.raises(ConfigError, match="'max_error_fraction'"):
        parse_config({**BASE, "max_error_fraction": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'max_error_fraction'"):
        parse_config({**BASE, "max_errors_fraction": 0.5})


def test_set_overrides_dotted_keys_with_yaml_values_and_the_files_validation(tmp_path: Path, monkeypatch):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_with("sampling", max_tokens=5)))
    cfg = load_config(job, ["sampling.max_tokens=8", "sampling.stop=[a, b]", "progress.bar=off", "model.context=null", "input.limit=3"])
    assert cfg.sampling.max_tokens == 8 and cfg.sampling.stop == ("a", "b") and cfg.progress.bar == "off"
    assert cfg.model.context is None and cfg.input.limit == 3
    assert load_config(job, ["max_error_fraction=0.5"]).max_error_fraction == 0.5
    # paths set on the command line are relative to the current folder
    monkeypatch.chdir(tmp_path / ".." )
    assert load_config(job, ["output.path=elsewhere"]).output.path == (tmp_path / ".." / "elsewhere").resolve()
    with pytest.raises(ConfigError, match="unknown key 'sampling.max_token'.*did you mean 'sampling.max_tokens'"):
        load_config(job, ["sampling.max_token=8"])
    with pytest.raises(ConfigError, match="'sampling.max_tokens'"):
        load_config(job, ["sampling.max_tokens=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(job, ["sampling.max_tokens"])
    with pytest.raises(ConfigError, match="'model.path' .* is not a section"):
        load_config(job, ["model.path.x=1"])


def test_cli_set_limit_and_max_error_fraction_reach_the_config(tmp_path: Path, capsys, monkeypatch):
    """`validate` takes the same options as `run`: a bad --set value is named in one line."""
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert main(["validate", "--set", "sampling.temperature=hot", str(p)]) == 2
    assert "'sampling.temperature'" in capsys.readouterr().err
    assert main(["run", "--limit", "0", str(p)]) == 2
    assert "'input.limit'" in capsys.readouterr().err
    assert main(["run", "--max-error-fraction", "2", str(p)]) == 2
    assert "'max_error_fraction'" in capsys.readouterr().err


def test_version(capsys):
    import upg_batch

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"upg-batch {upg_batch.__version__}"
