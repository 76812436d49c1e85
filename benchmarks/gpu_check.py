"""Everything worth knowing from a few minutes on one GPU, in one command: one JSON line per figure.

    python benchmarks/gpu_check.py                    # one CUDA GPU: a 7B-width model, under 8 minutes on an H100
    python benchmarks/gpu_check.py --tiny             # CPU, tiny shapes, seconds (tests/test_gpu_check.py runs it)

Figures (each line has a `name`; `skipped` with a reason where a part cannot run here):
- `parity`: max |logits - transformers' LlamaForCausalLM logits| on the same weights, float32 and bfloat16;
- `train_step` (full and LoRA): a 7B-width model (hidden 4096, FFN 11008, 32 heads, vocabulary 32,000) with as many
  decoder layers as `llama2_hf.plan` says fit in 60 % of the card, float32 master weights, bf16 autocast, AdamW:
  tokens/s, model FLOPs utilisation against `--peak_tflops` (790: the bf16 dense peak measured on the H100/H200
  machines) with 6N + 12 L h T FLOPs per token (N non-embedding parameters), and peak memory;
- `trainer_step` (sft, reward): the same step through TRL's `SFTTrainer` / `RewardTrainer` and through ours
  (`Llama2SFTTrainer`, `Llama2RewardTrainer`), equal rows of `--seq` tokens: median step time and the ratio;
- `sampling`: tokens/s of `llama2_hf.generation.generate` (the torch backend), and `ppo_iteration`: one iteration
  of `Llama2PPOTrainer` (rollout, scoring, update) with its timings, each with peak memory.

The trainer, sampling and PPO figures use a tokenizer trained in-process (no downloads), so their vocabulary is that
tokenizer's. Peak memory: the CUDA allocator's peak; on CPU the process's resident high-water mark (VmHWM, reset
before each part where Linux allows it). With `$OUT` set, the lines are also written to `$OUT/gpu_check.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import _high_water_bytes, _reset_high_water

LINES: list[dict] = []


def emit(name: str, **record) -> None:
    line = {"name": name, **{k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}}
    LINES.append(line)
    print(json.dumps(line), flush=True)


class PeakMemory:
    """Peak bytes allocated inside the block: CUDA allocator's, else the resident high-water mark."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_high_water()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = _high_water_bytes()


def model_config(args, layers: int, vocab: int | None = None):
    from llama2_hf import Llama2Config

    if args.tiny:
        return Llama2Config.from_preset("tiny", num_hidden_layers=layers, vocab_size=vocab or 512,
                                        max_position_embeddings=max(256, args.seq))
    return Llama2Config.from_preset("7b", num_hidden_layers=layers, vocab_size=vocab or 32000)


def layers_that_fit(args, device: torch.device) -> int:
    """Decoder layers of a 7B-width model whose training state (16 bytes per parameter) and activations (no
    checkpointing) fit in 60 % of the card, per `llama2_hf.plan`'s accounting."""
    from llama2_hf.plan import activation_bytes_per_token, shape_of, training_state

    if args.layers:
        return args.layers
    if device.type != "cuda":
        return 2
    budget = 0.6 * torch.cuda.get_device_properties(device).total_memory
    layers = 1
    while layers < 32:
        shape = shape_of(model_config(args, layers + 1))
        need = sum(training_state(shape, "fsdp", 1).values()) + \
            args.batch * args.seq * activation_bytes_per_token(shape, False) + 3 * 2**27
        if need > budget:
            break
        layers += 1
    return layers


def check_parity(args, device: torch.device) -> None:
    import transformers

    from llama2_hf import Llama2ForCausalLM

    config = model_config(args, 2)
    torch.manual_seed(0)
    ours = Llama2ForCausalLM._from_config(config, attn_implementation="sdpa").to(device).eval()
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "auto_map", "fused_lm_loss")}
    ref = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**fields), attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict())
    ref = ref.to(device).eval()
    ids = torch.randint(0, config.vocab_size, (2, min(args.seq, 128)), device=device)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        with torch.no_grad():
            a = ours.to(dtype)(ids).logits.float()
            b = ref.to(dtype)(ids).logits.float()
        diff = (a - b).abs().max().item()
        emit("parity", dtype=str(dtype).removeprefix("torch."), max_abs_diff=diff, tolerance=tolerance,
             ok=diff <= tolerance, device=device.type)


def flops_per_token(config) -> float:
    """6N + 12 L h T (PaLM's MFU count), N the non-embedding parameters, T the sequence length."""
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * i
    n = config.num_hidden_layers * layer + config.vocab_size * h  # the head's matmul counts; the lookup does not
    return 6 * n + 12 * config.num_hidden_layers * h * config.max_position_embeddings


def train_step(args, device: torch.device, layers: int, lora: bool) -> None:
    from llama2_hf import Llama2ForCausalLM

    config = model_config(args, layers)
    torch.manual_seed(0)
    model = Llama2ForCausalLM._from_config(config, attn_implementation="sdpa").to(device)  # float32 master weights
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                                  fused=device.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises

    with PeakMemory(device) as peak:
        loss = step()  # the first step allocates the AdamW moments: its peak is the steady state's
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = args.batch * args.seq
    mfu_config = config.__class__(**{**config.to_dict(), "max_position_embeddings": args.seq})
    emit("train_step", mode="lora" if lora else "full", layers=layers, hidden=config.hidden_size,
         batch=args.batch, seq=args.seq, trainable_params=sum(p.numel() for p in params),
         step_s=seconds, tokens_per_s=tokens / seconds,
         mfu=flops_per_token(mfu_config) * tokens / seconds / (args.peak_tflops * 1e12),
         peak_memory_gb=peak.bytes / 2**30, loss=loss, device=device.type)


def tokenizer_for(args, out: Path):
    from llama2_hf import train_llama2_tokenizer

    words = ("the a assistant user answer question model helpful safe sorry help please what how many apples "
             "write poem about cat dog sun moon tennis french yes no plus minus equals number hello world").split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i} plus {i % 9} equals {i + i % 9}."
             for i in range(400)]
    tok = train_llama2_tokenizer(texts, vocab_size=512 if args.tiny else 2048, output_dir=out / "tokenizer")
    tok.pad_token = tok.unk_token
    return tok, texts


class StepTimes:
    """A `TrainerCallback` recording each optimizer step's wall time."""

    def __init__(self, device: torch.device):
        from transformers import TrainerCallback

        outer = self
        self.times: list[float] = []
        self.device = device

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                outer._sync()
                outer.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                outer._sync()
                outer.times.append(time.perf_counter() - outer.start)

        self.callback = Callback()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def trainer_steps(args, device: torch.device, layers: int, tok, texts: list[str], out: Path) -> None:
    """The same step through TRL's trainer and ours: median step time (after the first) of each, and their ratio."""
    try:
        import trl
    except ImportError as e:
        emit("trainer_step", skipped=f"TRL is not installed here ({e}): carry its wheel (benchmarks/README.md)")
        return
    from datasets import Dataset

    from llama2_hf import Llama2ForCausalLM, Llama2ForRewardModel
    from llama2_hf.trainers.reward import Llama2RewardConfig, Llama2RewardTrainer
    from llama2_hf.trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

    # Answers of seq - 16 tokens after a short prompt: every row near max_length in both trainers (TRL's reward
    # trainer drops pairs longer than max_length instead of cutting them).
    ids = tok.encode(" ".join(texts), add_special_tokens=False)
    long, other = tok.decode(ids[: args.seq - 16]), tok.decode(ids[args.seq: 2 * args.seq - 16])
    prompts = [f"question {i}" for i in range(args.batch * (args.steps + 2))]
    common = {"max_steps": args.steps + 1, "per_device_train_batch_size": args.batch, "learning_rate": 1e-5,
              "report_to": [], "save_strategy": "no", "logging_steps": 1000, "disable_tqdm": True,
              "max_length": args.seq, "gradient_checkpointing": False, "bf16": True,
              "use_cpu": device.type != "cuda", "dataloader_num_workers": 0}
    rows = {"sft": [{"prompt": p, "answer": long} for p in prompts],
            "reward": [{"prompt": p, "chosen": long, "rejected": other, "rating": "better"} for p in prompts]}
    trl_rows = {"sft": [{"prompt": p, "completion": long} for p in prompts],
                "reward": [{"chosen": f"{p} {long}", "rejected": f"{p} {other}"} for p in prompts]}
    for kind in ("sft", "reward"):
        medians = {}
        for impl in ("trl", "llama2_hf"):
            config = model_config(args, layers, vocab=len(tok))
            torch.manual_seed(0)
            model_cls = Llama2ForRewardModel if kind == "reward" else Llama2ForCausalLM
            model = model_cls._from_config(config, attn_implementation="sdpa").to(device)
            if kind == "reward":
                model.config.pad_token_id = tok.pad_token_id
            timer = StepTimes(device)
            folder = str(out / f"{kind}-{impl}")
            if impl == "trl":
                cls, cfg = (trl.SFTTrainer, trl.SFTConfig) if kind == "sft" else (trl.RewardTrainer, trl.RewardConfig)
                trainer = cls(model=model, args=cfg(output_dir=folder, **common), processing_class=tok,
                              train_dataset=Dataset.from_list(trl_rows[kind]), callbacks=[timer.callback])
            else:
                cls, cfg = (Llama2SFTTrainer, Llama2SFTConfig) if kind == "sft" else \
                    (Llama2RewardTrainer, Llama2RewardConfig)
                extra = {"packing": False} if kind == "sft" else {}
                extra["on_overlength"] = "truncate"
                trainer = cls(model=model, args=cfg(output_dir=folder, global_batch_size=args.batch, **common,
                                                    **extra),
                              processing_class=tok, train_dataset=Dataset.from_list(rows[kind]),
                              callbacks=[timer.callback])
            with PeakMemory(device) as peak:
                trainer.train()
            medians[impl] = statistics.median(timer.times[1:])
            emit("trainer_step", trainer=kind, impl=impl, layers=layers, batch=args.batch, seq=args.seq,
                 step_s=medians[impl], peak_memory_gb=peak.bytes / 2**30, device=device.type)
            del trainer, model
        emit("trainer_step_ratio", trainer=kind, ours_over_trl=medians["llama2_hf"] / medians["trl"])


def sampling_and_ppo(args, device: torch.device, layers: int, tok, texts: list[str], out: Path) -> None:
    from llama2_hf import Llama2ForCausalLM, Llama2ForRewardModel
    from llama2_hf.generation import SamplingConfig, generate
    from llama2_hf.trainers.ppo import Llama2PPOConfig, Llama2PPOTrainer, PPOSampling

    config = model_config(args, layers, vocab=len(tok))
    torch.manual_seed(0)
    policy = Llama2ForCausalLM._from_config(config, attn_implementation="sdpa").to(device).eval()
    prompts = [tok.encode(t)[: args.seq // 2] for t in texts[: args.rollouts]]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0,
                              prompt_batch_size=args.rollouts)
    generator = torch.Generator(device=device).manual_seed(0)
    with PeakMemory(device) as peak, torch.autocast(device.type, dtype=torch.bfloat16):
        start = time.perf_counter()
        result = generate(policy, prompts, sampling, eos_token_id=-1, pad_token_id=0, generator=generator)
        seconds = time.perf_counter() - start
    new_tokens = sum(len(r[0]) for r in result.response_ids)
    emit("sampling", backend="torch", layers=layers, rows=len(prompts), new_tokens=new_tokens, seconds=seconds,
         tokens_per_s=new_tokens / seconds, peak_memory_gb=peak.bytes / 2**30, device=device.type)

    torch.manual_seed(1)
    reward_model = Llama2ForRewardModel._from_config(config).to(device).eval()
    reward_model.config.pad_token_id = tok.pad_token_id

    def reward(prompts_, responses, **columns):  # a frozen reward model's score of each response
        ids = [tok.encode(r, add_special_tokens=False)[: args.seq] or [tok.unk_token_id] for r in responses]
        width = max(map(len, ids))
        batch = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids], device=device)
        with torch.no_grad():
            return reward_model(input_ids=batch, attention_mask=(batch != tok.pad_token_id).long()).logits[:, 0] \
                .float().tolist()

    ppo_args = Llama2PPOConfig(output_dir=str(out / "ppo"), num_iterations=1, batch_size=args.rollouts,
                               mini_batch_size=args.rollouts, micro_batch_size=args.batch,
                               value_model_init="policy", save_steps=0, bf16=True, learning_rate=1e-6,
                               use_cpu=device.type != "cuda")
    rollout = PPOSampling(max_new_tokens=args.new_tokens, prompt_batch_size=args.rollouts).sampling_config()
    trainer = Llama2PPOTrainer(ppo_args, policy.train(), tok, reward, [{"prompt": t} for t in texts[:args.rollouts]],
                               sampler=rollout)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        metrics = trainer.step()
        seconds = time.perf_counter() - start
    emit("ppo_iteration", layers=layers, rollouts=args.rollouts, max_new_tokens=args.new_tokens, seconds=seconds,
         generation_s=metrics["time/generation"], scoring_s=metrics["time/scoring"],
         training_s=metrics["time/training"], peak_memory_gb=peak.bytes / 2**30, device=device.type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU (the test suite's run)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (default: as many as fit)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 4; 2 with --tiny)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 with --tiny)")
    parser.add_argument("--rollouts", type=int, default=None, help="PPO rollouts (default 64; 4 with --tiny)")
    parser.add_argument("--new_tokens", type=int, default=None, help="tokens sampled per rollout (256; 8 tiny)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the card's bf16 dense peak (790: measured on H100/H200; 0.2 with --tiny: this CPU)")
    args = parser.parse_args(argv)
    for key, big, tiny in (("batch", 4, 2), ("seq", 2048, 64), ("steps", 5, 2), ("rollouts", 64, 4),
                           ("new_tokens", 256, 8), ("peak_tflops", 790.0, 0.2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else big)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        parser.error("a full-size check needs a CUDA GPU: run with --tiny on a CPU")
    started = time.perf_counter()
    emit("environment", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         torch=torch.__version__, transformers=__import__("transformers").__version__)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        check_parity(args, device)
        layers = layers_that_fit(args, device)
        train_step(args, device, layers, lora=False)
        train_step(args, device, layers, lora=True)
        tok, texts = tokenizer_for(args, out)
        trainer_steps(args, device, layers, tok, texts, out)
        sampling_and_ppo(args, device, layers, tok, texts, out)
    emit("done", seconds=time.perf_counter() - started)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "gpu_check.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
