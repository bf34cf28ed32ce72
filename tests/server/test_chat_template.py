"""Chat templates render exactly what transformers' apply_chat_template renders."""

from __future__ import annotations

import json
import shutil

import pytest

from dsv3.api import TINY_CHECKPOINT
from dsv3.errors import Dsv3Error, RequestError
from dsv3.server.chat_template import ChatTemplate

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>greeting</think>Hello!"},
     {"role": "user", "content": "Bye ünïcödé 你好"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
     {"role": "tool", "tool_call_id": "call_2", "content": "rain"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY_CHECKPOINT))


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tiny_template_matches_transformers(hf_tokenizer, messages, tools, add_generation_prompt):
    ours = ChatTemplate.load(TINY_CHECKPOINT).render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                              tokenize=False)
    assert ours == theirs


def test_tiny_template_is_deepseek_v3s_format():
    text = ChatTemplate.load(TINY_CHECKPOINT).render(CONVERSATIONS[1])
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                    "<｜User｜>Bye ünïcödé 你好<｜Assistant｜>")


R1_STYLE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}"
            "{% else %}{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def test_override_file_matches_transformers_and_raise_exception_is_a_request_error(tmp_path, hf_tokenizer):
    path = tmp_path / "r1.jinja"
    path.write_text(R1_STYLE)
    template = ChatTemplate.load(TINY_CHECKPOINT, override=path)
    messages = [{"role": "user", "content": "2+2?"}]
    assert template.render(messages) == hf_tokenizer.apply_chat_template(
        messages, chat_template=R1_STYLE, add_generation_prompt=True, tokenize=False)
    assert template.render(messages).endswith("<｜Assistant｜><think>\n")
    with pytest.raises(RequestError, match="unsupported role system") as error:
        template.render([{"role": "system", "content": "x"}])
    assert error.value.param == "messages"


def test_checkpoint_without_template_loads_none_and_named_templates_pick_tool_use(tmp_path):
    shutil.copy(TINY_CHECKPOINT / "tokenizer.json", tmp_path)
    config = json.loads((TINY_CHECKPOINT / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.load(tmp_path) is None

    config["chat_template"] = [{"name": "default", "template": "plain:{{ messages[0]['content'] }}"},
                               {"name": "tool_use", "template": "tools:{{ tools | length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.load(tmp_path)
    assert template.render([{"role": "user", "content": "x"}]) == "plain:x"
    assert template.render([{"role": "user", "content": "x"}], tools=TOOLS) == "tools:1"


def test_template_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(Dsv3Error, match="bad.jinja: the chat template is not valid Jinja"):
        ChatTemplate.load(TINY_CHECKPOINT, override=bad)
    with pytest.raises(Dsv3Error, match="missing.jinja: cannot read"):
        ChatTemplate.load(TINY_CHECKPOINT, override=tmp_path / "missing.jinja")


def test_the_sandbox_blocks_attribute_escapes(tmp_path):
    path = tmp_path / "evil.jinja"
    path.write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError):
        ChatTemplate.load(TINY_CHECKPOINT, override=path).render([{"role": "user", "content": "x"}])


def test_tiny_checkpoint_carries_the_template_its_script_writes():
    source = (TINY_CHECKPOINT.parents[2] / "scripts" / "tiny_chat_template.jinja").read_text(encoding="utf-8")
    config = json.loads((TINY_CHECKPOINT / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == source.rstrip("\n")
