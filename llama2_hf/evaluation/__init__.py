"""The paper's benchmarks (MMLU, GSM8K, TruthfulQA, ToxiGen), numerically equal to lm-evaluation-harness 0.4.13.

Layout: `prompts` (prompt text), `data` (local files or Hub datasets), `engine` (batched log-likelihoods with a
shared-prefix KV cache, batched generation with stop strings), `scoring` (pure metric functions, also behind the
`evaluate` modules in `llama2_hf/metrics/`), one module per task, `api.EvalConfig` / `api.evaluate_model`; the `llama2-hf eval` stage is
`llama2_hf.stages.evaluate`.
"""

from .api import DEFAULT_TASKS, TASKS, EvalConfig, evaluate_model, markdown_table, write_report
from .base import RunSettings, TaskResult, load_model, load_tokenizer
from .engine import TaskDecoding, encode_pair, generate_until, loglikelihoods
from .gsm8k import GSM8KConfig, run_gsm8k
from .mmlu import MMLUConfig, run_mmlu
from .toxigen import ToxiGenConfig, run_toxigen
from .truthfulqa import TruthfulQAConfig, run_truthfulqa

__all__ = [
    "DEFAULT_TASKS", "TASKS", "EvalConfig", "GSM8KConfig", "MMLUConfig", "RunSettings", "TaskDecoding",
    "TaskResult", "ToxiGenConfig", "TruthfulQAConfig", "encode_pair", "evaluate_model", "generate_until",
    "load_model", "load_tokenizer", "loglikelihoods", "markdown_table", "run_gsm8k", "run_mmlu", "run_toxigen",
    "run_truthfulqa", "write_report",
]
