"""Chat: conversations rendered with the checkpoint's own template, as transformers renders them,
then decoded; templates that are missing, do not compile or fail to render are refused."""
from __future__ import annotations

import json
import shutil

import pytest

from runtime import Engine, EngineConfig, GenerationRequest
from runtime.chat import ChatTemplate
from runtime.cli import main
from runtime.engine import CHECKPOINTS
from tests.runtime.real_family_code import chat_checkpoint

CONVERSATIONS = [
    [{"role": "user", "content": "What is block diffusion?"}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Héllo <tag> & \"quotes\" 💡"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And times 3?"}],
]


@pytest.fixture(scope="module", params=[("sdar", "config copy.json"), ("fast-dllm-v2-7b", "config.json")],
                ids=["sdar", "fast_dllm_v2"])
def chat_model(request, tmp_path_factory):
    """(checkpoint folder, transformers' tokenizer of the same files, engine)."""
    path, hf = chat_checkpoint(*request.param, tmp_path_factory.mktemp(request.param[0]))
    return path, hf, Engine(EngineConfig(model_path=str(path), device="cpu", progress=False))


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system-unicode", "multi-turn"])
def test_the_template_renders_and_tokenizes_as_transformers_does(chat_model, messages):
    _, hf, engine = chat_model
    text = engine.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert engine._encode(GenerationRequest(prompt=messages)) == list(expected["input_ids"])


def test_a_conversation_decodes_as_its_rendered_prompt(chat_model):
    _, _, engine = chat_model
    messages = CONVERSATIONS[1]
    ids = engine.tokenizer.encode(engine.apply_chat_template(messages))
    from_chat, from_ids = engine.generate([messages, ids], max_new_tokens=6, stop_at_eos=False)
    assert from_chat.tokens == from_ids.tokens and from_chat.prompt_tokens == len(ids)


def test_cli_chat_flag(chat_model, capsys):
    path, _, _ = chat_model
    assert main(["generate", "--model", str(path), "--device", "cpu", "--no-progress", "--chat", "--system", "Be brief.",
                 "--prompt", "Hi", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompt"] == "Hi" and result["prompt_tokens"] > 10  # the template's turn markers came along


def test_chat_without_a_template_is_refused():
    engine = Engine(EngineConfig(model_path=str(CHECKPOINTS / "tiny-random"), device="cpu", progress=False))
    with pytest.raises(ValueError, match="has no chat template .* give a template with EngineConfig\\(chat_template"):
        engine.generate([[{"role": "user", "content": "hi"}]])


def checkpoint_with_template(tmp_path, template: str, weights: bool = True):
    """The bundled tiny checkpoint with `template` as its chat_template.jinja."""
    path = tmp_path / "ck"
    shutil.copytree(CHECKPOINTS / "tiny-random", path)
    (path / "chat_template.jinja").write_text(template)
    if not weights:
        (path / "model.safetensors").unlink()
    return path


def test_a_template_that_does_not_compile_is_refused_before_weights_load(tmp_path):
    path = checkpoint_with_template(tmp_path, "{% for m in messages %}{{ m.content }}", weights=False)
    with pytest.raises(ValueError, match=r"chat template in .*chat_template.jinja does not compile: "
                                         r"TemplateSyntaxError.*--chat-template"):
        Engine(EngineConfig(model_path=str(path), device="cpu", progress=False))


@pytest.mark.parametrize("template, error", [
    ("{% if messages[0].role != 'user' %}{{ raise_exception('the first message must come from the user') }}{% endif %}",
     "TemplateError: the first message must come from the user"),
    ("{{ messages.__class__.__mro__ }}", "SecurityError"),  # the sandbox holds
])
def test_a_template_that_fails_to_render_is_refused_naming_the_file(tmp_path, template, error):
    path = checkpoint_with_template(tmp_path, template)
    engine = Engine(EngineConfig(model_path=str(path), device="cpu", progress=False))
    with pytest.raises(ValueError, match=rf"chat template in .*chat_template.jinja failed to render .*{error}"):
        engine.generate([[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]])


def test_a_template_given_by_the_user_replaces_the_checkpoints(tmp_path):
    path = checkpoint_with_template(tmp_path, "{{ raise_exception('broken') }}")
    mine = tmp_path / "mine.jinja"
    mine.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    engine = Engine(EngineConfig(model_path=str(path), device="cpu", progress=False, chat_template=str(mine)))
    assert engine.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    assert ChatTemplate.from_dir(path).source.endswith("chat_template.jinja")
