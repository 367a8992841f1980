"""Chat templates render as transformers renders them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MODEL

from upg_batch.chat import ChatTemplate, ChatTemplateError, MessagesError, load_chat_template

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_demo_model_template_with_special_tokens():
    t = load_chat_template(MODEL)
    assert t is not None
    assert t.render(MSGS) == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n<|assistant|>\n"


def test_trim_blocks_and_lstrip_blocks_as_transformers():
    # transformers compiles with trim_blocks=True, lstrip_blocks=True: the newline after a
    # block tag and the indentation before it disappear
    src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}"
    assert ChatTemplate(src, {}).render(MSGS) == "U:Hi\nA:"


def test_raise_exception_and_tojson_and_generation_tag():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok", {})
    with pytest.raises(MessagesError, match="first must be user"):
        t.render(MSGS)
    # tojson keeps non-ASCII text, as transformers' filter does
    assert ChatTemplate("{{ messages[0].content | tojson }}", {}).render([{"role": "user", "content": "é"}]) == '"é"'
    g = ChatTemplate("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}", {})
    assert g.render(MSGS) == "[Be brief.][Hi]"


def test_sandbox_blocks_unsafe_access():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(Exception):
        t.render(MSGS)


@pytest.mark.parametrize(
    "bad, why",
    [
        (None, "null"),
        ("hello", "must be a list"),
        ([], "empty"),
        (["x"], "not a {role, content} mapping"),
        ([{"role": "user"}], "content must be a string"),
        ([{"role": "", "content": "x"}], "role must be a non-empty string"),
    ],
)
def test_malformed_messages(bad, why):
    t = load_chat_template(MODEL)
    with pytest.raises(MessagesError, match=why):
        t.render(bad)


def test_template_sources(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}D"}, {"name": "tool_use", "template": "T"}]}))
    assert load_chat_template(tmp_path).render(MSGS) == "<s>D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages|length }}")
    assert load_chat_template(tmp_path).render(MSGS) == "J2"
    assert load_chat_template(Path(__file__).parent / "fixtures" / "models" / "llama-tiny") is None


def test_bad_tokenizer_config_json_names_the_file(tmp_path: Path):
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text('{"chat_template": "x",')
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: not valid JSON"):
        load_chat_template(tmp_path)
    cfg.write_text("[1, 2]")
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: not a JSON object"):
        load_chat_template(tmp_path)


def test_template_syntax_error_names_the_file_and_line(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "ok\n{% for m in messages %}{{ m.content }"}))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json \(chat_template\): the chat template has a syntax error at line 2"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja: the chat template has a syntax error at line 1"):
        load_chat_template(tmp_path)


@pytest.mark.parametrize("content, why", [('{"chat_template": ', "not valid JSON"), ('{"chat_template": "{% for %}"}', "syntax error")])
def test_cli_bad_chat_template_is_a_bad_job_with_one_line(tmp_path: Path, capsys, content, why):
    import shutil

    from conftest import write_job, write_prompts

    from upg_batch.cli import main

    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "tokenizer_config.json").write_text(content)
    job = write_job(tmp_path, write_prompts(tmp_path / "d.parquet", 2), tmp_path / "out", model={"path": str(model)})
    for command in ("validate", "run"):
        assert main([command, str(job)]) == 2, command
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("upg-batch: error:")]
        assert len(errors) == 1 and "tokenizer_config.json" in errors[0] and why in errors[0], errors
    assert not (tmp_path / "out").exists()
