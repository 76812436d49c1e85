"""Llama 2 tokenizer (SentencePiece-exact, on the fast `tokenizers` backend) and the Llama 2-Chat format.

Why not transformers' own conversion: in transformers 5.x it orders BPE merges by piece id instead of SentencePiece
score and drops the dummy prefix of strings that start with a space, so some ids differ from Meta's tokenizer. Here the
merges are ranked by score and the normaliser is SentencePiece's (`Prepend("▁")` + `Replace(" ", "▁")`, no
pre-tokeniser), which reproduces `sentencepiece` ids. Special-token strings in text ("<s>", "</s>", "<unk>") are plain
text, as in Meta's `Tokenizer.encode`; BOS/EOS ids are only ever added by the encoding functions.

The chat format is Meta's `Llama.chat_completion` (llama/generation.py): the system prompt is merged into the first
user turn, each completed turn is encoded on its own as `<s>[INST] user [/INST] answer </s>`, and a final user turn as
`<s>[INST] user [/INST]`. Every stage of the pipeline builds chat token ids through `encode_chat_with_mask`.

This file is copied next to the weights by `save_pretrained`: it imports only transformers and `tokenizers`
(a transformers dependency); `sentencepiece` is needed only to read or train a `tokenizer.model`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers.tokenization_utils_base import BatchEncoding
from transformers.tokenization_utils_tokenizers import TokenizersBackend

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
SPECIAL_TAGS_ERROR = "Error: special tags are not allowed as part of the prompt."

# The release-time default system prompt (llama/generation.py at 6d4c0c2, with its two spaces after "safe."). Meta
# removed it as a default on 2023-08-04 to reduce false refusals: nothing here inserts it unless asked to.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)

# Renders the same text as `render_dialog` (BOS/EOS as their strings), for tools that only read `chat_template`.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- set system_message = '' -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set content = (system_message + message['content']) if loop.index0 == 0 else message['content'] -%}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' }}{% generation %}{{ message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def build_backend_from_sentencepiece(model_file: str | os.PathLike) -> tuple[Tokenizer, dict[str, str]]:
    """A `tokenizers.Tokenizer` reproducing a SentencePiece BPE model (as Llama 2's) id for id.

    Returns the backend and the unk/bos/eos piece strings. Requires the `sentencepiece` package.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {sp.id_to_piece(i) for i in range(n)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    # SentencePiece BPE repeatedly merges the adjacent pair whose concatenation has the highest score; ranking every
    # (left, right) split of every piece by that score gives the same merges to the `tokenizers` BPE model.
    ranked = []
    for piece in normal:
        if len(piece) < 2:
            continue
        pid = vocab[piece]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-sp.get_score(pid), pid, k, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    unk = sp.id_to_piece(sp.unk_id())
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1),
    ])
    specials = {"unk_token": unk}
    if sp.bos_id() >= 0:
        specials["bos_token"] = sp.id_to_piece(sp.bos_id())
    if sp.eos_id() >= 0:
        specials["eos_token"] = sp.id_to_piece(sp.eos_id())
    if sp.pad_id() >= 0:
        specials["pad_token"] = sp.id_to_piece(sp.pad_id())
    return backend, specials


class Llama2Tokenizer(TokenizersBackend):
    """Llama 2's SentencePiece BPE tokenizer with SentencePiece-exact ids, on the fast `tokenizers` backend.

    - `tokenizer(text)` / `encode(text)` prepend BOS as Meta's `encode(s, bos=True, eos=False)`;
      `add_special_tokens=False` gives the bare ids.
    - "<s>", "</s>" and "<unk>" inside text are ordinary characters (`split_special_tokens=True`), as in Meta's code.
    - No pad token unless you set one (Meta's `pad_id` is -1).
    - `apply_chat_template` returns Meta's `chat_completion` ids (see `encode_chat_with_mask`).

    Build one from Meta's file with `Llama2Tokenizer.from_sentencepiece("tokenizer.model")`, or train a new one with
    `train_llama2_tokenizer`.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model", "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        """Pick the backend when loading a folder: a `tokenizer.model` (SentencePiece) is rebuilt exactly, because the
        `tokenizer.json` next to it on the Hub (`meta-llama/Llama-2-*-hf`) came from the inexact conversion; else our
        own `tokenizer.json` is loaded as it is."""
        vocab_file, tokenizer_file = kwargs.get("vocab_file"), kwargs.get("tokenizer_file")
        if vocab_file is not None and os.path.isfile(vocab_file):
            backend, specials = build_backend_from_sentencepiece(vocab_file)
            kwargs.pop("tokenizer_file", None)
            for name, piece in specials.items():
                kwargs.setdefault(name, AddedToken(piece, special=True, normalized=False))
            return {**kwargs, "tokenizer_object": backend}
        if tokenizer_file is not None and os.path.isfile(tokenizer_file):
            return dict(kwargs)
        return super().convert_to_native_format(trust_remote_code=trust_remote_code, **kwargs)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("add_bos_token", True)
        kwargs.setdefault("add_eos_token", False)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("chat_template", LLAMA2_CHAT_TEMPLATE)
        super().__init__(*args, **kwargs)

    @classmethod
    def from_sentencepiece(cls, model_file: str | os.PathLike, **kwargs) -> "Llama2Tokenizer":
        """Build from a SentencePiece `tokenizer.model` (Meta's, or one made by `train_llama2_tokenizer`)."""
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"No SentencePiece model at {model_file}")
        backend, specials = build_backend_from_sentencepiece(model_file)
        for name, piece in specials.items():
            kwargs.setdefault(name, AddedToken(piece, special=True, normalized=False))
        return cls(tokenizer_object=backend, **kwargs)

    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template=None,
                            add_generation_prompt=False, continue_final_message=False, tokenize=True,
                            padding=False, truncation=False, max_length=None, return_tensors=None,
                            return_dict=True, return_assistant_tokens_mask=False, tokenizer_kwargs=None, **kwargs):
        """Meta's Llama 2-Chat ids for one conversation or a batch of them.

        A conversation ending with a user turn ends right after `[/INST]`, so `add_generation_prompt` changes
        nothing; one ending with an assistant turn has every turn closed by EOS (`continue_final_message=True` leaves
        the last answer open: no trailing space, no EOS). `assistant_masks` marks answer tokens and their EOS.
        Tools, documents or an explicit `chat_template` fall back to transformers' Jinja rendering.
        """
        if tools is not None or documents is not None or chat_template is not None:
            return super().apply_chat_template(
                conversation, tools=tools, documents=documents, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=tokenize, padding=padding, truncation=truncation, max_length=max_length,
                return_tensors=return_tensors, return_dict=return_dict,
                return_assistant_tokens_mask=return_assistant_tokens_mask, tokenizer_kwargs=tokenizer_kwargs,
                **kwargs)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        if not tokenize:
            texts = [render_dialog(c, self.bos_token, self.eos_token, continue_final_message) for c in conversations]
            return texts if batched else texts[0]
        encodings = [encode_chat_with_mask(self, c, continue_final_message=continue_final_message)
                     for c in conversations]
        ids = [e.input_ids for e in encodings]
        if max_length is not None and truncation:
            ids = [x[:max_length] for x in ids]
        if not return_dict:
            return ids if batched else ids[0]
        data = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        if return_assistant_tokens_mask:
            data["assistant_masks"] = [e.assistant_mask[: len(x)] for e, x in zip(encodings, ids)]
        if not batched:
            data = {k: v[0] for k, v in data.items()}
        out = BatchEncoding(data)
        if padding or return_tensors is not None:
            out = self.pad(out, padding=padding or "longest", max_length=max_length,
                           return_tensors=return_tensors)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Chat format
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class ChatEncoding:
    """Token ids of a dialog and, aligned with them, 1 on assistant-answer tokens (each with its closing EOS)."""

    input_ids: list[int]
    assistant_mask: list[int]


def validate_messages(messages: Sequence[dict]) -> None:
    """Check roles and contents: optional `system` first, then `user`/`assistant` alternating from `user`.

    Raises ValueError naming the offending message index. A dialog may end with either role.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise ValueError("messages has a system prompt but no user turn")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise ValueError(f"messages[{i}].role must be {expected!r} (after an optional system prompt, roles "
                             f"alternate user/assistant starting with user), got {messages[i]['role']!r}")


def find_special_tags(messages: Sequence[dict]) -> list[int]:
    """Indices of messages whose content contains `[INST]`, `[/INST]`, `<<SYS>>` or `<</SYS>>`.

    Meta's `chat_completion` still encodes such dialogs but replaces the model's answer with `SPECIAL_TAGS_ERROR`.
    """
    return [i for i, m in enumerate(messages) if any(tag in m["content"] for tag in SPECIAL_TAGS)]


def _turns(messages: Sequence[dict]) -> list[dict]:
    """Merge the system prompt into the first user turn exactly as Meta does (before stripping)."""
    validate_messages(messages)
    if messages[0]["role"] != "system":
        return list(messages)
    first = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
    return [first, *messages[2:]]


def _bare(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def encode_chat_with_mask(tokenizer, messages: Sequence[dict], train_on: str = "all",
                          continue_final_message: bool = False, reject_special_tags: bool = False,
                          separator_token: str | None = None) -> ChatEncoding:
    """Meta's `chat_completion` token ids for `messages`, with the assistant-answer mask.

    - each completed (user, assistant) pair: `[BOS] + enc("[INST] {u} [/INST] {a} ") + [EOS]`, u and a stripped;
    - a final user turn: `[BOS] + enc("[INST] {u} [/INST]")` (a generation prompt);
    - `train_on="all"` marks every answer (and its EOS); `"last"` only the final assistant turn (Ghost Attention);
    - `continue_final_message=True` leaves the final answer open (no trailing space, no EOS).

    The answer tokens are those after the tokens of the turn's own prompt; the prompt's ids are a prefix of the
    turn's ids because no SentencePiece piece spans "]" and the following "▁".

    `separator_token` (a token already in the tokenizer's vocabulary, e.g. an added "<sep>") selects the paper's
    variant instead (§3.1: "a special token is utilized to separate the prompt and answer segments"; the paper names
    neither the token nor the rest of the layout, so this layout is ours): each pair is
    `[BOS] + enc(u) + [SEP] + enc(a) + [EOS]` and a final user turn `[BOS] + enc(u) + [SEP]`, with no `[INST]` tags;
    a system prompt is prepended to the first user turn followed by a blank line. Prompt and answer are encoded
    separately, so the mask boundary is exact for any tokenizer.
    """
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    if reject_special_tags and (bad := find_special_tags(messages)):
        raise ValueError(f"messages{bad} contain a chat tag {SPECIAL_TAGS}: {SPECIAL_TAGS_ERROR}")
    if separator_token is not None:
        return _encode_with_separator(tokenizer, messages, train_on, continue_final_message, separator_token)
    turns = _turns(messages)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if continue_final_message and turns[-1]["role"] != "assistant":
        raise ValueError("continue_final_message=True needs a dialog that ends with an assistant message")
    ids: list[int] = []
    mask: list[int] = []
    n_pairs = len(turns) // 2
    for k in range(n_pairs):
        user, answer = turns[2 * k]["content"].strip(), turns[2 * k + 1]["content"].strip()
        prompt = [bos] + _bare(tokenizer, f"{B_INST} {user} {E_INST}")
        is_open = continue_final_message and k == n_pairs - 1
        full = [bos] + _bare(tokenizer, f"{B_INST} {user} {E_INST} {answer}" + ("" if is_open else " "))
        if not is_open:
            full.append(eos)
        if full[: len(prompt)] != prompt:  # cannot happen with Llama 2's vocabulary; kept for custom tokenizers
            prompt = prompt[: next(i for i, (a, b) in enumerate(zip(prompt, full)) if a != b)]
        trained = train_on == "all" or k == n_pairs - 1
        ids += full
        mask += [0] * len(prompt) + [int(trained)] * (len(full) - len(prompt))
    if len(turns) % 2:  # final user turn: the generation prompt
        prompt = [bos] + _bare(tokenizer, f"{B_INST} {turns[-1]['content'].strip()} {E_INST}")
        ids += prompt
        mask += [0] * len(prompt)
    return ChatEncoding(input_ids=ids, assistant_mask=mask)


def separator_token_id(tokenizer, separator_token: str) -> int:
    """The id of `separator_token`, which must be a token of its own (added to the vocabulary), not BOS/EOS/UNK/pad."""
    ids = tokenizer.convert_tokens_to_ids([separator_token])
    sep = ids[0] if ids else None
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id}
    if sep is None or sep in reserved or tokenizer.convert_ids_to_tokens(sep) != separator_token:
        raise ValueError(f"separator_token {separator_token!r} is not a token of its own in this tokenizer (add it "
                         "first, e.g. tokenizer.add_tokens([AddedToken(..., special=True)], special_tokens=True), "
                         "and resize the model's embeddings); it must differ from BOS, EOS, UNK and pad")
    return sep


def _encode_with_separator(tokenizer, messages: Sequence[dict], train_on: str, continue_final_message: bool,
                           separator_token: str) -> ChatEncoding:
    """The separator-token layout of `encode_chat_with_mask` (see its docstring)."""
    validate_messages(messages)
    sep = separator_token_id(tokenizer, separator_token)
    turns = list(messages)
    if turns[0]["role"] == "system":
        turns = [{"role": "user", "content": f"{turns[0]['content'].strip()}\n\n{turns[1]['content'].strip()}"},
                 *turns[2:]]
    if continue_final_message and turns[-1]["role"] != "assistant":
        raise ValueError("continue_final_message=True needs a dialog that ends with an assistant message")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    n_pairs = len(turns) // 2
    for k in range(n_pairs):
        prompt = [bos] + _bare(tokenizer, turns[2 * k]["content"].strip()) + [sep]
        answer = _bare(tokenizer, turns[2 * k + 1]["content"].strip())
        if not (continue_final_message and k == n_pairs - 1):
            answer.append(eos)
        trained = train_on == "all" or k == n_pairs - 1
        ids += prompt + answer
        mask += [0] * len(prompt) + [int(trained)] * len(answer)
    if len(turns) % 2:  # final user turn: the generation prompt ends with the separator
        prompt = [bos] + _bare(tokenizer, turns[-1]["content"].strip()) + [sep]
        ids += prompt
        mask += [0] * len(prompt)
    return ChatEncoding(input_ids=ids, assistant_mask=mask)


def encode_dialog(tokenizer, messages: Sequence[dict], **kwargs) -> list[int]:
    """Meta's `chat_completion` ids: a generation prompt if the dialog ends with the user, else a complete dialog."""
    return encode_chat_with_mask(tokenizer, messages, **kwargs).input_ids


def render_dialog(messages: Sequence[dict], bos_token: str = "<s>", eos_token: str = "</s>",
                  continue_final_message: bool = False) -> str:
    """The chat format as text, BOS/EOS written as strings (for display and Jinja parity; ids come from
    `encode_chat_with_mask`, since the tokenizer reads "<s>" in text as plain characters)."""
    turns = _turns(messages)
    parts = []
    for k in range(0, len(turns) - 1, 2):
        user, answer = turns[k]["content"].strip(), turns[k + 1]["content"].strip()
        last_open = continue_final_message and k + 2 == len(turns)
        parts.append(f"{bos_token}{B_INST} {user} {E_INST} {answer}" + ("" if last_open else f" {eos_token}"))
    if len(turns) % 2:
        parts.append(f"{bos_token}{B_INST} {turns[-1]['content'].strip()} {E_INST}")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Training a new tokenizer with the paper's settings
# ---------------------------------------------------------------------------------------------------------------------

def train_llama2_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike | None = None,
                           character_coverage: float = 0.99995, max_sentencepiece_length: int = 16,
                           num_threads: int = 2, hard_vocab_limit: bool = False,
                           **trainer_kwargs) -> Llama2Tokenizer:
    """Train a SentencePiece BPE tokenizer with Llama 2's trainer settings and wrap it in `Llama2Tokenizer`.

    Settings (paper §2.2 and the `trainer_spec` of Meta's tokenizer.model): BPE, split digits, byte fallback,
    whitespace-only pieces allowed, identity normalisation with a dummy prefix and extra whitespace kept, ids
    unk=0 / bos=1 / eos=2, no pad. With `output_dir`, `tokenizer.model` and the HF files are written there.
    `hard_vocab_limit=False` lets a small corpus give fewer than `vocab_size` pieces: size models with `len(tok)`.
    """
    import io
    import tempfile

    import sentencepiece as spm

    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 byte pieces plus "
                         "<unk>, <s>, </s> and the corpus characters")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
        character_coverage=character_coverage, max_sentencepiece_length=max_sentencepiece_length,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads, minloglevel=2,
        hard_vocab_limit=hard_vocab_limit, **trainer_kwargs,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(output_dir or tmp, "tokenizer.model")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(model.getvalue())
        tokenizer = Llama2Tokenizer.from_sentencepiece(path)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


__all__ = [
    "B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS", "SPECIAL_TAGS_ERROR", "DEFAULT_SYSTEM_PROMPT",
    "LLAMA2_CHAT_TEMPLATE", "ChatEncoding", "Llama2Tokenizer", "build_backend_from_sentencepiece",
    "encode_chat_with_mask", "encode_dialog", "find_special_tags", "render_dialog", "separator_token_id",
    "train_llama2_tokenizer", "validate_messages",
]
