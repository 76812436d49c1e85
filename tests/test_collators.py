"""Answer-only and packing collators, bin packing, and the preference collator, with literal tensors."""

import pytest
import torch

from llama2_hf.collators import (
    PACKED_SDPA,
    ChunkSortedSampler,
    DataCollatorForAnswerOnlyLM,
    DataCollatorForPackedLM,
    DataCollatorForRatedPreference,
    answer_labels,
    bin_lengths,
    pack_examples,
    use_packed_sdpa,
)
from llama2_hf.tokenization_llama2 import encode_chat_with_mask

LENGTHS = [5, 4, 3, 3, 2, 1]


def test_answer_labels():
    assert answer_labels([1, 10, 11, 12, 2], [0, 0, 1, 1, 1]) == [-100, -100, 11, 12, 2]
    with pytest.raises(ValueError, match="2 mask values"):
        answer_labels([1, 2, 3], [0, 1])


def test_best_fit_decreasing_bins():
    # 5 -> new bin (room 3); 4 -> new bin (room 4); 3 -> tightest fit is bin 0 (room 3 -> 0); 3 -> bin 1 (room 1);
    # 2 -> nothing fits, new bin (room 6); 1 -> tightest fit is bin 1 (room 1 -> 0).
    assert bin_lengths(LENGTHS, 8) == [[0, 2], [1, 3, 5], [4]]


def test_ordered_bins_keep_dataset_order():
    assert bin_lengths(LENGTHS, 8, "ordered_rows") == [[0], [1, 2], [3, 4, 5]]


def test_bins_reject_over_capacity_and_unknown_strategy():
    with pytest.raises(ValueError, match=r"examples \[1\] are longer than the row length 4"):
        bin_lengths([3, 5], 4)
    with pytest.raises(ValueError, match="packing strategy"):
        bin_lengths([3], 4, "wrapped")


def test_pack_examples_concatenates_and_records_lengths():
    examples = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
                {"input_ids": [1, 7], "assistant_mask": [0, 1]},
                {"input_ids": [1, 8, 9, 4], "labels": [-100, -100, 9, 4]}]
    rows = pack_examples(examples, max_length=6, strategy="ordered_rows")
    assert rows == [{"input_ids": [1, 5, 6, 1, 7], "labels": [-100, 5, 6, -100, 7], "seq_lengths": [3, 2]},
                    {"input_ids": [1, 8, 9, 4], "labels": [-100, -100, 9, 4], "seq_lengths": [4]}]


def test_packed_collator_literal():
    rows = [{"input_ids": [1, 5, 6, 1, 7], "labels": [-100, 5, 6, 1, 7], "seq_lengths": [3, 2]},
            {"input_ids": [1, 8], "labels": [-100, 8]}]
    batch = DataCollatorForPackedLM(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the mask comes from positions
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 8, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # the first token of every packed example (position 0) never carries a label: nothing predicts across a boundary
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7], [-100, 8, -100, -100, -100]]


def test_packed_collator_pad_to_multiple_and_bad_lengths():
    collate = DataCollatorForPackedLM(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0]] and batch["position_ids"].tolist() == [[0, 1, 2, 0]]
    with pytest.raises(ValueError, match="do not add up"):
        DataCollatorForPackedLM(0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lengths": [2, 2]}])


def test_answer_only_collator_literal():
    batch = DataCollatorForAnswerOnlyLM(pad_token_id=0)([{"input_ids": [1, 5, 6], "assistant_mask": [0, 0, 1]},
                                                         {"input_ids": [1, 7], "labels": [-100, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6], [-100, 7, -100]]
    with pytest.raises(ValueError, match="'labels' or 'assistant_mask'"):
        DataCollatorForAnswerOnlyLM(0)([{"input_ids": [1, 2]}])


def test_rated_preference_collator_literal():
    batch = DataCollatorForRatedPreference(pad_token_id=0)([
        {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 1.0, "rating_id": 0, "safety_bin": 2},
        {"chosen_ids": [6, 7], "rejected_ids": [8], "margin": 0.0, "rating_id": -1, "safety_bin": -1}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert batch["margin"].tolist() == [1.0, 0.0]
    assert batch["rating_id"].tolist() == [0, -1] and batch["safety_bin"].tolist() == [2, -1]


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_SDPA])
def test_packed_rows_do_not_attend_across_examples(tiny_tokenizer, tiny_model_factory, attention):
    """Each example's logits in a packed row equal its logits alone: position restarts, block-diagonal attention
    (transformers' mask for sdpa / eager; one sdpa call per example for the packed kernel)."""
    model = tiny_model_factory()  # GQA: 4 query heads, 2 KV heads
    if attention == PACKED_SDPA:
        use_packed_sdpa(model)
    else:
        model.set_attn_implementation(attention)
    dialogs = [[{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}],
               [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
                {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "yes"}]]
    examples = []
    for d in dialogs:
        enc = encode_chat_with_mask(tiny_tokenizer, d, train_on="last")
        examples.append({"input_ids": enc.input_ids, "labels": answer_labels(enc.input_ids, enc.assistant_mask)})
    batch = DataCollatorForPackedLM(0)(pack_examples(examples, 128, "ordered_rows"))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start: start + len(e["input_ids"])], alone, atol=1e-5, rtol=1e-5)
            start += len(e["input_ids"])


def test_chunk_sorted_sampler():
    lengths = [5, 1, 7, 3, 8, 2, 6, 4, 9, 10]
    sampler = ChunkSortedSampler(lengths, chunk_size=4, seed=3)
    order = list(sampler)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert sorted(order) == list(range(10)) and len(sampler) == 10
    for start in (0, 4, 8):  # each optimizer step: the same random set as the permutation, longest first
        chunk = order[start: start + 4]
        assert set(chunk) == set(perm[start: start + 4])
        assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)
    assert list(sampler) == order  # deterministic (all processes agree)
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_packed_sdpa_is_plain_sdpa_on_padded_batches_and_generation(tiny_model_factory):
    reference, packed = tiny_model_factory(), tiny_model_factory()
    use_packed_sdpa(packed)
    assert packed.config._attn_implementation == PACKED_SDPA
    ids = torch.tensor([[1, 30, 31, 32, 33], [1, 40, 41, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(packed.generate(ids[:1], **kwargs), reference.generate(ids[:1], **kwargs))
