"""Ghost Attention (GAtt, paper §3.3, §A.3.5, Table 30, Fig. 9-10, 28): data generation, training data, evaluation.

GAtt keeps a system instruction alive over many turns by editing fine-tuning data:
1. take multi-turn dialogues and an instruction `inst` that should hold for the whole dialogue, built as a random
   combination of constraints (hobby, language, public figure);
2. sample the assistant's answers turn by turn with `inst` concatenated to every user message;
3. keep `inst` in the first turn only (as the system message, or as a prefix of the first user message), using its
   short form ("Figure: Napoleon" instead of "Always act as Napoleon from now") half of the time;
4. train with the loss on the last assistant turn only: every token of previous turns, assistant answers included,
   gets no loss (`train_on="last"`).

GAtt SFT dataset (JSONL, one dialogue per row; `llama2-hf gatt` writes it as `gatt.jsonl`):
    messages              list of {"role", "content"}: ["system" with the instruction (placement "system")],
                          then user/assistant alternating from user, ending with assistant. Only the first turn
                          carries the instruction; the assistant answers are the sampled ones.
    train_on              "last": loss on the final assistant turn only (see `tokenize_gatt_dataset`).
    instruction           the instruction text as it appears in the first turn (long or short form).
    instruction_form      "long" | "short".
    sampling_instruction  the long form, concatenated to every user turn while sampling.
    constraints           {constraint type: value}, e.g. {"public_figure": "Napoleon Bonaparte", "language": "French"};
                          {} for an instruction given as text (`GAttDataConfig.instructions`).
    placement             "system" | "prefix".
    num_turns             number of user/assistant pairs in `messages`.
    source_index          row of the source dialogue in the input dataset.

Evaluation (`evaluate_gatt`, `llama2-hf gatt-eval`): dialogues whose instruction is given in the first turn only
(as at inference), answers generated turn by turn until `max_turns` or the context length, and at probe turns each
constraint judged by pluggable checkers (`LanguageChecker`: the light-weight `detect_language` below, no download;
`KeywordChecker`: persona and hobby keywords; `JudgeChecker`: a yes/no judge such as `ModelJudge`). Adherence by
turn is written in Table 30's layout (`format_table30`) and plotted (`plot_adherence`).

Choices where the paper is silent (all options):
- sampling concatenates the long instruction to *every* user message, the first included, separated by a blank line;
  in the final data the instruction is a system message (`placement="system"`, how Llama 2-Chat takes instructions
  at inference) and the short form replaces the long one with probability 0.5 (paper: "half of the time");
- an instruction combines 1 to 3 constraint types, uniformly;
- one training example per dialogue, trained on its last turn (`examples="last"`); `examples="prefixes"` also emits
  every shorter prefix, each trained on its own last turn;
- a dialogue stops early when the next prompt plus `max_new_tokens` no longer fits the context (counted, logged);
- a source dialogue's own system message is replaced by the GAtt instruction (counted, logged);
- the constraint values are the hand-written lists shipped in `resources/gatt` by default; the paper had
  Llama 2-Chat write its hobby and public-figure lists, which `llama2-hf gatt-lists` does
  (`GAttDataConfig.constraint_lists` points the `gatt` stage at its output).

Modules: `data` (constraint sets, instructions, `make_gatt_data`, validation, tokenization, model-written lists),
`evaluation` (checkers, judge, `evaluate_gatt`, Table 30 and plot), `language` (language identification). The chat
sampler and the turn-by-turn `rollout` live in `llama2_hf.generation` and are re-exported here.
"""

from ..sampling import ChatSampler, rollout
from ..sampling.chat import Answerer, Messages
from .data import (
    CONSTRAINTS_FILE,
    EVAL_USER_TURNS_FILE,
    GATT_COLUMNS,
    PLACEMENTS,
    RESOURCES,
    ConstraintSet,
    GAttDataConfig,
    GAttPlan,
    Instruction,
    first_turn,
    gatt_stats,
    generate_constraint_list,
    interleave,
    list_folder_files,
    load_constraint_sets,
    make_gatt_data,
    parse_generated_list,
    plan_gatt_dialogues,
    read_list_file,
    sample_gatt_rows,
    sample_instruction,
    tokenize_gatt_dataset,
    user_turns_of,
    validate_gatt_row,
)
from .evaluation import (
    JUDGE_PROMPT,
    TABLE30_TURNS,
    Checker,
    GAttEvalResult,
    JudgeChecker,
    KeywordChecker,
    LanguageChecker,
    ModelJudge,
    TurnStats,
    build_eval_dialogues,
    evaluate_gatt,
    format_table30,
    keywords_of,
    plot_adherence,
)
from .language import STOPWORDS, SUPPORTED_LANGUAGES, UNKNOWN_LANGUAGE, canonical_language, detect_language

__all__ = [
    "CONSTRAINTS_FILE", "EVAL_USER_TURNS_FILE", "GATT_COLUMNS", "JUDGE_PROMPT", "PLACEMENTS", "RESOURCES",
    "STOPWORDS", "SUPPORTED_LANGUAGES", "TABLE30_TURNS", "UNKNOWN_LANGUAGE", "ChatSampler", "Checker",
    "ConstraintSet", "GAttDataConfig", "GAttEvalResult", "GAttPlan", "Instruction", "JudgeChecker", "KeywordChecker",
    "LanguageChecker", "Messages", "ModelJudge", "Answerer", "TurnStats", "build_eval_dialogues",
    "canonical_language", "detect_language", "evaluate_gatt", "first_turn", "format_table30", "gatt_stats",
    "generate_constraint_list", "interleave", "keywords_of", "list_folder_files", "load_constraint_sets",
    "make_gatt_data", "parse_generated_list", "plan_gatt_dialogues", "plot_adherence", "read_list_file", "rollout",
    "sample_gatt_rows", "sample_instruction", "tokenize_gatt_dataset", "user_turns_of", "validate_gatt_row",
]
