"""Chat templates render as transformers renders them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MODEL

from upg_batch.chat import ChatTemplate, MessagesError, load_chat_template

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
