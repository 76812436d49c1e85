"""Schemas, validation and bad-input policies, preference files (unknown columns, unrated data), HH-RLHF / TRL
adapters (real HH data), RM data mixing."""

import logging

import pytest
import torch
from datasets import Dataset

from llama2_hf.data import (
    SAFETY_LABELS,
    InvalidDataFile,
    load_any,
    load_data_files,
    load_prompts,
    prepare_preference_dataset,
    prepare_sft_dataset,
    response_safety,
    sft_messages,
    validate_preference,
)
from llama2_hf.preference_data import (
    from_hh_rlhf,
    from_trl_preference,
    load_preference_data,
    load_preference_files,
    mix_helpfulness_rm_data,
    mix_safety_rm_data,
    parse_hh_transcript,
    standardize_preferences,
)

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def pref(**overrides):
    row = {"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "6", "rating": "better"}
    row.update(overrides)
    return row


# ------------------------------------------------------------------------------------------------ SFT rows and labels

def test_sft_schemas():
    conv = [msg(S, "be brief"), msg(U, "hi"), msg(A, "hello")]
    assert sft_messages({"messages": conv}, 0) == conv
    assert sft_messages({"prompt": "hi", "answer": "hello"}, 0) == [msg(U, "hi"), msg(A, "hello")]
    assert sft_messages({"prompt": [msg(U, "hi")], "completion": "hello"}, 0) == [msg(U, "hi"), msg(A, "hello")]


@pytest.mark.parametrize("example, match", [
    ({"text": "hi"}, "row 3, field 'messages': an SFT row needs 'messages'"),
    ({"prompt": "hi"}, "row 3, field 'answer': missing"),
    ({"prompt": "hi", "answer": "  "}, "row 3, field 'answer': must be non-empty"),
    ({"messages": [msg(U, "a"), msg(U, "b"), msg(A, "c")]}, r"row 3, field 'messages': messages\[1\].role must be "
                                                            "'assistant'"),
    ({"messages": [msg(U, "a"), msg(A, "b"), msg(U, "c")]}, "row 3, field 'messages': must end with a 'assistant'"),
    ({"messages": [msg(U, "a"), msg(A, "")]}, r"row 3, field 'messages': messages\[1\] \(assistant\) is empty"),
])
def test_sft_bad_rows_name_row_and_field(example, match):
    with pytest.raises(ValueError, match=match):
        sft_messages(example, 3)


def test_sft_labels_at_exact_positions_multi_turn(tiny_tokenizer):
    """Labels are the answer tokens (with each turn's EOS) of Meta's per-turn encoding, -100 elsewhere."""
    tok = tiny_tokenizer
    conv = [msg(S, "be brief"), msg(U, "What is 2 plus 3?"), msg(A, "5"), msg(U, "thanks"), msg(A, "you are welcome")]
    # Reference construction from Meta's chat_completion: each turn is encode("[INST] u [/INST] a ", bos, eos)
    turn1_prompt = tok.encode("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nWhat is 2 plus 3? [/INST]")
    turn1 = tok.encode("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nWhat is 2 plus 3? [/INST] 5 ") + [tok.eos_token_id]
    turn2_prompt = tok.encode("[INST] thanks [/INST]")
    turn2 = tok.encode("[INST] thanks [/INST] you are welcome ") + [tok.eos_token_id]
    assert turn1[0] == tok.bos_token_id and turn1[: len(turn1_prompt)] == turn1_prompt

    def expected(train_first):
        first = turn1[len(turn1_prompt):] if train_first else [-100] * (len(turn1) - len(turn1_prompt))
        return [-100] * len(turn1_prompt) + first + [-100] * len(turn2_prompt) + turn2[len(turn2_prompt):]

    for train_on, train_first in (("all", True), ("last", False)):
        out, _ = prepare_sft_dataset(Dataset.from_list([{"messages": conv}]), tok, max_length=None, train_on=train_on)
        assert out[0]["input_ids"] == turn1 + turn2
        assert out[0]["labels"] == expected(train_first)
    labelled = [t for t in out[0]["labels"] if t != -100]  # Meta encodes "answer " (trailing space), then EOS
    assert tok.decode(labelled[:-1]) == "you are welcome " and labelled[-1] == tok.eos_token_id


def test_sft_policies_count_and_log(tiny_tokenizer, caplog):
    rows = [{"messages": [msg(U, "hi"), msg(A, "hello")]},
            {"messages": [msg(U, "hi"), msg(U, "again"), msg(A, "hello")]},
            {"messages": [msg(U, "what is the answer " * 20), msg(A, "yes " * 20)]}]
    with pytest.raises(ValueError, match="row 1, field 'messages'"):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, max_length=64)
    with pytest.raises(ValueError, match=r"row 2, field 'messages': \d+ tokens exceed max_length=64"):
        prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, max_length=64, on_invalid="drop")
    with caplog.at_level(logging.WARNING, logger="llama2_hf.data"):
        out, report = prepare_sft_dataset(Dataset.from_list(rows), tiny_tokenizer, max_length=64,
                                          on_invalid="drop", on_overlength="drop")
    assert (report.total, report.kept, dict(report.dropped)) == (3, 1, {"bad_roles": 1, "over_length": 1})
    assert "1/3 rows kept" in caplog.text and "bad_roles" in caplog.text
    # truncation keeps the start; a row whose answer is cut away entirely is dropped, counted
    out, report = prepare_sft_dataset(Dataset.from_list(rows[2:]), tiny_tokenizer, max_length=64,
                                      on_overlength="truncate")
    assert (report.kept, dict(report.dropped)) == (0, {"no_answer_after_truncation": 1})
    long_answer = [{"messages": [msg(U, "hi"), msg(A, "yes " * 80)]}]
    out, report = prepare_sft_dataset(Dataset.from_list(long_answer), tiny_tokenizer, max_length=64,
                                      on_overlength="truncate")
    assert report.truncated == 1 and len(out[0]["input_ids"]) == 64 and out[0]["labels"][-1] != -100


def test_sft_pretokenized_rows(tiny_tokenizer):
    out, _ = prepare_sft_dataset(Dataset.from_list([{"input_ids": [1, 5, 6, 2], "assistant_mask": [0, 0, 1, 1]}]),
                                 tiny_tokenizer, max_length=8)
    assert out[0]["labels"] == [-100, -100, 6, 2]
    with pytest.raises(ValueError, match="row 0, field 'labels'"):
        prepare_sft_dataset(Dataset.from_list([{"input_ids": [1, 5]}]), tiny_tokenizer, max_length=8)


# ----------------------------------------------------------------------------------------------- preference rows

@pytest.mark.parametrize("overrides, match", [
    ({"rating": "much_better"}, "row 7, field 'rating': unknown rating 'much_better'"),
    ({"rejected": " 5 "}, "row 7, field 'rejected': identical to 'chosen'"),
    ({"chosen": "   "}, "row 7, field 'chosen': the response is empty"),
    ({"prompt": [msg(U, "a"), msg(U, "b")]}, r"row 7, field 'prompt': messages\[1\].role must be 'assistant'"),
    ({"prompt": [msg(U, "a"), msg(A, "b")]}, "row 7, field 'prompt': must end with a 'user' message"),
    ({"safety_label": "unsafe"}, "row 7, field 'safety_label': 'unsafe' is not one of"),
    ({"is_safety_prompt": "yes"}, "row 7, field 'is_safety_prompt'"),
])
def test_preference_bad_rows(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate_preference(pref(**overrides), 7)


def test_preference_missing_field():
    row = pref()
    del row["rating"]
    with pytest.raises(ValueError, match=r"row 2, field 'rating': missing"):
        validate_preference(row, 2)


def test_preference_valid_row_and_unsure():
    p = validate_preference(pref(rating="unsure", safety_label="both_safe", is_safety_prompt=True), 0)
    assert p.prompt == [msg(U, "What is 2 plus 3?")] and p.rating == "negligibly_better"
    assert validate_preference(pref(rating=None), 0).rating is None


def test_prepare_preferences_tokens_margins_and_labels(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [pref(rating="significantly_better", safety_label="chosen_safe_rejected_unsafe",
                 prompt=[msg(U, "What is 2 plus 3?")]),
            pref(rating=None, prompt=[msg(S, "be brief"), msg(U, "hi"), msg(A, "hello"), msg(U, "2 plus 3?")])]
    out, report = prepare_preference_dataset(Dataset.from_list(rows), tok, max_length=256, margins="large")
    assert report.kept == 2
    # the full dialog with the response as the final assistant turn, ending with EOS (where the reward is read)
    assert out[0]["chosen_ids"] == tok.encode("[INST] What is 2 plus 3? [/INST] 5 ") + [tok.eos_token_id]
    assert out[0]["rejected_ids"] == tok.encode("[INST] What is 2 plus 3? [/INST] 6 ") + [tok.eos_token_id]
    assert out[1]["chosen_ids"][-1] == tok.eos_token_id
    assert out["margin"] == [3.0, 0.0] and out["rating_id"] == [0, -1] and out["safety_bin"] == [0, -1]
    assert out["length"][0] == max(len(out[0]["chosen_ids"]), len(out[0]["rejected_ids"]))


def test_prepare_preferences_overlength_policies(tiny_tokenizer):
    rows = [pref(), pref(chosen="yes " * 100)]
    with pytest.raises(ValueError, match="row 1, field 'chosen': the dialog has"):
        prepare_preference_dataset(Dataset.from_list(rows), tiny_tokenizer, max_length=48)
    out, report = prepare_preference_dataset(Dataset.from_list(rows), tiny_tokenizer, 48, on_overlength="drop")
    assert report.kept == 1 and dict(report.dropped) == {"over_length": 1}
    out, report = prepare_preference_dataset(Dataset.from_list(rows), tiny_tokenizer, 48, on_overlength="truncate")
    assert report.truncated == 1 and len(out[1]["chosen_ids"]) == 48
    assert out[1]["chosen_ids"][-1] == tiny_tokenizer.eos_token_id  # the end (response + EOS) is kept


def test_response_safety():
    chosen, rejected = response_safety(torch.tensor([0, 1, 2, -1]))
    assert SAFETY_LABELS == ("chosen_safe_rejected_unsafe", "both_safe", "both_unsafe")
    assert chosen.tolist() == [1, 1, 0, -1] and rejected.tolist() == [0, 1, 0, -1]


# ---------------------------------------------------------------------------------------------------------- adapters

def test_parse_hh_transcript():
    text = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4"
    assert parse_hh_transcript(text) == [msg(U, "hi there"), msg(A, "hello"), msg(U, "2+2?"), msg(A, "4")]
    with pytest.raises(ValueError, match="not an HH-RLHF transcript"):
        parse_hh_transcript("Human: hi")


def test_hh_rlhf_real_test_split(shared_data, tiny_tokenizer):
    raw = load_any(str(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"))
    assert len(raw) == 2312
    with pytest.raises(ValueError, match="row 1254, field 'rejected': chosen and rejected transcripts differ"):
        from_hh_rlhf(raw)
    prefs, report = from_hh_rlhf(raw, is_safety_prompt=True, on_invalid="drop")
    assert (report.kept, dict(report.dropped)) == (2307, {"prompt_mismatch": 5})
    first = prefs[0]
    assert first["prompt"][0] == msg(U, "what are some pranks with a pen i can do?")
    assert first["chosen"].startswith("No, sorry!") and first["rating"] is None and first["is_safety_prompt"]
    # rows 86 (empty chosen), 667 and 763 (two Assistant turns in a row) are real defects of the set
    subset = prefs.select([*range(80, 100), *range(660, 670), *range(760, 770)])
    with pytest.raises(ValueError, match="row 6, field 'chosen': the response is empty"):
        prepare_preference_dataset(subset, tiny_tokenizer, max_length=None)
    out, report = prepare_preference_dataset(subset, tiny_tokenizer, max_length=None, on_invalid="drop")
    assert (report.total, report.kept, dict(report.dropped)) == (40, 37, {"empty_response": 1, "bad_roles": 2})
    assert all(ids[-1] == tiny_tokenizer.eos_token_id for ids in out["rejected_ids"])


def test_trl_preference_formats():
    explicit = Dataset.from_list([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    out, _ = from_trl_preference(explicit, rating="better")
    assert out[0]["prompt"] == [msg(U, "2+2?")] and out[0]["rating"] == "better"
    implicit = Dataset.from_list([{"chosen": [msg(U, "2+2?"), msg(A, "4")], "rejected": [msg(U, "2+2?"), msg(A, "5")]}])
    out, _ = from_trl_preference(implicit)
    assert (out[0]["prompt"], out[0]["chosen"], out[0]["rejected"]) == ([msg(U, "2+2?")], "4", "5")
    with pytest.raises(ValueError, match="row 0, field 'prompt': text chosen/rejected need a 'prompt'"):
        from_trl_preference(Dataset.from_list([{"chosen": "4", "rejected": "5"}]))
    mismatched = Dataset.from_list([{"chosen": [msg(U, "a"), msg(A, "4")], "rejected": [msg(U, "b"), msg(A, "5")]}])
    out, report = from_trl_preference(mismatched, on_invalid="drop")
    assert len(out) == 0 and dict(report.dropped) == {"prompt_mismatch": 1}


# ------------------------------------------------------------------------------------------------------------ mixing

def _prefs(n, tag, **extra):
    return Dataset.from_list([pref(chosen=f"{tag} {i}", rejected=f"other {i}", **extra) for i in range(n)])


def test_standardize_preferences():
    out = standardize_preferences(Dataset.from_list([pref(extra_col=1)]))
    assert out.column_names == ["prompt", "chosen", "rejected", "rating", "safety_label", "is_safety_prompt"]
    assert out[0]["prompt"] == [msg(U, "What is 2 plus 3?")] and out[0]["safety_label"] is None


def test_helpfulness_rm_mix():
    mix = mix_helpfulness_rm_data({"meta_helpful": _prefs(30, "h")},
                                  {"meta_safety": _prefs(40, "s", safety_label="both_safe"), "open": _prefs(60, "o")},
                                  seed=1)
    sources = mix["source"]
    assert len(mix) == 60 and sources.count("meta_helpful") == 30  # all helpfulness + an equal amount of the rest
    assert sources.count("meta_safety") + sources.count("open") == 30
    assert 0 < sources.count("meta_safety") < 30  # sampled uniformly from both pools
    again = mix_helpfulness_rm_data({"meta_helpful": _prefs(30, "h")}, {"meta_safety": _prefs(40, "s"),
                                    "open": _prefs(60, "o")}, seed=1)
    assert again["chosen"] == mix["chosen"]  # seeded


def test_safety_rm_mix_is_90_10(caplog):
    mix = mix_safety_rm_data({"meta_safety": _prefs(60, "s"), "anthropic_harmless": _prefs(30, "a")},
                             {"meta_helpful": _prefs(50, "h"), "open_helpful": _prefs(50, "o")})
    assert len(mix) == 100 and mix["source"].count("meta_helpful") + mix["source"].count("open_helpful") == 10
    with caplog.at_level(logging.WARNING, logger="llama2_hf.data"):
        small = mix_safety_rm_data({"s": _prefs(180, "s")}, {"h": _prefs(5, "h")})
    assert len(small) == 185 and "asked for 20 rows but the pool has 5" in caplog.text


# ------------------------------------------------------------------------------- preference files (issue 14 item 3)

def jsonl(tmp_path, name, rows):
    import json

    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preference_file_unknown_column_names_the_closest(tmp_path):
    path = jsonl(tmp_path, "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "ratng": "better"}])
    with pytest.raises(InvalidDataFile, match=r"line 1: unknown column\(s\) 'ratng' \(did you mean 'rating'\?\)"):
        load_preference_files(path)


def test_preference_file_annotation_columns_are_accepted(tmp_path):
    row = pref(id="a1", annotator="ann-3", version=2, source="meta_helpful", annotated_at="2026-11-30T10:00:00Z")
    prefs, report = load_preference_files(jsonl(tmp_path, "p.jsonl", [row]))
    assert prefs[0]["rating"] == "better" and prefs[0]["prompt"] == [msg(U, "What is 2 plus 3?")]
    assert (report.total, report.kept) == (1, 1)


def test_missing_rating_is_refused_unless_unrated_is_allowed(tmp_path, caplog):
    path = jsonl(tmp_path, "p.jsonl", [pref(), {k: v for k, v in pref().items() if k != "rating"}, pref(rating=None)])
    with pytest.raises(InvalidDataFile, match=rf"{path}, line 2, field 'rating': missing.*allow_unrated"):
        load_preference_files(path)
    with caplog.at_level(logging.WARNING, logger="llama2_hf.data"):
        prefs, _ = load_preference_files(path, allow_unrated=True)
    assert prefs["rating"] == ["better", None, None] and "2 unrated pairs" in caplog.text


def test_unrated_file_formats_need_allow_unrated(tmp_path):
    hh = jsonl(tmp_path, "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                      "rejected": "\n\nHuman: hi\n\nAssistant: go away"}])
    with pytest.raises(InvalidDataFile, match="no 'prompt' and no 'rating' column.*allow_unrated"):
        load_preference_files(hh)
    prefs, _ = load_preference_files(hh, allow_unrated=True)
    assert prefs[0]["prompt"] == [msg(U, "hi")] and prefs[0]["rejected"] == "go away" and prefs[0]["rating"] is None
    trl = jsonl(tmp_path, "trl.jsonl", [{"chosen": [msg(U, "hi"), msg(A, "hello")],
                                        "rejected": [msg(U, "hi"), msg(A, "bye")]}])
    assert load_preference_files(trl, allow_unrated=True)[0][0]["chosen"] == "hello"


def test_preference_file_drop_policy_counts_and_bad_rows_name_the_line(tmp_path):
    path = jsonl(tmp_path, "p.jsonl", [pref(), pref(rejected="5"), pref(rating="much_better")])
    with pytest.raises(InvalidDataFile, match=rf"{path}, line 2, field 'rejected'"):
        load_preference_files(path)
    prefs, report = load_preference_files(path, on_invalid="drop")
    assert len(prefs) == 1 and dict(report.dropped) == {"identical_responses": 1, "unknown_rating": 1}


def test_auto_detected_unrated_set_is_a_warning(tmp_path, caplog):
    trl = jsonl(tmp_path, "trl.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "bye"}])
    with caplog.at_level(logging.INFO, logger="llama2_hf.data"):
        load_preference_data(str(trl))
    assert any(r.levelno == logging.WARNING and "no 'rating' column" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------- files that mix the allowed schemas

def test_sft_file_mixing_both_schemas_and_both_prompt_forms(tmp_path, tiny_tokenizer):
    """`messages` rows, text prompts and message-list prompts in one file: every row kept, in order, as the
    conversation it stands for (`Dataset.from_list` alone keeps the first row's columns only)."""
    path = jsonl(tmp_path, "sft.jsonl", [{"messages": [msg(U, "hi"), msg(A, "hello")]},
                                         {"prompt": "2 plus 3?", "answer": "5"},
                                         {"prompt": [msg(S, "be brief"), msg(U, "4 plus 4?")], "completion": "8"}])
    dataset = load_data_files(path, sft_messages)
    assert [sft_messages(row, i) for i, row in enumerate(dataset)] == [
        [msg(U, "hi"), msg(A, "hello")], [msg(U, "2 plus 3?"), msg(A, "5")],
        [msg(S, "be brief"), msg(U, "4 plus 4?"), msg(A, "8")]]
    tokenized, report = prepare_sft_dataset(dataset, tiny_tokenizer, max_length=None)
    assert report.kept == 3 and len(tokenized) == 3


def test_preference_file_mixing_text_and_message_prompts(tmp_path):
    path = jsonl(tmp_path, "p.jsonl", [pref(), pref(prompt=[msg(U, "hi"), msg(A, "hello"), msg(U, "2 plus 3?")])])
    prefs, report = load_preference_files(path)
    assert report.kept == 2
    assert prefs["prompt"] == [[msg(U, "What is 2 plus 3?")], [msg(U, "hi"), msg(A, "hello"), msg(U, "2 plus 3?")]]


def test_prompt_files_mixing_prompt_forms_and_duplicates_name_both_lines(tmp_path):
    path = jsonl(tmp_path, "prompts.jsonl", [{"prompt": "hi", "is_safety_prompt": True},
                                             {"prompt": [msg(U, "bye")]}, {"messages": [msg(U, "yo")], "id": "x"}])
    rows = load_prompts(path)
    assert [r.messages for r in rows] == [[msg(U, "hi")], [msg(U, "bye")], [msg(U, "yo")]]
    assert [r.is_safety_prompt for r in rows] == [True, False, False] and rows[2].id == "x"
    other = jsonl(tmp_path, "more.jsonl", [{"prompt": [msg(U, "hi")]}])  # the same prompt as line 1 of the first
    with pytest.raises(InvalidDataFile, match=rf"{other}, line 1: same id '[0-9a-f]{{16}}' as {path}, line 1"):
        load_prompts([path, other])


def test_a_field_with_two_types_names_both_lines(tmp_path):
    path = jsonl(tmp_path, "rows.jsonl", [{"prompt": "hi", "score": 1}, {"prompt": "yo"},
                                          {"prompt": "bye", "score": "high"}])
    with pytest.raises(InvalidDataFile, match=rf"{path}, line 3, field 'score': text, where {path}, line 1 has a "
                                              "number"):
        load_data_files(path)
