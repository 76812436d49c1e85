"""Tokenizer: SentencePiece-exact ids and decoding, BOS handling, Meta's chat format, training."""

from __future__ import annotations

import csv
import json

import pytest

from llama2_hf import Llama2Tokenizer, train_llama2_tokenizer
from llama2_hf.tokenization_llama2 import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS_ERROR,
    encode_chat_with_mask,
    encode_dialog,
    find_special_tags,
    separator_token_id,
    validate_messages,
)

spm = pytest.importorskip("sentencepiece")

EDGE_CASES = [
    "", " ", "  ", "   x", "Hello", " Hello", "Hello ", "Hello  ", "a  b   c    d", "\n", "\n\nx\ny\n", "\t", "\ttab\t",
    " \t \n mixed", ".  How", " A", "😀", "emoji 🚀🦙 mix", "日本語のテキストです", "中文 和 English", "한국어",
    "12345", "3.14159 and 2,718", "1 000 000", "\x00\x01\x7f", "\u200b zero width", "ǅ ʬ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ω≈ç√∫˜µ≤≥÷",
    "[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]", "<s>", "</s> <unk>", "<s>[INST] x [/INST] y </s>", "naïve café",
    "trailing spaces   ", "   leading spaces", "\r\nwindows\r\n", "a" * 300, "ab" * 50 + " " * 20,
]


def _corpus(shared_data):
    texts = list(EDGE_CASES)
    with open(shared_data / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["question"] for line in f]
    for path in sorted((shared_data / "mmlu" / "test").glob("*.csv")):
        with open(path, encoding="utf-8") as f:
            texts += [row[0] for row in csv.reader(f)]
    with open(shared_data / "truthfulqa" / "TruthfulQA.csv", encoding="utf-8") as f:
        texts += [row["Question"] for row in csv.DictReader(f)]
    return texts


def test_ids_and_decoding_identical_to_sentencepiece(shared_data, llama2_tokenizer, llama2_tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))
    texts = _corpus(shared_data)
    assert len(texts) > 16000  # MMLU test + GSM8K test + TruthfulQA + edge cases
    ours = llama2_tokenizer(texts, add_special_tokens=False)["input_ids"]
    refs = sp.encode(texts)
    mismatches = [t for t, a, b in zip(texts, ours, refs) if a != b]
    assert mismatches == []
    for text, ids in zip(texts, ours):
        assert llama2_tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text


def test_bos_eos_and_special_strings(llama2_tokenizer, llama2_tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))
    tok = llama2_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token) == (1, 2, 0, None)
    assert len(tok) == 32000
    assert tok("Hello world").input_ids == [1] + sp.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("Hello world", add_special_tokens=False) == [15043, 3186]
    # "<s>" in text is text, as in Meta's Tokenizer.encode, not the BOS id.
    assert tok.encode("<s>", add_special_tokens=False) == sp.encode("<s>")
    assert 1 not in tok.encode("<s>", add_special_tokens=False)
    assert tok.decode([1, 15043, 3186, 2], skip_special_tokens=True) == "Hello world"


def test_save_load_and_hub_layout_folder(tmp_path, llama2_tokenizer, llama2_tokenizer_model):
    texts = [".  How are you", " A", "x\n\ny"]
    llama2_tokenizer.save_pretrained(tmp_path / "saved")
    again = Llama2Tokenizer.from_pretrained(tmp_path / "saved")
    assert again(texts).input_ids == llama2_tokenizer(texts).input_ids
    # A folder with Meta's tokenizer.model (e.g. meta-llama/Llama-2-7b-hf) is rebuilt exactly from it.
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "tokenizer.model").write_bytes(llama2_tokenizer_model.read_bytes())
    assert Llama2Tokenizer.from_pretrained(hub)(texts).input_ids == llama2_tokenizer(texts).input_ids


def meta_chat_completion_ids(sp, dialog):
    """Meta's `Llama.chat_completion` prompt construction (llama/generation.py), written out independently."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [sp.bos_id()] + sp.encode(
            f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ") + [sp.eos_id()]
    if dialog[-1]["role"] == "user":
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}")
    return tokens


DIALOGS = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [{"role": "system", "content": "Always answer with Haiku"},
     {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "user", "content": "I am going to Paris, what should I see?"},
     {"role": "assistant", "content": " Paris, the capital of France, is known for the Eiffel Tower.\n\n1. Louvre  "},
     {"role": "user", "content": "What is so great about #1?  "}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


@pytest.mark.parametrize("dialog", DIALOGS, ids=["single", "system", "multi", "complete"])
def test_chat_ids_equal_meta_construction(dialog, llama2_tokenizer, llama2_tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))
    want = meta_chat_completion_ids(sp, dialog)
    assert encode_dialog(llama2_tokenizer, dialog) == want
    assert llama2_tokenizer.apply_chat_template(dialog, return_dict=False) == want
    # The rendered text shows the same format.
    assert llama2_tokenizer.apply_chat_template(dialog, tokenize=False).startswith("<s>[INST] ")


def test_assistant_mask_at_exact_positions(llama2_tokenizer):
    tok = llama2_tokenizer
    dialog = DIALOGS[3]
    enc = encode_chat_with_mask(tok, dialog)
    turn1 = [1] + tok.encode(f"[INST] {B_SYS} Be brief. {E_SYS}Hi".strip() + " [/INST] Hello! ",
                             add_special_tokens=False) + [2]
    prompt1 = [1] + tok.encode(f"[INST] {B_SYS} Be brief. {E_SYS}Hi".strip() + " [/INST]", add_special_tokens=False)
    turn2 = [1] + tok.encode("[INST] 2+2? [/INST] 4 ", add_special_tokens=False) + [2]
    prompt2 = [1] + tok.encode("[INST] 2+2? [/INST]", add_special_tokens=False)
    assert enc.input_ids == turn1 + turn2
    answer1 = len(turn1) - len(prompt1)
    answer2 = len(turn2) - len(prompt2)
    assert enc.assistant_mask == [0] * len(prompt1) + [1] * answer1 + [0] * len(prompt2) + [1] * answer2
    # The masked tokens decode to the answers (with the trailing space token and EOS).
    masked = [i for i, m in zip(enc.input_ids, enc.assistant_mask) if m]
    assert tok.decode(masked, skip_special_tokens=True) == "Hello!  4 "
    assert masked.count(2) == 2
    last = encode_chat_with_mask(tok, dialog, train_on="last")
    assert last.input_ids == enc.input_ids
    assert last.assistant_mask == [0] * len(turn1) + [0] * len(prompt2) + [1] * answer2
    out = tok.apply_chat_template(dialog, return_assistant_tokens_mask=True)
    assert out["assistant_masks"] == enc.assistant_mask
    # A final user turn is a generation prompt: nothing to learn there.
    assert sum(encode_chat_with_mask(tok, DIALOGS[2]).assistant_mask) > 0
    assert encode_chat_with_mask(tok, DIALOGS[2]).assistant_mask[-5:] == [0] * 5


def test_separator_token_layout_and_mask(llama2_tokenizer, llama2_tokenizer_model):
    """The paper's §3.1 variant: `<s> prompt <sep> answer </s>` per pair, mask on the answer and its EOS only."""
    from tokenizers import AddedToken

    tok = Llama2Tokenizer.from_sentencepiece(llama2_tokenizer_model)  # a fresh copy: the token is added in place
    with pytest.raises(ValueError, match="not a token of its own"):
        encode_chat_with_mask(tok, DIALOGS[3], separator_token="<sep>")
    with pytest.raises(ValueError, match="not a token of its own"):
        separator_token_id(tok, "</s>")
    tok.add_tokens([AddedToken("<sep>", special=True, normalized=False)], special_tokens=True)
    assert separator_token_id(tok, "<sep>") == 32000 == len(tok) - 1
    dialog = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi <sep>"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]
    enc = encode_chat_with_mask(tok, dialog, separator_token="<sep>")
    bare = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    prompt1, answer1 = [1] + bare("Be brief.\n\nHi <sep>") + [32000], bare("Hello!") + [2]
    prompt2, answer2 = [1] + bare("2+2?") + [32000], bare("4") + [2]
    assert enc.input_ids == prompt1 + answer1 + prompt2 + answer2
    assert enc.input_ids.count(32000) == 2  # "<sep>" typed in a message stays plain text
    assert "[" not in tok.decode(enc.input_ids)  # no [INST] tags in this layout
    assert enc.assistant_mask == [0] * len(prompt1) + [1] * len(answer1) + [0] * len(prompt2) + [1] * len(answer2)
    # The first trained position is the one right after the separator.
    first = enc.assistant_mask.index(1)
    assert enc.input_ids[first - 1] == 32000 and tok.decode(enc.input_ids[first:first + 2]) == "Hello!"
    last = encode_chat_with_mask(tok, dialog, train_on="last", separator_token="<sep>")
    assert last.assistant_mask == [0] * (len(prompt1) + len(answer1) + len(prompt2)) + [1] * len(answer2)
    prompt = encode_chat_with_mask(tok, dialog[:4], separator_token="<sep>")  # ends with the user: generation prompt
    assert prompt.input_ids == prompt1 + answer1 + prompt2 and prompt.input_ids[-1] == 32000
    assert sum(prompt.assistant_mask) == len(answer1)
    # Without separator_token the ids stay Meta's, added token or not.
    assert encode_dialog(tok, DIALOGS[3]) == encode_dialog(llama2_tokenizer, DIALOGS[3])


def test_continue_final_message_and_batches(llama2_tokenizer):
    tok = llama2_tokenizer
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    open_ids = tok.apply_chat_template(dialog, continue_final_message=True, return_dict=False)
    assert open_ids == [1] + tok.encode("[INST] Hi [/INST] Hel", add_special_tokens=False)
    batch = tok.apply_chat_template([DIALOGS[0], DIALOGS[1]], return_dict=True)
    assert batch["input_ids"][0] == encode_dialog(tok, DIALOGS[0])
    tok.pad_token = tok.unk_token
    try:
        padded = tok.apply_chat_template([DIALOGS[0], DIALOGS[1]], return_tensors="pt")
        assert padded["input_ids"].shape[0] == 2 and padded["attention_mask"].sum() == sum(
            len(encode_dialog(tok, d)) for d in DIALOGS[:2])
    finally:
        tok.pad_token = None


def test_role_validation_and_special_tags():
    with pytest.raises(ValueError, match=r"messages\[1\].role must be 'assistant'"):
        validate_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\].role must be 'user'"):
        validate_messages([{"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match=r"messages\[2\].role must be 'assistant'"):
        validate_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "system", "content": "s"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        validate_messages([{"role": "user"}])
    with pytest.raises(ValueError, match="no user turn"):
        validate_messages([{"role": "system", "content": "s"}])
    tagged = [{"role": "user", "content": "ignore [INST] this"}]
    assert find_special_tags(tagged) == [0]
    with pytest.raises(ValueError, match="special tags"):
        encode_chat_with_mask(None, tagged, reject_special_tags=True)
    assert "special tags are not allowed" in SPECIAL_TAGS_ERROR


def test_train_llama2_tokenizer_paper_settings(tmp_path):
    texts = [f"Room {i} has {i * 7} chairs and {i % 5} tables." for i in range(300)]
    tok = train_llama2_tokenizer(texts, vocab_size=300, output_dir=tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    # Digits are split one by one; unseen characters fall back to bytes; ids match sentencepiece.
    pieces = sp.encode("Room 1234 ☃", out_type=str)
    assert [p for p in pieces if p.strip("▁").isdigit()] == ["1", "2", "3", "4"]
    assert "<0xE2>" in pieces
    for text in texts[:20] + ["Room 1234 ☃", "  x  "]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert Llama2Tokenizer.from_pretrained(tmp_path).encode("Room 12") == tok.encode("Room 12")
