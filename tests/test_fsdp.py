"""Sharded code paths on CPU: torch's `fully_shard` (FSDP2) over gloo on 2 processes, each Llama2DecoderLayer and the
root wrapped, against an unsharded single-process run of the same functions on the same data.

accelerate's FSDP falls back to DDP on CPU, so this drives torch directly: tests/scripts/fsdp_train.py, two ranks forked
from the test process meeting through a rendezvous file (the script also runs under torchrun).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_train.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@functools.cache
def _load_script():
    spec = importlib.util.spec_from_file_location("fsdp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rank(rank: int, out: str, init_file: str) -> None:
    _load_script().run(out, rank, 2, init_file)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Two gloo ranks forked from this process (already holding torch and llama2_hf: no re-import per rank)."""
    import torch.multiprocessing as mp

    _load_script()  # import torch.distributed, transformers and llama2_hf once, before forking
    tmp = tmp_path_factory.mktemp("fsdp")
    out = str(tmp / "result.json")
    context = mp.start_processes(_rank, args=(out, str(tmp / "rendezvous")), nprocs=2, join=False,
                                 start_method="fork")
    for _ in range(240):  # bounded: each join waits at most 1 s; raises if a rank failed
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("FSDP ranks did not finish within 240 s")
    return json.loads(Path(out).read_text()), load_file(out + ".safetensors")


@pytest.fixture(scope="module")
def reference_run():
    """The same steps without sharding: one process, the whole global batch per step."""
    fsdp = _load_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run faster on one thread (and do not spin on a busy machine)
    try:
        return _reference(fsdp)
    finally:
        torch.set_num_threads(threads)


def _reference(fsdp) -> dict:
    model = fsdp.build_model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = fsdp.make_optimizer(model)
    batches = fsdp.make_batches(fsdp.STEPS_BEFORE_GENERATION + fsdp.STEPS_AFTER_GENERATION)
    history = [fsdp.train_step(model, optimizer, b) for b in batches[:fsdp.STEPS_BEFORE_GENERATION]]
    generated = fsdp.greedy(model)
    history += [fsdp.train_step(model, optimizer, b) for b in batches[fsdp.STEPS_BEFORE_GENERATION:]]
    return {"losses": [h[0] for h in history], "grad_norms": [h[1] for h in history], "generated": generated,
            "state": model.state_dict(), "initial": initial}


def test_parameters_are_sharded_per_decoder_layer(sharded_run):
    result, _ = sharded_run
    assert result["world_size"] == 2 and result["layers_are_fsdp_units"]
    for rank in result["ranks"]:
        assert rank["all_dtensor"]
        # dim-0 sharding: each rank holds about half of every parameter (plus at most one row of padding each)
        assert result["full_numel"] / 2 <= rank["local_numel"] < 0.55 * result["full_numel"]


def test_sharded_training_matches_unsharded_reference(sharded_run, reference_run):
    result, state = sharded_run
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference_run["losses"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(reference_run["grad_norms"]),
                               rtol=1e-4, atol=1e-6)
    assert result["grad_norms"][0] > 1.0  # clipping at 1.0 (paper §2.2) is active, and works on sharded grads
    assert min(reference_run["losses"]) < reference_run["losses"][0] - 0.1  # the steps learn something
    assert set(state) == set(reference_run["state"])
    for name, ref in reference_run["state"].items():
        assert not torch.equal(ref, reference_run["initial"][name]), f"{name} did not train"
        torch.testing.assert_close(state[name], ref, rtol=1e-4, atol=2e-5, msg=name)


def test_gathered_weights_generate_like_unsharded_model(sharded_run, reference_run):
    result, _ = sharded_run
    for rank in result["ranks"]:
        assert rank["gathered_is_plain"] and rank["resharded"]
        assert rank["generated"] == reference_run["generated"]
    assert len(reference_run["generated"]["llama2_hf"]) == 2


def test_memory_plan_is_within_15_percent_of_the_measured_per_rank_state(sharded_run):
    """`llama2-hf plan`'s FSDP accounting (float32 weights, gradients and AdamW moments, each sharded over the
    ranks) against the bytes each rank held right after its last optimizer step; DDP's accounting would be off."""
    from llama2_hf.plan import shape_of, training_state

    result, _ = sharded_run
    shape = shape_of(_load_script().build_model().config)
    assert shape.params == result["full_numel"]  # the meta-device count is the real model's
    planned = training_state(shape, "fsdp", num_gpus=2)
    replicated = sum(training_state(shape, "ddp", num_gpus=2).values())
    for rank in result["ranks"]:
        measured = rank["bytes"]
        assert measured["weights"] == 4 * rank["local_numel"]
        for part in ("weights", "gradients", "optimizer"):
            assert measured[part] == pytest.approx(planned[part], rel=0.15), part
        assert sum(measured.values()) == pytest.approx(sum(planned.values()), rel=0.15)
        assert sum(measured.values()) < 0.6 * replicated
