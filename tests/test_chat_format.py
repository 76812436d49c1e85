"""The chat-format seam: Llama 2 tokenizers keep Meta's exact ids and masks; other tokenizers encode through their own
chat template, with answer masks from the template's generation marks or from rendering each dialogue prefix. The
tokenizers of two other families are trained here (byte-level BPE), with their family's template."""

from __future__ import annotations

import pytest

from llama2_hf.chat_format import Llama2ChatFormat, TemplateChatFormat, chat_format_for, merge_system
from llama2_hf.errors import UsageError
from llama2_hf.tokenization_llama2 import encode_chat_with_mask

# ChatML as Qwen2 writes it, the assistant content and its end-of-turn token inside generation marks.
CHATML_MARKED = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{%- else %}{{ message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
# The same layout without marks (most released templates).
CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
# Mistral's [INST] layout: no system role.
MISTRAL = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{%- endif %}{%- endfor %}")
# A template that drops the assistant's words: nothing to train on.
SILENT = "{%- for message in messages %}{%- if message['role'] == 'user' %}{{ message['content'] }}{%- endif %}" \
         "{%- endfor %}"

CORPUS = [f"what is {a} plus {b}? {a} plus {b} is {a + b}. the cat sat on the mat, hello there friend."
          for a in range(12) for b in range(12)]


def trained_tokenizer(special: list[str], template: str, **tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def chatml():
    return trained_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_MARKED,
                             eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def mistral():
    return trained_tokenizer(["<unk>", "<s>", "</s>"], MISTRAL, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


DIALOG = [{"role": "user", "content": "what is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."},
          {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hello friend."}]


def pieces(tokenizer, parts: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Ids and mask by hand: each text piece encoded alone, its tokens marked with its flag."""
    ids, mask = [], []
    for text, flag in parts:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += enc
        mask += [flag] * len(enc)
    return ids, mask


@pytest.mark.parametrize("marked", [True, False])
def test_chatml_answers_are_the_content_and_end_of_turn(chatml, marked):
    tokenizer = chatml
    if not marked:
        tokenizer = trained_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML,
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fmt = chat_format_for(tokenizer)
    assert isinstance(fmt, TemplateChatFormat) and fmt.marked is marked and fmt.has_system_role
    enc = fmt.encode(DIALOG)
    # marks: the content and <|im_end|>; prefixes: the same plus the newline the template writes after it
    tail = 0 if marked else 1
    ids, mask = pieces(tokenizer, [
        ("<|im_start|>user\nwhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n", 0), ("2 plus 3 is 5.<|im_end|>", 1),
        ("\n", tail), ("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n", 0),
        ("hello friend.<|im_end|>", 1), ("\n", tail)])
    assert (enc.input_ids, enc.assistant_mask) == (ids, mask)
    last = fmt.encode(DIALOG, train_on="last").assistant_mask
    first_answer = len(ids) - len(pieces(tokenizer, [("hello friend.<|im_end|>", 1), ("\n", tail)])[0])
    assert last == [0] * first_answer + mask[first_answer:]  # the final answer only
    assert fmt.prompt_ids(DIALOG[:3]) == pieces(tokenizer, [(
        "<|im_start|>user\nwhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n"
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n", 0)])[0]


def test_mistral_masks_by_prefix_and_merges_the_system_message(mistral):
    fmt = chat_format_for(mistral)
    assert not fmt.marked and not fmt.has_system_role and fmt.mask_source == "rendering each dialogue prefix"
    with_system = [{"role": "system", "content": "Answer as a pirate."}, *DIALOG]
    enc = fmt.encode(with_system)
    ids, mask = pieces(mistral, [("<s>[INST] Answer as a pirate.\n\nwhat is 2 plus 3? [/INST]", 0),
                                 ("2 plus 3 is 5.</s>", 1), ("[INST] hello there [/INST]", 0),
                                 ("hello friend.</s>", 1)])
    assert (enc.input_ids, enc.assistant_mask) == (ids, mask)
    assert merge_system(with_system)[0] == {"role": "user", "content": "Answer as a pirate.\n\nwhat is 2 plus 3?"}


def test_a_template_that_marks_no_answer_is_refused_in_one_line(mistral):
    silent = trained_tokenizer(["<unk>", "<s>", "</s>"], SILENT, bos_token="<s>", eos_token="</s>")
    with pytest.raises(UsageError, match="its chat template marks no answer tokens"):
        chat_format_for(silent)
    plain = trained_tokenizer(["<unk>", "<s>", "</s>"], MISTRAL, bos_token="<s>", eos_token="</s>")
    plain.chat_template = None
    with pytest.raises(UsageError, match="it has no chat template"):
        chat_format_for(plain)


def test_llama2_tokenizers_keep_metas_exact_ids_and_masks(tiny_tokenizer):
    fmt = chat_format_for(tiny_tokenizer)
    assert isinstance(fmt, Llama2ChatFormat)
    for train_on in ("all", "last"):
        ours, meta = fmt.encode(DIALOG, train_on=train_on), encode_chat_with_mask(tiny_tokenizer, DIALOG, train_on)
        assert (ours.input_ids, ours.assistant_mask) == (meta.input_ids, meta.assistant_mask)
