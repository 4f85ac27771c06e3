"""Chat templates: a conversation -> the prompt text the checkpoint was trained on.

The template is the checkpoint's own Jinja source: `chat_template.jinja` beside the tokenizer,
else tokenizer_config.json's `chat_template` (the order transformers reads them in). It renders
as transformers' `apply_chat_template` renders it: in a sandboxed Jinja environment (a template
from a model hub cannot reach Python), with trim_blocks and lstrip_blocks, the loop-controls
extension, the `{% generation %}` tag, a `tojson` that keeps non-ASCII text, `raise_exception`
and `strftime_now`, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) in scope.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")

Message = dict[str, Any]  # {"role": "user" | "system" | "assistant" | ..., "content": str, ...}


def is_conversation(prompt: object) -> bool:
    """Whether a prompt is a conversation: a non-empty list of message dicts."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


class ChatTemplate:
    """A checkpoint's chat template, compiled once; `render` turns a conversation into prompt text.

    source: the file it came from, named in every error; special_tokens: what the template sees
    besides the messages (`bos_token`, `eos_token`, ...)."""

    def __init__(self, source: str, text: str, special_tokens: dict[str, Any] | None = None):
        import jinja2  # only chat needs it

        self.source, self.text, self.special_tokens = source, text, dict(special_tokens or {})
        try:
            self._compiled = _environment().from_string(text)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template in {source} does not compile: {type(err).__name__}: {err}. "
                             "Fix the template, or give another with EngineConfig(chat_template=PATH) "
                             "(--chat-template)") from err

    @classmethod
    def from_file(cls, file: str | Path, tokenizer_config: dict[str, Any] | None = None) -> "ChatTemplate":
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"chat template {file} does not exist")
        return cls(str(file), file.read_text(encoding="utf-8"), _special_tokens(tokenizer_config or {}))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint directory, or None when it has none."""
        path = Path(path)
        config_file = path / TOKENIZER_CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if (path / CHAT_TEMPLATE_FILE).is_file():
            return cls.from_file(path / CHAT_TEMPLATE_FILE, config)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not template:
            return None
        return cls(f"{config_file} (chat_template)", template, _special_tokens(config))

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, ending with the assistant's turn opened."""
        import jinja2

        try:
            # plain JSON data only: nothing of the caller's objects reaches the sandbox
            plain = json.loads(json.dumps(messages))
        except (TypeError, ValueError) as err:
            raise ValueError(f"chat messages must be JSON data (role/content strings): {err}") from err
        bad = [m for m in plain if not isinstance(m, dict) or "role" not in m]
        if bad:
            raise ValueError(f"every chat message needs a role (and content): {bad[0]!r}")
        try:
            return self._compiled.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as err:
            raise ValueError(f"the chat template in {self.source} failed to render this conversation: "
                             f"{type(err).__name__}: {err}") from err


    def render_with_spans(self, messages: list[Message], add_generation_prompt: bool = True,
                          ) -> tuple[str, list[tuple[int, int]] | None]:
        """`render`, and the [start, end) character ranges of the rendered text that are the
        messages' own (string) contents: what the tokenizer must read as plain text, so that a
        message cannot smuggle in a turn marker or an end of text (runtime/tokenizer.py).

        The ranges come from a second render with each content replaced by a placeholder; they are
        returned only when putting the contents back in place of the placeholders gives exactly the
        real render, i.e. when the template copies every content verbatim. None: it does not (it
        trims, splits or inspects them), and no range can be trusted."""
        text = self.render(messages, add_generation_prompt)
        contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
        marked = [dict(m, content=_PLACEHOLDER.format(i)) if isinstance(c, str) else m
                  for i, (m, c) in enumerate(zip(messages, contents))]
        try:
            skeleton = self.render(marked, add_generation_prompt)
        except ValueError:  # the template looks into contents (a placeholder is not what it expects)
            return text, None
        rebuilt, spans, at = [], [], 0
        for piece in _PLACEHOLDER_PATTERN.split(skeleton):
            if piece.startswith(_PLACEHOLDER_START) and piece.endswith(_PLACEHOLDER_END):
                piece = contents[int(piece[1:-1])]
                spans.append((at, at + len(piece)))
            rebuilt.append(piece)
            at += len(piece)
        return (text, spans) if "".join(rebuilt) == text else (text, None)


# Stands in for message i's content in `render_with_spans` (private-use characters: no template
# writes them, and the rebuilt text is compared with the real render anyway).
_PLACEHOLDER_START, _PLACEHOLDER_END = "\ue000", "\ue001"
_PLACEHOLDER = _PLACEHOLDER_START + "{}" + _PLACEHOLDER_END
_PLACEHOLDER_PATTERN = re.compile(f"({_PLACEHOLDER_START}[0-9]+{_PLACEHOLDER_END})")


def _special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    """What transformers passes a template besides the messages: the special tokens as text."""
    tokens: dict[str, Any] = {key: _token_text(tokenizer_config.get(key)) for key in SPECIAL_TOKEN_KEYS}
    tokens["additional_special_tokens"] = [_token_text(t) for t in tokenizer_config.get("additional_special_tokens") or []]
    return tokens


def _environment():
    """The sandboxed Jinja environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters: templates expect plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
