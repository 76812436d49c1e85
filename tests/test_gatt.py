"""Ghost Attention (paper §3.3): constraints, data generation, last-turn-only labels (packed and padded), list
generation, evaluation in Table 30 layout, and the `gatt`, `gatt-eval` and `gatt-lists` stages on a tiny model
(record, resume, refusal of other arguments, 2-process DDP equal to 1 process)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llama2_hf.collators import DataCollatorForAnswerOnlyLM, DataCollatorForPackedLM, pack_examples
from llama2_hf.gatt import (
    GATT_COLUMNS,
    RESOURCES,
    SUPPORTED_LANGUAGES,
    ConstraintSet,
    GAttDataConfig,
    GAttEvalResult,
    JudgeChecker,
    KeywordChecker,
    LanguageChecker,
    ModelJudge,
    build_eval_dialogues,
    canonical_language,
    detect_language,
    evaluate_gatt,
    format_table30,
    generate_constraint_list,
    keywords_of,
    load_constraint_sets,
    make_gatt_data,
    parse_generated_list,
    plot_adherence,
    read_list_file,
    sample_instruction,
    tokenize_gatt_dataset,
    validate_gatt_row,
)
from llama2_hf.cli import main as cli
from llama2_hf.gatt import plan_gatt_dialogues
from llama2_hf.runner import RunRecord, UsageError, stage_output
from llama2_hf.stages import run_stage
from llama2_hf.tokenization_llama2 import B_SYS, E_SYS

from conftest import write_jsonl


# ---------------------------------------------------------------------------------------------------------------------
# Language identification
# ---------------------------------------------------------------------------------------------------------------------

SENTENCES = {
    "English": "I really enjoy spending my weekends outdoors with my family, and we often go hiking in the hills.",
    "French": "Je suis très content de vous parler aujourd'hui. C'est une belle journée pour se promener dans le parc.",
    "Spanish": "Me gusta mucho pasar los fines de semana con mi familia. Hoy hace un día muy bonito y estoy feliz.",
    "German": "Ich bin heute sehr glücklich, weil das Wetter gut ist und wir mit den Kindern in den Park gehen.",
    "Italian": "Sono molto felice di parlare con te oggi. Questa è una bella giornata per una passeggiata.",
    "Portuguese": "Eu estou muito feliz de falar com você hoje. É um dia bonito para passear no parque.",
    "Dutch": "Ik ben heel blij dat ik vandaag met je kan praten. Het is een mooie dag om naar het park te gaan.",
    "Swedish": "Jag är mycket glad att prata med dig i dag. Det är en fin dag för en promenad i parken.",
    "Polish": "Jestem bardzo szczęśliwy, że mogę dziś z tobą rozmawiać. To jest piękny dzień na spacer.",
    "Turkish": "Bugün seninle konuştuğum için çok mutluyum. Arkadaşlarımla parkta yürüyüş için güzel bir gün.",
    "Russian": "Я очень рад поговорить с вами сегодня. Это прекрасный день для прогулки в парке.",
    "Greek": "Είμαι πολύ χαρούμενος που μιλάω μαζί σας σήμερα.",
    "Arabic": "أنا سعيد جدا بالتحدث معك اليوم.",
    "Hebrew": "אני מאוד שמח לדבר איתך היום.",
    "Hindi": "मैं आज आपसे बात करके बहुत खुश हूँ।",
    "Chinese": "我今天很高兴和你说话。天气很好。",
    "Japanese": "今日はあなたと話せてとても嬉しいです。",
    "Korean": "오늘 당신과 이야기하게 되어 정말 기쁩니다.",
    "Thai": "ฉันดีใจมากที่ได้คุยกับคุณวันนี้",
}


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_detect_language(language):
    assert detect_language(SENTENCES[language]) == language


def test_detect_language_edge_cases_and_shipped_languages():
    assert set(SENTENCES) == set(SUPPORTED_LANGUAGES)
    assert detect_language("1234 !!! ...") == "unknown"
    assert detect_language("") == "unknown"
    # every shipped language can be checked in evaluation
    for name in read_list_file(RESOURCES / "languages.txt"):
        assert canonical_language(name) == name
    with pytest.raises(ValueError, match="Klingon"):
        canonical_language("Klingon")


# ---------------------------------------------------------------------------------------------------------------------
# Constraints and instructions
# ---------------------------------------------------------------------------------------------------------------------

def test_shipped_constraint_sets():
    sets = load_constraint_sets()
    assert set(sets) == {"hobbies", "language", "public_figure"}
    for cs in sets.values():
        assert len(cs.values) >= 15
        assert len({v.lower() for v in cs.values}) == len(cs.values), f"duplicates in {cs.name}"
        assert cs.list_prompt and "{n}" in cs.list_prompt
    assert "Napoleon Bonaparte" in sets["public_figure"].values
    assert sets["public_figure"].short_form("Napoleon") == "Figure: Napoleon"


def test_paper_example_long_and_short_forms():
    figure = ConstraintSet("public_figure", ["Napoleon"], ["Always act as {value} from now."], "Figure: {value}")
    inst = sample_instruction({"public_figure": figure}, random.Random(0))
    assert inst.constraints == {"public_figure": "Napoleon"}
    assert inst.long == "Always act as Napoleon from now."
    assert inst.short == "Figure: Napoleon"


def test_random_combinations_of_constraints():
    sets = load_constraint_sets()
    rng = random.Random(0)
    draws = [sample_instruction(sets, rng) for _ in range(600)]
    sizes = {len(d.constraints) for d in draws}
    assert sizes == {1, 2, 3}
    combos = {tuple(d.constraints) for d in draws}
    assert len(combos) == 7  # every non-empty subset of the three types, in file order
    for d in draws:
        for name, value in d.constraints.items():
            assert value in sets[name].values and value in d.long and value in d.short
        assert len(d.short.splitlines()) == len(d.constraints)
    only = sample_instruction(sets, rng, num_constraints=(2, 2), types=["language", "hobbies"])
    assert list(only.constraints) == ["hobbies", "language"]
    with pytest.raises(ValueError, match="unknown constraint types"):
        sample_instruction(sets, rng, types=["colour"])


def test_constraint_spec_errors_and_value_files(tmp_path):
    (tmp_path / "colours.txt").write_text("# comment\nred\n\nblue\n")
    spec = {"colour": {"values": "colours.txt", "long": ["Your favourite colour is {value}."],
                       "short": "Colour: {value}"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    sets = load_constraint_sets(tmp_path / "spec.json")
    assert sets["colour"].values == ["red", "blue"]
    (tmp_path / "more.txt").write_text("green\n")
    assert load_constraint_sets(tmp_path / "spec.json", {"colour": tmp_path / "more.txt"})["colour"].values == \
        ["green"]
    spec["colour"]["short"] = "Colour"
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="placeholder"):
        load_constraint_sets(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------------------------------------------------

def _dialogue(n_turns: int, tag: str = "") -> dict:
    messages = []
    for k in range(n_turns):
        messages += [{"role": "user", "content": f"question {tag}{k}"}, {"role": "assistant", "content": f"old {k}"}]
    return {"messages": messages}


class RecordingSampler:
    """Answers `answer <turn>` and records every conversation it was asked about."""

    def __init__(self):
        self.calls: list[list[list[dict]]] = []

    def __call__(self, conversations):
        self.calls.append(conversations)
        return [f"answer {sum(m['role'] == 'user' for m in c)}" for c in conversations]


@pytest.mark.parametrize("placement", ["system", "prefix"])
def test_make_gatt_data_samples_with_instruction_everywhere_then_keeps_it_first(placement):
    sampler = RecordingSampler()
    config = GAttDataConfig(placement=placement, short_form_prob=0.0, seed=1)
    rows, stats = make_gatt_data([_dialogue(3), _dialogue(2, "b")], sampler, config=config)
    assert stats == {"dialogues": 2, "rows": 2, "short_form": 0, "stopped_at_context": 0, "skipped_too_long": 0,
                     "replaced_system": 0}
    # sampling: turn by turn, both dialogues batched, the long instruction concatenated to every user message
    assert [len(c) for c in sampler.calls] == [2, 2, 1]
    inst = rows[0]["sampling_instruction"]
    last = sampler.calls[2][0]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in last if m["role"] == "user"] == [f"{inst}\n\nquestion {k}" for k in range(3)]
    assert [m["content"] for m in last if m["role"] == "assistant"] == ["answer 1", "answer 2"]  # sampled, not old
    # final data: the instruction in the first turn only
    row = rows[0]
    validate_gatt_row(row, 0)
    assert set(row) == set(GATT_COLUMNS)
    assert row["train_on"] == "last" and row["num_turns"] == 3 and row["placement"] == placement
    assert row["instruction"] == inst and row["instruction_form"] == "long"
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    if placement == "system":
        assert row["messages"][0] == {"role": "system", "content": inst}
        assert users == ["question 0", "question 1", "question 2"]
    else:
        assert row["messages"][0]["role"] == "user"
        assert users == [f"{inst}\n\nquestion 0", "question 1", "question 2"]
    assert [m["content"] for m in row["messages"] if m["role"] == "assistant"] == ["answer 1", "answer 2", "answer 3"]
    assert rows[1]["num_turns"] == 2 and rows[1]["source_index"] == 1


def test_short_form_half_of_the_time():
    rows, stats = make_gatt_data([_dialogue(1)] * 1000, lambda cs: ["ok"] * len(cs), config=GAttDataConfig(seed=3))
    short = [r for r in rows if r["instruction_form"] == "short"]
    assert stats["short_form"] == len(short)
    assert 0.45 < len(short) / len(rows) < 0.55  # paper §3.3: half of the time
    for r in short:
        assert r["instruction"] != r["sampling_instruction"]
        assert r["messages"][0]["content"] == r["instruction"]
        assert all(line.split(": ", 1)[1] in r["constraints"].values() for line in r["instruction"].splitlines())


def test_prefixes_max_turns_context_stop_and_system_replacement():
    sampler = RecordingSampler()
    rows, _ = make_gatt_data([_dialogue(3)], sampler, config=GAttDataConfig(examples="prefixes"))
    assert [r["num_turns"] for r in rows] == [1, 2, 3]
    assert rows[1]["messages"] == rows[2]["messages"][:-2]

    rows, _ = make_gatt_data([_dialogue(4)], RecordingSampler(), config=GAttDataConfig(max_turns=2))
    assert rows[0]["num_turns"] == 2

    # a token counter of one token per message: dialogues stop once the prompt (+ reserve 0) exceeds 4 messages
    with_system = {"messages": [{"role": "system", "content": "be brief"}, *_dialogue(5)["messages"]]}
    rows, stats = make_gatt_data([with_system, _dialogue(1)], RecordingSampler(),
                                 config=GAttDataConfig(max_length=3), token_counter=len)
    assert rows[0]["num_turns"] == 2 and rows[1]["num_turns"] == 1
    assert stats["stopped_at_context"] == 1 and stats["replaced_system"] == 1
    assert all(m["content"] != "be brief" for m in rows[0]["messages"])
    rows, stats = make_gatt_data([_dialogue(2)], RecordingSampler(), config=GAttDataConfig(max_length=0),
                                 token_counter=len)
    assert rows == [] and stats["skipped_too_long"] == 1


def test_fixed_instructions_instead_of_constraints():
    sampler = RecordingSampler()
    config = GAttDataConfig(instructions=("Always talk like a pirate.",), short_form_prob=1.0)
    rows, stats = make_gatt_data([_dialogue(2)], sampler, config=config)
    assert stats["short_form"] == 0
    row = rows[0]
    validate_gatt_row(row, 0)
    assert row["constraints"] == {} and row["instruction_form"] == "long"
    assert row["messages"][0] == {"role": "system", "content": "Always talk like a pirate."}
    assert sampler.calls[1][0][-1]["content"] == "Always talk like a pirate.\n\nquestion 1"


def test_chat_sampler(tiny_tokenizer, tiny_model_factory):
    from llama2_hf.gatt import ChatSampler
    from llama2_hf.generation import SamplingConfig

    model = tiny_model_factory()
    sampler = ChatSampler(model, tiny_tokenizer, SamplingConfig(max_new_tokens=3, temperature=0.0))
    conversations = [[{"role": "user", "content": "hello"}], [{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": "what is the sun"}]]
    answers = sampler(conversations)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert sampler(conversations) == answers  # greedy
    assert sampler.count_tokens(conversations[0]) == len(tiny_tokenizer.encode("[INST] hello [/INST]"))
    assert sampler.max_length == model.config.max_position_embeddings and sampler.max_new_tokens == 3
    assert sampler([]) == []
    with pytest.raises(ValueError, match="num_samples must be 1"):
        ChatSampler(model, tiny_tokenizer, SamplingConfig(num_samples=2))


def test_make_gatt_data_rejects_bad_rows():
    with pytest.raises(ValueError, match="row 1.*messages"):
        make_gatt_data([_dialogue(1), {"text": "x"}], RecordingSampler())
    with pytest.raises(ValueError, match="row 0, field 'messages'"):
        make_gatt_data([{"messages": [{"role": "assistant", "content": "hi"}]}], RecordingSampler())
    with pytest.raises(ValueError, match="placement"):
        GAttDataConfig(placement="middle")


# ---------------------------------------------------------------------------------------------------------------------
# Last-turn-only labels at exact token positions, padded and packed
# ---------------------------------------------------------------------------------------------------------------------

def _gatt_row(turns: list[tuple[str, str]], system: str) -> dict:
    messages = [{"role": "system", "content": system}]
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": messages, "train_on": "last", "instruction": system, "instruction_form": "short",
            "sampling_instruction": system, "constraints": {"public_figure": "Napoleon"}, "placement": "system",
            "num_turns": len(turns), "source_index": 0}


def _by_hand(tok, turns: list[tuple[str, str]], system: str) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Meta's chat ids built turn by turn, the expected labels (only the last answer + EOS) and each answer's span."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ids, spans = [], []
    for k, (u, a) in enumerate(turns):
        user = B_SYS + system + E_SYS + u if k == 0 else u
        prompt = [1] + enc(f"[INST] {user} [/INST]")
        full = [1] + enc(f"[INST] {user} [/INST] {a} ") + [2]
        assert full[: len(prompt)] == prompt
        spans.append((len(ids) + len(prompt), len(ids) + len(full)))
        ids += full
    start, end = spans[-1]
    labels = [-100] * start + ids[start:end]
    return ids, labels, spans


TURNS_A = [("hello world", "hi there"), ("what is the sun", "the sun is a star"), ("thanks", "you are welcome")]
TURNS_B = [("give me a poem", "the cat and the moon"), ("more please", "yes the dog")]


def test_gatt_labels_exact_positions(tiny_tokenizer):
    tok = tiny_tokenizer
    ds, report = tokenize_gatt_dataset([_gatt_row(TURNS_A, "Figure: Napoleon")], tok)
    ids, labels, spans = _by_hand(tok, TURNS_A, "Figure: Napoleon")
    assert ds[0]["input_ids"] == ids
    assert ds[0]["labels"] == labels
    # earlier assistant answers are in the input but carry no loss; the last answer and its EOS do
    for start, end in spans[:-1]:
        assert end - start > 1 and set(ds[0]["labels"][start:end]) == {-100}
    start, end = spans[-1]
    assert ds[0]["labels"][start:end] == ids[start:end] and ids[end - 1] == tok.eos_token_id
    assert tok.decode(ids[start:end - 1]).strip() == "you are welcome"
    assert report.kept == 1


def test_gatt_labels_with_and_without_packing(tiny_tokenizer, tiny_model_factory):
    tok = tiny_tokenizer
    rows = [_gatt_row(TURNS_A, "Figure: Napoleon"), _gatt_row(TURNS_B, "Language: French")]
    ds, _ = tokenize_gatt_dataset(rows, tok)
    ex = ds.to_list()
    (ids_a, lab_a, _), (ids_b, lab_b, _) = _by_hand(tok, TURNS_A, "Figure: Napoleon"), \
        _by_hand(tok, TURNS_B, "Language: French")

    padded = DataCollatorForAnswerOnlyLM(pad_token_id=0)(ex)
    width = max(len(ids_a), len(ids_b))
    assert padded["labels"].tolist() == [lab_a + [-100] * (width - len(ids_a)), lab_b + [-100] * (width - len(ids_b))]

    packed_rows = pack_examples(ex, max_length=len(ids_a) + len(ids_b) + 3, strategy="ordered_rows")
    assert len(packed_rows) == 1
    packed = DataCollatorForPackedLM(pad_token_id=0)(packed_rows)
    assert packed["input_ids"][0].tolist() == ids_a + ids_b
    assert packed["labels"][0].tolist() == lab_a + lab_b  # both examples start with BOS (-100 anyway)
    assert packed["position_ids"][0].tolist() == list(range(len(ids_a))) + list(range(len(ids_b)))

    # the same tokens carry the loss packed or padded, so the loss is the same
    model = tiny_model_factory()
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)


def test_tokenize_rejects_rows_not_trained_on_last(tiny_tokenizer):
    row = _gatt_row(TURNS_B, "Figure: Napoleon")
    with pytest.raises(ValueError, match="row 0, field 'train_on'"):
        tokenize_gatt_dataset([{**row, "train_on": "all"}], tiny_tokenizer)
    with pytest.raises(ValueError, match="row 0: missing GAtt fields"):
        tokenize_gatt_dataset([{"messages": row["messages"]}], tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# Constraint lists written by a chat model
# ---------------------------------------------------------------------------------------------------------------------

MESSY_ANSWER = """Sure! Here are some hobbies that people enjoy:

1. **Tennis** - a racket sport played on a court
2) Rock climbing: indoor or outdoor
3. "Gardening"
4. tennis
- Bird watching (especially in spring)
* Playing the piano.
• Knitting, which is relaxing
10. Reading books about the history of the ancient world and its many famous empires
Why not try one of them?

I hope this helps!"""


def test_parse_generated_list():
    assert parse_generated_list(MESSY_ANSWER) == ["Tennis", "Rock climbing", "Gardening", "Bird watching",
                                                  "Playing the piano", "Knitting"]
    assert parse_generated_list("Here they are: tennis, chess, hiking and baking.") == \
        ["tennis", "chess", "hiking", "baking"]
    assert parse_generated_list("") == []


def test_generate_constraint_list_dedupes_across_rounds_and_existing():
    answers = iter(["1. Tennis\n2. Chess\n3. Golf", "1. chess\n2. Sailing", "1. Sailing\n2. Origami\n3. Judo"])
    seen_prompts = []

    def sampler(conversations):
        seen_prompts.extend(c[0]["content"] for c in conversations)
        return [next(answers) for _ in conversations]

    hobbies = load_constraint_sets()["hobbies"]
    new = generate_constraint_list(sampler, hobbies, n=4, existing=["Golf"], samples_per_round=1, max_rounds=5)
    assert new == ["Tennis", "Chess", "Sailing", "Origami"]
    assert seen_prompts == [hobbies.list_prompt.format(n=4)] * 3
    no_prompt = ConstraintSet("x", ["a"], ["{value}"], "{value}")
    with pytest.raises(ValueError, match="no 'list_prompt'"):
        generate_constraint_list(sampler, no_prompt, n=1)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def test_checkers():
    lang = LanguageChecker()
    assert lang.check(SENTENCES["French"], "language", "french", "", [])
    assert not lang.check(SENTENCES["English"], "language", "French", "", [])
    kw = KeywordChecker()
    assert keywords_of("Napoleon Bonaparte") == ["napol", "bonapa"]
    assert keywords_of("Photography") == ["photogra"] and keywords_of("Tennis") == ["tennis"]
    assert kw.check("Bonaparte is my name.", "public_figure", "Napoleon Bonaparte", "", [])
    assert kw.check("I love taking photographs.", "hobbies", "Photography", "", [])
    assert not kw.check("I am an AI assistant.", "public_figure", "Napoleon Bonaparte", "", [])
    assert not KeywordChecker(mode="all").check("Napoleon!", "public_figure", "Napoleon Bonaparte", "", [])
    assert kw.handles("hobbies") and not kw.handles("language")
    calls = []
    judge = JudgeChecker(lambda inst, resp, value, ctx: calls.append(inst) or "yes" in resp)
    assert judge.check("yes indeed", "public_figure", "Cleopatra", "", []) and judge.handles("anything")
    assert calls == ["Act as Cleopatra."]


class _FixedLogits(torch.nn.Module):
    """A 'language model' whose next-token logits are fixed by construction."""

    def __init__(self, vocab: int, favoured: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.logits[favoured] = 5.0

    def forward(self, input_ids, **kwargs):
        return type("Out", (), {"logits": self.logits.expand(*input_ids.shape, -1)})()


def test_model_judge(tiny_tokenizer):
    tok = tiny_tokenizer
    yes = tok.encode("Yes", add_special_tokens=False)[0]
    no = tok.encode("No", add_special_tokens=False)[0]
    assert ModelJudge(_FixedLogits(len(tok), yes), tok)("Act as Napoleon.", "I am Napoleon.", "Napoleon", [])
    assert not ModelJudge(_FixedLogits(len(tok), no), tok)("Act as Napoleon.", "I am Napoleon.", "Napoleon", [])


def _probe_dialogues(n: int, turns: int = 20) -> list[dict]:
    return [{"instruction": "Always act as Napoleon Bonaparte from now.",
             "constraints": {"public_figure": "Napoleon Bonaparte"},
             "user_turns": [f"turn {t}" for t in range(1, turns + 1)],
             "checks": [["public_figure"] if t % 2 == 0 else [] for t in range(1, turns + 1)]} for _ in range(n)]


def _persona_sampler(memory: list[int]):
    """Stays in character up to turn `memory[i]` of dialogue i (dialogues told apart by a counter per call)."""

    def sampler(conversations):
        out = []
        for i, c in enumerate(conversations):
            assert c[0] == {"role": "system", "content": "Always act as Napoleon Bonaparte from now."}
            turn = sum(m["role"] == "user" for m in c)
            out.append("Napoleon speaking." if turn <= memory[i] else "I am a helpful assistant.")
        return out

    return sampler


TABLE30 = """| Dialogue Turn | Baseline | + GAtt |
|---------------|----------|--------|
| 2             | 100%     | 100%   |
| 4             | 10%      | 100%   |
| 6             | 0%       | 100%   |
| 20            | 0%       | 100%   |"""


def test_evaluate_gatt_table30_and_plot(tmp_path):
    dialogues = _probe_dialogues(10)
    baseline = evaluate_gatt(_persona_sampler([4] + [2] * 9), dialogues, [KeywordChecker()])
    gatt = evaluate_gatt(_persona_sampler([99] * 10), dialogues, [KeywordChecker()])
    assert sorted(baseline.turns) == list(range(2, 21, 2))
    assert (baseline.turns[4].n, baseline.turns[4].adhered) == (10, 1)
    assert baseline.turns[4].by_constraint == {"public_figure": [1, 10]}
    assert format_table30({"Baseline": baseline, "+ GAtt": gatt}) == TABLE30
    t = baseline.transcripts[0]
    assert t["turns_reached"] == 20 and len(t["messages"]) == 41 and t["verdicts"][0] is None
    assert t["verdicts"][3] == {"public_figure": True} and t["verdicts"][5] == {"public_figure": False}
    again = GAttEvalResult.from_dict(json.loads(json.dumps(baseline.to_dict())))
    assert format_table30({"Baseline": again, "+ GAtt": gatt}) == TABLE30
    png = plot_adherence({"Baseline": baseline, "+ GAtt": gatt}, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_gatt_stops_at_context_and_validates():
    # one token per message and a 12-token context: the prompt of turn t has 2t messages (system + 2t - 1)
    result = evaluate_gatt(_persona_sampler([99] * 3), _probe_dialogues(3), [KeywordChecker()], max_length=12,
                           token_counter=len)
    assert max(result.turns) == 6 and result.transcripts[0]["turns_reached"] == 6
    assert "| 20            | -" in format_table30({"m": result})
    with pytest.raises(ValueError, match="no checker handles constraint type 'public_figure'"):
        evaluate_gatt(_persona_sampler([1]), _probe_dialogues(1), [LanguageChecker()])
    bad = _probe_dialogues(1)
    bad[0]["checks"] = bad[0]["checks"][:-1]
    with pytest.raises(ValueError, match="eval dialogue 0"):
        evaluate_gatt(_persona_sampler([1]), bad, [KeywordChecker()])


def test_build_eval_dialogues():
    rows = build_eval_dialogues(num_dialogues=20, max_turns=20, types=("public_figure", "hobbies", "language"),
                                num_constraints=(1, 3), seed=0)
    sets = load_constraint_sets()
    for row in rows:
        assert len(row["user_turns"]) == len(row["checks"]) == 20
        for turn, (user, judged) in enumerate(zip(row["user_turns"], row["checks"]), start=1):
            if turn % 2:
                assert judged == []
                continue
            assert judged and set(judged) <= set(row["constraints"])
            probed = [t for t in judged if t != "language"]
            if probed:
                assert user in sets[probed[0]].probes
            assert ("language" in judged) == ("language" in row["constraints"])
    assert build_eval_dialogues(num_dialogues=3, seed=1) == build_eval_dialogues(num_dialogues=3, seed=1)


# ---------------------------------------------------------------------------------------------------------------------
# Stages: `gatt` on a tiny model, then SFT on its data; `gatt-eval`, `gatt-lists`
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_chat_dir(tmp_path, tiny_tokenizer, tiny_model_factory):
    path = tmp_path / "tiny-chat"
    tiny_model_factory().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _write_dialogues(path, turns=(1, 2, 3, 2)):
    return write_jsonl(path, [_dialogue(n, f"d{i}") for i, n in enumerate(turns)])


GREEDY = {"max_new_tokens": 4, "temperature": 0.0, "prompt_batch_size": 1}


def test_gatt_stage_writes_data_then_sft_trains_on_it(tmp_path, tiny_chat_dir, tiny_tokenizer):
    from datasets import Dataset

    from llama2_hf.modeling_llama2 import Llama2ForCausalLM
    from llama2_hf.trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

    source = _write_dialogues(tmp_path / "dialogues.jsonl")
    out = tmp_path / "gatt"
    record = run_stage("gatt", model_name_or_path=str(tiny_chat_dir), dialogues_file=[str(source)],
                       output_dir=str(out), max_new_tokens=6, prompt_batch_size=4)
    assert record.outputs["data"] == "gatt.jsonl" and record.metrics["rows"] == 4
    assert record.metrics["dialogues"] == 4 and record.args["temperature"] == 0.6
    rows = [json.loads(line) for line in (out / "gatt.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        validate_gatt_row(row, i)
        assert set(row) == set(GATT_COLUMNS) and row["source_index"] == i
    assert [r["num_turns"] for r in rows] == [1, 2, 3, 2]
    # the plan (instructions and forms) is the one `make_gatt_data` draws from the same seed
    plans = plan_gatt_dialogues([_dialogue(n, f"d{i}") for i, n in enumerate((1, 2, 3, 2))], None,
                                GAttDataConfig())
    assert [r["sampling_instruction"] for r in rows] == [p.instruction.long for p in plans]
    assert stage_output(out, "data") == out / "gatt.jsonl"

    # a few SFT steps on the GAtt data, loss on the last turn only, packed rows
    model = Llama2ForCausalLM.from_pretrained(tiny_chat_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = Llama2SFTConfig(output_dir=str(tmp_path / "sft"), train_on="last", max_length=256, packing=True,
                             global_batch_size=None, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                             use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
                             logging_steps=1, dataloader_num_workers=0)
    trainer = Llama2SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                               processing_class=tiny_tokenizer)
    expected, _ = tokenize_gatt_dataset(rows, tiny_tokenizer)
    packed_labels = sorted(t for r in trainer.train_dataset["labels"] for t in r if t != -100)
    assert packed_labels == sorted(t for r in expected["labels"] for t in r if t != -100)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_gatt_stage_resume_redoes_only_missing_dialogues_and_refuses_other_args(tmp_path, tiny_chat_dir,
                                                                               monkeypatch):
    import llama2_hf.stages.gatt as stage

    source = _write_dialogues(tmp_path / "dialogues.jsonl")
    args = {"model_name_or_path": str(tiny_chat_dir), "dialogues_file": [str(source)], **GREEDY}
    fresh = run_stage("gatt", output_dir=str(tmp_path / "fresh"), **args)

    real, sampled = stage.sample_gatt_rows, []

    def killed_after_two(plans, *a, **k):
        if len(sampled) == 2:
            raise KeyboardInterrupt  # a kill after two finished chunks
        sampled.extend(p.index for p in plans)
        return real(plans, *a, **k)

    monkeypatch.setattr(stage, "sample_gatt_rows", killed_after_two)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_stage("gatt", output_dir=str(out), **args)
    assert not (out / "run.json").exists() and (out / "run_args.json").is_file()
    with pytest.raises(UsageError, match=r"temperature: 0.0 -> 0.6"):
        run_stage("gatt", output_dir=str(out), **{**args, "temperature": 0.6})
    with pytest.raises(UsageError, match=r"short_form_prob: 0.5 -> 1.0"):
        run_stage("gatt", output_dir=str(out), short_form_prob=1.0, **args)
    monkeypatch.setattr(stage, "sample_gatt_rows", lambda plans, *a, **k: sampled.extend(p.index for p in plans)
                        or real(plans, *a, **k))
    resumed = run_stage("gatt", output_dir=str(out), **args)
    assert sampled == [0, 1, 2, 3]  # dialogues 0 and 1 were not sampled again
    assert (out / "gatt.jsonl").read_text() == (tmp_path / "fresh" / "gatt.jsonl").read_text()
    assert resumed.metrics == fresh.metrics


def test_gatt_stage_bad_dialogue_names_file_and_line(tmp_path, tiny_chat_dir, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [_dialogue(1), {"messages": [{"role": "assistant", "content": "x"}]}])
    code = cli(["gatt", "--model_name_or_path", str(tiny_chat_dir), "--dialogues_file", str(bad),
                "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}, line 2, field 'messages'" in err and "Traceback" not in err
    lists = tmp_path / "empty-lists"
    lists.mkdir()
    with pytest.raises(UsageError, match="no TYPE.txt list file"):
        run_stage("gatt", model_name_or_path=str(tiny_chat_dir), dialogues_file=[str(_write_dialogues(
            tmp_path / "ok.jsonl"))], output_dir=str(tmp_path / "o2"), constraint_lists=str(lists))


def test_gatt_constraint_lists_option_replaces_the_hand_written_values(tmp_path):
    assert GAttDataConfig().constraint_lists is None  # default: the shipped hand-written lists
    assert GAttDataConfig().constraint_sets()["hobbies"].values == load_constraint_sets()["hobbies"].values
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "hobbies.txt").write_text("# written by a model\nbirdwatching\nfencing\n")
    sets = GAttDataConfig(constraint_lists=str(lists)).constraint_sets()
    assert sets["hobbies"].values == ["birdwatching", "fencing"]
    assert sets["public_figure"].values == load_constraint_sets()["public_figure"].values


def test_gatt_ddp_two_processes_equal_one_process(tmp_path, tiny_chat_dir):
    from conftest import accelerate_launch

    source = _write_dialogues(tmp_path / "dialogues.jsonl", (1, 2, 2, 1, 2))
    args = {"model_name_or_path": str(tiny_chat_dir), "dialogues_file": [str(source)], **GREEDY}
    run_stage("gatt", output_dir=str(tmp_path / "one"), **args)
    proc = accelerate_launch(["gatt", "--model_name_or_path", tiny_chat_dir, "--dialogues_file", source,
                              "--output_dir", tmp_path / "two", "--max_new_tokens", "4", "--temperature", "0.0",
                              "--prompt_batch_size", "1"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert RunRecord.read(tmp_path / "two").world_size == 2
    assert sorted(p.name for p in (tmp_path / "two" / "parts").glob("gatt.rank*")) == \
        ["gatt.rank0-of-2.jsonl", "gatt.rank1-of-2.jsonl"]
    one = (tmp_path / "one" / "gatt.jsonl").read_text()
    assert one and (tmp_path / "two" / "gatt.jsonl").read_text() == one


def test_gatt_eval_stage_table_compare_and_lists(tmp_path, tiny_chat_dir):
    out = tmp_path / "eval"
    record = run_stage("gatt-eval", model_name_or_path=str(tiny_chat_dir), eval_name="tiny", num_dialogues=2,
                       eval_max_turns=4, turns=[2, 4], output_dir=str(out), max_new_tokens=4, prompt_batch_size=4)
    assert (out / "table30.md").read_text().startswith("| Dialogue Turn | tiny |")
    assert (out / "gatt_adherence.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((out / "gatt_eval.json").read_text())["tiny"]
    assert result["turns"]["2"]["n"] == 2 and len(result["transcripts"]) == 2
    assert set(record.metrics["adherence"]["tiny"]) == {"2", "4"}
    # the old `table` command: merge earlier results without a model
    merged = tmp_path / "merged"
    run_stage("gatt-eval", compare=[str(out)], output_dir=str(merged), turns=[2, 4])
    assert (merged / "table30.md").read_text() == (out / "table30.md").read_text()
    with pytest.raises(UsageError, match="nothing to evaluate"):
        run_stage("gatt-eval", output_dir=str(tmp_path / "none"))

    from llama2_hf.runner import build
    from llama2_hf.stages.gatt_lists import STAGE

    lists = tmp_path / "lists"
    STAGE.main(*build(STAGE, model_name_or_path=str(tiny_chat_dir), output_dir=str(lists), list_types=["hobbies"],
                      num_values=2, merge=True, samples_per_round=2, max_rounds=1, max_new_tokens=12))
    values = read_list_file(lists / "hobbies.txt")
    assert values[: len(load_constraint_sets()["hobbies"].values)] == load_constraint_sets()["hobbies"].values
    assert GAttDataConfig(constraint_lists=str(lists)).constraint_sets()["hobbies"].values == values
