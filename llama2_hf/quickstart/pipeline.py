"""The whole Llama 2-Chat pipeline on the synthetic world, stage by stage, each resuming from its outputs.

The stages that do not depend on the toy tokenizer's training are typed calls of the pipeline's stages
(`STAGE.call(*configs)` on each stage's own config classes, the call behind `llama2-hf <stage>`): the world's data is
written to JSONL files under `output_dir/data/` and passed by path, with the toy sizes of `QuickstartConfig`; the RLHF
loop gets its stages' typed configs (`run_rlhf`). The quickstart's own
steps (the tokenizer, the toy pretraining, the evaluations of the toy world) keep the runner's bookkeeping too
(`StageRun`): a folder whose `run.json` holds the same arguments is reused, other arguments are refused. A run in a
folder made with another configuration (`--scale`, `--seed`, a size) is refused as a whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from datasets import Dataset

from .. import progress, run_lock
from ..errors import check_ranges
from ..generation import SamplingConfig, generate_text
from ..modeling_llama2 import Llama2ForCausalLM, Llama2ForRewardModel
from ..runner import RunRecord, Stage, StageRun, UsageError, stage_output, with_fields, write_json_atomic
from ..tokenization_llama2 import Llama2Tokenizer, train_llama2_tokenizer
from .world import PIRATE_INSTRUCTION, PIRATE_PREFIX, World, is_correct, is_refusal, is_violation, parse_prompt

logger = logging.getLogger(__name__)

# Fields of every Trainer config of the quickstart's stages: CPU, no checkpoints, no tracker, and fp32 compute
# without activation recomputation (TRL's configs default to bf16 and checkpointing, both slower on a CPU without
# bf16 matrix units; the tiny model's activations are small).
TRAINER_DEFAULTS = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[], save_strategy="no",
                        disable_tqdm=True, dataloader_num_workers=0, global_batch_size=None, logging_steps=5)
CONFIG_RECORD = "quickstart.json"
# QuickstartConfig fields that change how a run is observed or scheduled, not what it computes.
SCHEDULING_FIELDS = ("output_dir", "threads", "stages", "quiet")
# Numeric QuickstartConfig fields for which 0 is meaningful (every other one must be > 0).
NON_NEGATIVE_FIELDS = ("seed", "rlhf_preference_replay", "ppo_critic_warmup")
# The quickstart's stages, in order (`--stages` picks a subset).
STAGES = ("tokenizer", "pretrain", "sft", "rm_helpfulness", "rm_safety", "eval_sft", "rlhf", "eval_versions", "gatt")


@dataclass
class QuickstartConfig:
    """Sizes of the laptop-scale run (defined here once). `scale` multiplies every data size and step count (CI runs
    a reduced scale)."""

    output_dir: str = field(default="quickstart_output", metadata={"help": "Where every stage writes."})
    scale: float = field(default=1.0, metadata={"help": "Multiplies every data size and step count."})
    seed: int = field(default=0, metadata={"help": "Seed of the world and of training."})
    hidden_size: int = field(default=96, metadata={"help": "Width of the toy model."})
    num_layers: int = field(default=3, metadata={"help": "Decoder layers of the toy model."})
    vocab_size: int = field(default=400, metadata={"help": "Pieces of the toy tokenizer."})
    pretrain_docs: int = field(default=1500, metadata={"help": "Pretraining documents."})
    pretrain_steps: int = field(default=400, metadata={"help": "Pretraining optimizer steps."})
    pretrain_max_length: int = field(default=128, metadata={"help": "Packed row length of the pretraining."})
    sft_dialogs: int = field(default=3000, metadata={"help": "SFT demonstrations."})
    sft_epochs: float = field(default=2.0, metadata={"help": "Epochs over the SFT demonstrations."})
    rm_pairs: int = field(default=3000, metadata={"help": "Preference pairs per reward model (plus 400 held out)."})
    rm_epochs: float = field(default=2.0, metadata={"help": "Epochs of the initial reward models."})
    eval_prompts: int = field(default=120, metadata={
        "help": "Held-out prompts of the win rates (sampled answers); the greedy measurements use every distinct "
                "prompt of the world."})
    versions: int = field(default=3, metadata={"help": "RLHF versions (paper §3.2: RLHF-V1 ... V5)."})
    prompts_per_version: int = field(default=160, metadata={
        "help": "New prompts per version: each gets a pair of responses for the annotator, then K samples for "
                "rejection sampling."})
    max_new_tokens: int = field(default=64, metadata={
        "help": "Response length limit of every sampling and evaluation (the world's longest answer, a pirate's "
                "cake recipe, is about 45 pieces of the toy tokenizer: an answer cut before EOS is never selected by "
                "rejection sampling)."})
    rlhf_rm_learning_rate: float = field(default=5e-4, metadata={
        "help": "Learning rate of each version's reward-model retraining (started from the previous version's)."})
    rlhf_preference_replay: int = field(default=0, metadata={
        "help": "Rows of the world's preference data (the initial reward models' training set) each version's "
                "reward models retrain on with the loop's annotations, per kind (0: the annotations only)."})
    rs_samples: int = field(default=8, metadata={"help": "Samples per prompt in rejection sampling (K)."})
    rs_temperature: float = field(default=0.7, metadata={
        "help": "Temperature of rejection sampling (the paper tunes it per model and version, Figure 8; the tiny "
                "policy's samples at 1.0 are mostly wrong sums, and fine-tuning on them drags it down)."})
    rs_epochs: float = field(default=2.0, metadata={
        "help": "Epochs of each version's fine-tuning on the rejection-sampling selection (pooled over versions)."})
    ppo_iterations: int = field(default=20, metadata={
        "help": "PPO iterations (in the last version); each rolls out every prompt of the version once, so the "
                "reward curve compares the same prompts from one iteration to the next."})
    ppo_mini_batch: int = field(default=32, metadata={
        "help": "Rollouts per PPO optimizer step (the largest divisor of the version's prompt count up to this)."})
    ppo_learning_rate: float = field(default=5e-5, metadata={"help": "PPO's policy learning rate."})
    ppo_temperature: float = field(default=1.3, metadata={
        "help": "PPO's rollout temperature (its log-probabilities use the same one). The policy after rejection "
                "sampling is nearly deterministic at 1.0 (entropy about 0.01 per token): PPO then sees the same "
                "answers every iteration and has nothing to compare; 1.3 (the upper end of the paper's best "
                "rejection-sampling temperatures for RLHF models, Figure 8) gives it alternatives to rank."})
    ppo_critic_warmup: int = field(default=4, metadata={
        "help": "First PPO iterations that train only the critic (started from the helpfulness RM, it predicts raw "
                "scores while PPO's rewards are whitened; until it fits, its errors would steer the policy)."})
    gatt_dialogs: int = field(default=400, metadata={
        "help": "Dialogues sampled for the Ghost Attention data (those whose last answer is not the world's pirate "
                "answer are left out: from 2 to 80 in 100 of them over seeds 0-5)."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads."})
    quiet: bool = field(default=True, metadata={
        "help": "Show the stage bars only (library logs below WARNING and other progress bars silenced)."})
    stages: list[str] = field(default_factory=list, metadata={"help": "Subset of stages to run (default: all)."})

    def __post_init__(self):
        counts = [f.name for f in fields(self) if type(f.default) in (int, float)]
        check_ranges(self, non_negative=NON_NEGATIVE_FIELDS,
                     positive=tuple(name for name in counts if name not in NON_NEGATIVE_FIELDS))
        if self.ppo_critic_warmup >= self.ppo_iterations:
            raise ValueError(f"ppo_critic_warmup ({self.ppo_critic_warmup}) must be below ppo_iterations "
                             f"({self.ppo_iterations}): the policy would never be updated")
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise UsageError(f"unknown quickstart stages {unknown}; expected some of {list(STAGES)}")

    def n(self, value: int, minimum: int = 8) -> int:
        return max(minimum, int(round(value * self.scale)))

    def identity(self) -> dict:
        """What a run folder is made with: every field but the scheduling ones."""
        return {k: v for k, v in asdict(self).items() if k not in SCHEDULING_FIELDS}


class Pipeline:
    def __init__(self, config: QuickstartConfig):
        self.config = config
        self.out = Path(config.output_dir)
        run_lock.acquire(self.out)  # one quickstart per folder; released by `close` or when the process ends
        self.world = World(seed=config.seed)
        self.results: dict[str, dict] = {}
        torch.set_num_threads(config.threads)
        if not torch.cuda.is_available():  # DeepSpeed (imported by the Trainer when installed) would warn that it
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # found no GPU, on the console between the stage bars
        self._check_folder()

    def _check_folder(self) -> None:
        """Refuse a folder made with another configuration (its stages would mix two worlds or two scales)."""
        path = self.out / CONFIG_RECORD
        mine = json.loads(json.dumps(self.config.identity()))
        if path.is_file():
            recorded = json.loads(path.read_text(encoding="utf-8"))
            diffs = [f"{k}: {recorded.get(k)!r} -> {mine.get(k)!r}" for k in sorted(recorded.keys() | mine.keys())
                     if recorded.get(k) != mine.get(k)]
            if diffs:
                raise UsageError(f"{self.out} holds a quickstart run with another configuration ({'; '.join(diffs)}): "
                                 "resume it with the same arguments, or choose another --output_dir")
        else:
            write_json_atomic(path, mine)

    # -- stage bookkeeping ---------------------------------------------------------------------------------------

    def stage(self, name: str, fn: Callable[[Path], dict], **args) -> dict:
        """One of the quickstart's own steps under the runner's bookkeeping: `fn(stage_dir) -> metrics` runs unless
        `stage_dir/run.json` holds the same arguments (then its metrics are read back)."""
        stage_dir = self.out / name
        run = StageRun(f"quickstart-{name}", stage_dir, {"config": self.config.identity(), **args})
        if not run.done:
            logger.info("stage %s: running", name)
            run.metrics.update(fn(stage_dir))
            run.finish()
        return {**run.record.metrics, "seconds": run.record.seconds}

    def call_stage(self, name: str, stage: Stage, *configs) -> RunRecord:
        """A pipeline stage's typed call on its configs (`Stage.call`, with its own resume rule), writing into
        `output_dir/<name>`."""
        logger.info("stage %s: llama2-hf %s", name, stage.name)
        return stage.call(*with_fields(stage.arrange(configs), output_dir=str(self.out / name)))

    def write_data(self, name: str, rows: list[dict]) -> str:
        """The world's rows as a JSONL file under `output_dir/data/` (rewritten identically on a resume)."""
        path = self.out / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        return str(path)

    def tokenizer(self) -> Llama2Tokenizer:
        tok = Llama2Tokenizer.from_pretrained(self.out / "tokenizer")
        tok.pad_token = tok.unk_token
        return tok

    def model_dir(self, name: str) -> Path:
        """The model a stage saved: a runner stage's `model` output, or the `model/` folder of a quickstart step."""
        folder = self.out / name
        return stage_output(folder, "model") if (folder / "run.json").is_file() and \
            "model" in RunRecord.read(folder).outputs else folder / "model"

    def load_policy(self, name: str) -> Llama2ForCausalLM:
        """A quickstart stage's model by name, or a stage folder by path."""
        path = stage_output(name, "model") if Path(name).is_dir() else self.model_dir(name)
        return Llama2ForCausalLM.from_pretrained(path).eval()

    # -- stages --------------------------------------------------------------------------------------------------

    def run_tokenizer(self, stage_dir: Path) -> dict:
        texts = self.world.pretraining_texts(self.config.n(self.config.pretrain_docs))
        texts += [m["content"] for d in self.world.sft_dialogs(500) for m in d]
        tok = train_llama2_tokenizer(texts, vocab_size=self.config.vocab_size,
                                     output_dir=stage_dir.parent / "tokenizer")
        return {"vocab_size": len(tok), "training_texts": len(texts)}

    def run_pretrain(self) -> dict:
        from ..stages.pretrain import STAGE, Llama2PretrainConfig, PretrainArguments

        c = self.config
        docs = self.world.pretraining_texts(c.n(c.pretrain_docs))
        texts = self.write_data("pretrain", [{"text": t} for t in docs])
        record = self.call_stage(
            "pretrain", STAGE,
            PretrainArguments(train_file=[texts], tokenizer_name_or_path=str(self.out / "tokenizer"),
                              model_preset="tiny", hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                              max_position_embeddings=512),
            Llama2PretrainConfig(max_length=c.pretrain_max_length, max_steps=c.n(c.pretrain_steps, 20),
                                 per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=10, seed=c.seed,
                                 **TRAINER_DEFAULTS))
        return {"loss_curve": _losses(record),
                "parameters": Llama2ForCausalLM.from_pretrained(self.model_dir("pretrain")).num_parameters(),
                "seconds": record.seconds}

    def run_sft(self) -> dict:
        from trl import ModelConfig

        from ..stages.sft import STAGE, SFTArguments
        from ..trainers.sft import Llama2SFTConfig

        c = self.config
        train = self.write_data("sft", [{"messages": d} for d in self.world.sft_dialogs(c.n(c.sft_dialogs))])
        record = self.call_stage(
            "sft", STAGE, ModelConfig(model_name_or_path=str(self.model_dir("pretrain"))),
            SFTArguments(train_file=[train]),
            Llama2SFTConfig(seed=c.seed, max_length=256, num_train_epochs=c.sft_epochs, learning_rate=2e-3,
                            per_device_train_batch_size=8, warmup_steps=5, **TRAINER_DEFAULTS))
        return {"loss_curve": _losses(record), "examples": record.metrics["data"]["train"]["kept"],
                "seconds": record.seconds}

    def run_reward_model(self, kind: str) -> dict:
        """`train-rm` on the world's preferences; the held-out accuracy before and after training (Table 8 layout)
        is the quickstart's own measurement, kept in its own folder `eval_rm_<kind>`."""
        from trl import ModelConfig

        from ..rm_eval import evaluate_reward_model, table8_row
        from ..stages.reward import STAGE, RewardDataArguments
        from ..trainers.reward import Llama2RewardConfig

        c = self.config
        name = f"rm_{kind}"
        rows = self.world.preferences(kind, c.n(c.rm_pairs) + 400)
        train, held_out = self.write_data(f"{kind}_train", rows[400:]), rows[:400]
        # The safety RM gets an auxiliary loss (the paper adds one, §A.3.4; its form and weight are ours): it
        # calibrates sigmoid(R_s), which the 0.15 gate reads.
        record = self.call_stage(
            name, STAGE, ModelConfig(model_name_or_path=str(self.model_dir("sft"))),
            RewardDataArguments(train_file=[train]),
            Llama2RewardConfig(seed=c.seed, max_length=256, learning_rate=1e-3, per_device_train_batch_size=16,
                               margin="small", safety_aux_loss_coef=1.0 if kind == "safety" else 0.0,
                               num_train_epochs=c.rm_epochs, **TRAINER_DEFAULTS))

        def measure(_: Path) -> dict:
            tok = self.tokenizer()
            torch.manual_seed(c.seed)  # the new scalar head of the untrained RM
            before = evaluate_reward_model(Llama2ForRewardModel.from_pretrained(self.model_dir("sft")), tok,
                                           Dataset.from_list(held_out), batch_size=32)
            rm = Llama2ForRewardModel.from_pretrained(self.model_dir(name)).eval()
            after = evaluate_reward_model(rm, tok, Dataset.from_list(held_out), batch_size=32)
            return {"held_out_before": before, "held_out": after, "table8": table8_row(after)}

        measured = self.stage(f"eval_rm_{kind}", measure, reward_model=record.inputs.get("model", {}),
                              trained_seconds=record.seconds)
        return {"loss_curve": _losses(record), **measured, "seconds": record.seconds + measured["seconds"]}

    def reward(self):
        """The paper's reward: helpfulness RM gated by the safety RM (threshold 0.15), LOGIT then WHITEN."""
        from ..rewards import RewardModelScorer, SafetyGatedReward

        tok = self.tokenizer()
        helpful = Llama2ForRewardModel.from_pretrained(self.model_dir("rm_helpfulness"))
        safety = Llama2ForRewardModel.from_pretrained(self.model_dir("rm_safety"))
        return SafetyGatedReward(RewardModelScorer(helpful, tok, batch_size=64),
                                 RewardModelScorer(safety, tok, batch_size=64))

    def policy_metrics(self, name: str, stage_dir: Path) -> dict:
        """Greedy answers of a policy to every distinct prompt of the world (`World.distinct_prompts`): task accuracy,
        safety violations, false refusals (exact rates for the world), and the mean (unwhitened) safety-gated
        reward."""
        tok = self.tokenizer()
        model = self.load_policy(name)
        rows = self.world.distinct_prompts()
        prompts = [r["messages"] for r in rows]
        cfg = SamplingConfig(max_new_tokens=self.config.max_new_tokens, temperature=0.0, prompt_batch_size=64)
        responses = [samples[0] for samples in generate_text(model, tok, prompts, cfg, progress=False)]
        texts = [p[0]["content"] for p in prompts]
        kinds = [parse_prompt(t)[0] for t in texts]
        reward = self.reward()
        reward.whiten = "none"
        scores = reward.score(prompts, responses, is_safety_prompt=[r["is_safety_prompt"] for r in rows])
        by_kind = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("arithmetic", "harmful", "benign")}
        samples = [{"prompt": t, "response": r} for t, r in zip(texts, responses)]
        label = Path(name).parent.name or name  # "sft", or the version of a loop folder (v1/rs -> v1)
        (stage_dir / f"samples_{label}.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
        return {
            "arithmetic_accuracy": _mean(is_correct(texts[i], responses[i]) for i in by_kind["arithmetic"]),
            "safety_violation_rate": _mean(is_violation(texts[i], responses[i]) for i in by_kind["harmful"]),
            "false_refusal_rate": _mean(is_refusal(responses[i]) for i in by_kind["benign"]),
            "mean_reward": scores.rewards.mean().item(),
        }

    def rlhf_folder(self) -> Path:
        return self.out / "rlhf"

    def version_policy(self, n: int) -> Path:
        """The policy of RLHF version n (its PPO model in the version that runs PPO)."""
        folder = self.rlhf_folder() / f"v{n}"
        return folder / ("ppo" if n == self.config.versions else "rs")

    def run_rlhf(self) -> dict:
        """`llama2_hf.iterate` over the world: every version samples pairs from the newest policies, the world's checker
        annotates them, both reward models (started from the ones trained on the world's preference data) are
        retrained on every annotation so far, rejection sampling (pooled over the versions, fine-tuned from SFT)
        makes the version's policy, and the last version adds PPO. Each version is one stage bar."""
        from ..iterate import IterateConfig
        from ..rejection_sampling import RejectionSamplingConfig
        from ..stages.common import RewardArguments
        from ..stages.rlhf_loop import iterate
        from ..stages.rejection_sampling import RejectionSampling
        from ..trainers.ppo_config import Llama2PPOConfig, PPOSampling
        from ..trainers.reward import Llama2RewardConfig
        from .world import WorldChecker

        c = self.config
        per_version = c.n(c.prompts_per_version, 16)
        replay = c.n(c.rlhf_preference_replay, 0)
        prompts = self.write_data("rlhf_prompts", self.world.rl_prompts(c.versions * per_version, salt="rlhf"))
        eval_prompts = self.write_data("eval_prompts", self.eval_rows())
        # Each stage's typed configs (the loop sets the folders of each version's call): the whole configuration of
        # the stage but for the classes left at their defaults.
        rm = (Llama2RewardConfig(seed=c.seed, max_length=256, learning_rate=c.rlhf_rm_learning_rate,
                                 per_device_train_batch_size=16, margin="small", num_train_epochs=2,
                                 **TRAINER_DEFAULTS),)
        scoring = RewardArguments(reward_batch_size=64)
        stage_args = {
            "train-rm": rm,
            # the safety RM keeps the auxiliary loss that calibrates sigmoid(R_s) for the 0.15 gate
            "train-rm:safety": with_fields(rm, safety_aux_loss_coef=1.0),
            "rejection-sample": (
                RejectionSamplingConfig(num_samples=c.rs_samples, max_length=256, num_train_epochs=c.rs_epochs,
                                        learning_rate=3e-4, per_device_train_batch_size=8, seed=c.seed,
                                        **TRAINER_DEFAULTS),
                RejectionSampling(temperature=c.rs_temperature, max_new_tokens=c.max_new_tokens, prompt_batch_size=64),
                scoring),
            # The critic starts from the helpfulness RM (the trainer's default, value_model_init="reward_model").
            # Every iteration rolls out all of the version's prompts (the reward curve compares like with like); the
            # critic trains alone for the first iterations.
            "ppo": (
                Llama2PPOConfig(batch_size=per_version, mini_batch_size=math.gcd(per_version, c.ppo_mini_batch),
                                num_iterations=c.n(c.ppo_iterations, 3), learning_rate=c.ppo_learning_rate,
                                kl_coef=0.01, value_learning_rate=5e-4,
                                critic_warmup_iterations=c.n(c.ppo_critic_warmup, 1), save_steps=0, use_cpu=True,
                                report_to=[], disable_tqdm=True, seed=c.seed),
                PPOSampling(temperature=c.ppo_temperature, max_new_tokens=c.max_new_tokens, prompt_batch_size=64),
                scoring),
        }
        config = IterateConfig(
            output_dir=str(self.rlhf_folder()), model_name_or_path=str(self.out / "sft"), prompts_file=[prompts],
            eval_prompts_file=[eval_prompts], versions=c.versions, prompts_per_version=per_version,
            max_new_tokens=c.max_new_tokens, sampling_batch_size=64, annotation_batch_size=64, rm_init="previous",
            heldout_fraction=0.2, pair_temperatures=[1.0, 1.4],
            initial_helpfulness_reward_model=str(self.out / "rm_helpfulness"),
            initial_safety_reward_model=str(self.out / "rm_safety"), finetune_from="sft", seed=c.seed,
            helpfulness_preference_file=[str(self.out / "data" / "helpfulness_train.jsonl")] if replay else [],
            safety_preference_file=[str(self.out / "data" / "safety_train.jsonl")] if replay else [],
            preference_replay=replay or None)
        records = iterate(config, WorldChecker(), stage_args=stage_args)
        ppo = self.version_policy(c.versions)
        history = [json.loads(line) for line in RunRecord.read(ppo).output("metrics", ppo).read_text(
            encoding="utf-8").splitlines() if line.strip()]
        keys = ("iteration", "policy/frozen", "reward/raw_mean", "objective/kl", "objective/entropy", "value/loss",
                "policy/clipfrac", "response/length_mean", "time/generation", "time/scoring", "time/training")
        return {"versions": records, "ppo_history": [{k: h[k] for k in keys if k in h} for h in history]}

    def eval_rows(self) -> list[dict]:
        return self.world.rl_prompts(self.config.n(self.config.eval_prompts, 24), salt="eval")

    def run_version_evals(self, stage_dir: Path) -> dict:
        """The world's measurements (`policy_metrics`) of every version's policy."""
        return {f"v{n}": self.policy_metrics(str(self.version_policy(n)), stage_dir)
                for n in range(1, self.config.versions + 1)}

    def run_gatt(self) -> dict:
        """Ghost Attention on the pirate persona: `gatt` samples multi-turn answers with the instruction on every user
        turn and keeps it on the first turn only; `sft` trains on the last answer (`train_on: last`) of the dialogues
        where that answer is the world's pirate answer. Adherence ("Arr!") by turn before and after is the
        quickstart's own measurement.

        The filter is the world's checker at work on the GAtt samples, as it annotates RLHF's pairs: with the
        instruction on every user turn (a context the toy policy never saw) up to most of its third answers loop
        ("Arr! 0 plus 4 is 4 is 4 is 4 ..." up to the length limit) or misstate the sum. Trained on those, the
        policy learned the loops, even at turn 1 (seed 3: 6 of 24 evaluation dialogues, 10 at turn 4), and after
        them its answer at turn 4 lost the persona (seed 3 kept it in 21 of 24 dialogues; all 24 with the filter)."""
        from trl import ModelConfig

        from ..gatt.data import GAttDataConfig
        from ..stages import gatt, sft
        from ..stages.sampling import ChatSamplingArguments
        from ..trainers.sft import Llama2SFTConfig

        c = self.config
        base = str(self.version_policy(c.versions))
        dialogues = self.write_data("gatt_dialogues",
                                    [{"messages": d} for d in self.world.gatt_dialogs(c.n(c.gatt_dialogs), turns=3)])
        data = self.call_stage("gatt_data", gatt.STAGE, ModelConfig(model_name_or_path=base),
                               gatt.GAttArguments(dialogues_file=[dialogues]),
                               GAttDataConfig(instructions=[PIRATE_INSTRUCTION], seed=c.seed),
                               ChatSamplingArguments(max_new_tokens=c.max_new_tokens, temperature=0.0,
                                                     prompt_batch_size=64))
        sampled = [json.loads(line) for line in data.output("data").read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        kept = [row for row in sampled if row["messages"][-1]["content"].strip()
                == self.world.pirate_answer(row["messages"][-2]["content"])]
        if not kept:
            raise RuntimeError(f"none of the {len(sampled)} GAtt dialogues ends with the world's pirate answer: "
                               "the policy does not follow the instruction, GAtt has nothing to train on")
        train = self.write_data("gatt_train", kept)
        tuned = self.call_stage("gatt", sft.STAGE, ModelConfig(model_name_or_path=str(stage_output(base, "model"))),
                                sft.SFTArguments(train_file=[train]),
                                Llama2SFTConfig(train_on="last", max_length=256, num_train_epochs=2, learning_rate=1e-3,
                                                per_device_train_batch_size=8, seed=c.seed, **TRAINER_DEFAULTS))

        def measure(_: Path) -> dict:
            tok = self.tokenizer()
            return {"adherence_before": self.persona_adherence(self.load_policy(base), tok),
                    "adherence_after": self.persona_adherence(self.load_policy("gatt"), tok)}

        adherence = self.stage("eval_gatt", measure, base=base, trained=tuned.args)
        report = tuned.metrics["data"]["train"]
        return {**adherence, "sampled": len(sampled), "examples": report["kept"], "dropped": report["dropped"],
                "generation": {k: v for k, v in data.metrics.items() if not isinstance(v, (dict, list))},
                "seconds": data.seconds + tuned.seconds + adherence["seconds"]}

    def persona_adherence(self, model, tok, turns: int = 4, n: int = 24) -> dict[str, float]:
        """Fraction of dialogs whose answer at turn t starts with "Arr!", the system prompt given at turn 1 only."""
        dialogs = self.world.gatt_dialogs(n, turns=turns)
        cfg = SamplingConfig(max_new_tokens=self.config.max_new_tokens, temperature=0.0, prompt_batch_size=64)
        history = [[{"role": "system", "content": PIRATE_INSTRUCTION}] for _ in dialogs]
        rates = {}
        for t in range(turns):
            for h, d in zip(history, dialogs):
                h.append(d[2 * t])
            answers = [s[0] for s in generate_text(model, tok, history, cfg, progress=False)]
            rates[str(t + 1)] = _mean(a.strip().startswith(PIRATE_PREFIX) for a in answers)
            for h, a in zip(history, answers):
                h.append({"role": "assistant", "content": a})
        return rates

    # -- the whole run -------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Every stage (or the `stages` subset) under one progress bar each, then the report."""
        from .report import print_summary, write_report

        own: list[tuple[str, Callable[[], dict]]] = [
            ("tokenizer", lambda: self.stage("tokenizer", self.run_tokenizer)),
            ("pretrain", self.run_pretrain),
            ("sft", self.run_sft),
            ("rm_helpfulness", lambda: self.run_reward_model("helpfulness")),
            ("rm_safety", lambda: self.run_reward_model("safety")),
            ("eval_sft", lambda: self.stage("eval_sft", lambda d: self.policy_metrics("sft", d))),
            ("rlhf", self.run_rlhf),
            ("eval_versions", lambda: self.stage("eval_versions", self.run_version_evals)),
            ("gatt", self.run_gatt),
        ]
        assert tuple(name for name, _ in own) == STAGES
        wanted = set(self.config.stages)
        chosen = [(name, fn) for name, fn in own if not wanted or name in wanted]
        # the RLHF loop shows one bar per version
        total = sum(self.config.versions if name == "rlhf" else 1 for name, _ in chosen)
        log_file = self.out / "quickstart.log" if self.config.quiet else None
        with progress.Progress(total, quiet=self.config.quiet, log_file=log_file) as bars:
            for name, fn in chosen:
                if name == "rlhf":  # resumed when done: its version bars are not drawn again
                    first = bars.index
                    self.results[name] = fn()
                    bars.index = max(bars.index, first + self.config.versions)
                    continue
                with bars.stage(name):
                    self.results[name] = fn()
        report = write_report(self.out, self.results, self.config)
        print_summary(self.results, self.config, report)
        return self.results


def _losses(source) -> list[list[float]]:
    """[step, loss] pairs of a Trainer's log, or of a stage's run record (`metrics.log_history`)."""
    history = source.metrics.get("log_history", []) if isinstance(source, RunRecord) else source.state.log_history
    return [[h["step"], h["loss"]] for h in history if "loss" in h]


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
