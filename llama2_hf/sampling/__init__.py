"""Sampling: one interface, two engines, chosen in one place.

    from llama2_hf.sampling import SamplingConfig, open_sampler, derive_seed

    with open_sampler(model, tokenizer, SamplingConfig(temperature=1.0, num_samples=8), backend) as sampler:
        answers = sampler.sample(prompts, seed=derive_seed(run_seed, "rs", iteration, batch_first_id))
        ids = sampler.sample_ids([sampler.encode(m) for m in prompts], seed=..., return_logprobs=True)
        sampler.update_weights(policy)            # PPO: the next rollout samples the updated weights

- `config`: `SamplingConfig` (the value every call takes), `BackendArguments` (torch or vLLM and the engine's
  settings), `SamplingArguments` (both, as the stages embed them; `sampling_arguments` gives a stage its defaults);
- `base`: the `Sampler` interface and `open_sampler`, the one place that picks the backend;
- `torch_backend` / `vllm_backend`: `TorchSampler` (this process, `generation.generate`) and `VLLMSampler` (a vLLM
  engine in its own environment, `vllm_engine`);
- `seeds`: `derive_seed`, the one seed derivation;
- `chat`: `ChatSampler` (one answer per conversation) and `rollout` (turn-by-turn dialogues).
"""

from .base import Sampler, engine_sampler, open_sampler
from .chat import Answerer, ChatSampler, rollout, sampler_limits
from .config import BackendArguments, SamplingArguments, SamplingConfig, sampling_arguments
from .seeds import derive_seed

__all__ = ["Answerer", "BackendArguments", "ChatSampler", "Sampler", "SamplingArguments", "SamplingConfig",
           "derive_seed", "engine_sampler", "open_sampler", "rollout", "sampler_limits", "sampling_arguments"]
