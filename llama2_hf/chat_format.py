"""The chat format of a checkpoint: how a dialogue becomes token ids, and which of those ids are answers.

One seam, chosen from the tokenizer (`chat_format_for`):

- a Llama 2 tokenizer (`Llama2Tokenizer`) keeps Meta's `chat_completion` ids and answer masks bit for bit
  (`Llama2ChatFormat`, over `tokenization_llama2.encode_chat_with_mask`);
- any other tokenizer encodes through its own chat template (`TemplateChatFormat`). The answer mask comes from the
  template's `{% generation %}` marks where it has them (transformers' `return_assistant_tokens_mask`, what TRL's
  `assistant_only_loss` reads), else from rendering each prefix of the dialogue: the tokens an assistant turn adds
  after the generation prompt of the turns before it (its content and the template's end-of-turn text) are its
  answer. A template that renders an earlier turn differently once a later one follows cannot be read by prefix,
  and a template that marks no answer at all is refused: both in one line naming the tokenizer.

BOS, EOS and the end-of-turn text come from the template and the tokenizer, never assumed. Where the template has no
system role (Mistral's, Gemma's), `merge_system` puts a system message in front of the first user turn, as those
templates' own documentation asks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import UsageError
from .tokenization_llama2 import ChatEncoding, encode_chat_with_mask, validate_messages

_GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")
_PROBE_SYSTEM = "system probe 7f3a"


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def merge_system(messages: Sequence[dict]) -> list[dict]:
    """The dialogue without a system message: its text goes in front of the first user turn, a blank line between
    (for templates without a system role)."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
        if messages:
            messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
    return messages


def _last_answer_only(mask: list[int]) -> list[int]:
    """The mask of the final answer only: its last run of 1s (`train_on="last"`, Ghost Attention)."""
    out = [0] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


class ChatFormat:
    """How one tokenizer lays out dialogues. `encode(messages)` gives the ids and the answer mask of a dialogue (a
    generation prompt when it ends with a user turn); `prompt_ids(messages)` the ids a sampler continues."""

    name = "chat format"
    mask_source = ""
    has_system_role = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, messages: Sequence[dict], train_on: str = "all") -> ChatEncoding:
        raise NotImplementedError

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        return self.encode(messages).input_ids

    def with_system(self, messages: Sequence[dict]) -> list[dict]:
        """`messages` as this format can take them: a system message kept where the template has a system role,
        merged into the first user turn where it has none."""
        return list(messages) if self.has_system_role else merge_system(messages)


class Llama2ChatFormat(ChatFormat):
    """Meta's `chat_completion` format, exact (`encode_chat_with_mask`)."""

    name = "llama2_chat"
    mask_source = "Meta's chat_completion layout"

    def encode(self, messages: Sequence[dict], train_on: str = "all") -> ChatEncoding:
        return encode_chat_with_mask(self.tokenizer, messages, train_on=train_on)


class TemplateChatFormat(ChatFormat):
    """A tokenizer's own chat template (see the module docstring for the answer mask)."""

    name = "chat_template"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise UsageError(f"tokenizer {_name(tokenizer)}: it has no chat template, so dialogues cannot be laid "
                             "out; give a tokenizer with a chat_template (tokenizer_config.json or "
                             "chat_template.jinja)")
        self.marked = isinstance(template, str) and bool(_GENERATION_MARK.search(template))
        self.mask_source = "the template's generation marks" if self.marked else "rendering each dialogue prefix"
        self.has_system_role = self._renders_system()
        self._check_marks_answers()

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _renders_system(self) -> bool:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "hi"}], tokenize=False)
        except Exception:  # noqa: BLE001 - jinja's raise_exception, TemplateError: the template refuses the role
            return False
        return _PROBE_SYSTEM in text

    def _check_marks_answers(self) -> None:
        probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}]
        if not any(self.encode(probe).assistant_mask):
            raise UsageError(f"tokenizer {_name(self.tokenizer)}: its chat template marks no answer tokens "
                             f"({self.mask_source}): the answer-only loss would have nothing to train on")

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        validate_messages(messages)
        return self._render(self.with_system(messages), add_generation_prompt=True)

    def encode(self, messages: Sequence[dict], train_on: str = "all") -> ChatEncoding:
        if train_on not in ("all", "last"):
            raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
        validate_messages(messages)
        messages = self.with_system(messages)
        if messages[-1]["role"] != "assistant":
            ids = self._render(messages, add_generation_prompt=True)
            return ChatEncoding(ids, [0] * len(ids))
        if self.marked:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
        else:
            ids, mask = self._prefix_masks(messages)
        return ChatEncoding(ids, _last_answer_only(mask) if train_on == "last" else mask)

    def _prefix_masks(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        ids = self._render(messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            after = self._render(messages[:i + 1])
            if after[:len(before)] != before or ids[:len(after)] != after:
                raise UsageError(f"tokenizer {_name(self.tokenizer)}: its chat template renders turn {i} "
                                 "differently once later turns follow, so answers cannot be found by rendering "
                                 "prefixes; add {% generation %} ... {% endgeneration %} around the assistant "
                                 "content of the template")
            for k in range(len(before), len(after)):
                mask[k] = 1
        return ids, mask


def is_llama2_tokenizer(tokenizer) -> bool:
    from .tokenization_llama2 import Llama2Tokenizer

    return isinstance(tokenizer, Llama2Tokenizer)


def chat_format_for(tokenizer) -> ChatFormat:
    """The chat format of `tokenizer`: Meta's exact layout for a Llama 2 tokenizer, its chat template otherwise."""
    return Llama2ChatFormat(tokenizer) if is_llama2_tokenizer(tokenizer) else TemplateChatFormat(tokenizer)


__all__ = ["ChatFormat", "Llama2ChatFormat", "TemplateChatFormat", "chat_format_for", "is_llama2_tokenizer",
           "merge_system"]
