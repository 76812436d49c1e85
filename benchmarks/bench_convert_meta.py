"""Peak memory of `llama2-hf convert-meta` relative to the checkpoint size.

Writes a synthetic Meta-format checkpoint (default ~134M parameters, bf16 like Meta's release, 2 model-parallel
shards, Llama 2's real 32k tokenizer), then converts it in fresh subprocesses and reports each process's peak
resident set (VmHWM) above its resident set just before the conversion started, as a multiple of the checkpoint size.
Measured in the same run as a baseline: the naive conversion (torch.load every shard into memory, concatenate,
permute, save one file), which is what a straightforward script does.

    python benchmarks/bench_convert_meta.py [--dim 768 --layers 12 --dtype bfloat16 --shard-sizes 100MB 1GB]

One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = Path(os.environ.get("LLAMA2_HF_DATA", "data")) / "llama2-tokenizer" / "tokenizer.model"


def _status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _naive_convert(src: Path, out: Path) -> None:
    """Everything in memory at once: the baseline."""
    import torch
    from safetensors.torch import save_file

    from llama2_hf.convert_meta import interleaved_to_rotate_half, meta_layout
    from llama2_hf.configuration_llama2 import Llama2Config

    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(src.glob("consolidated.*.pth"))]
    vocab = shards[0]["output.weight"].shape[0] * len(shards)
    config = Llama2Config.from_meta_params(src / "params.json", vocab_size=vocab)
    merged = {}
    for t in meta_layout(config):
        pieces = [s[t.meta_name] for s in shards]
        full = pieces[0] if t.split_dim is None else torch.cat(pieces, dim=t.split_dim)
        if t.rope_heads:
            full = interleaved_to_rotate_half(full, t.rope_heads)
        merged[t.hf_name] = full.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})


def child(mode: str, src: Path, out: Path, shard_size: str) -> None:
    import logging

    import torch  # noqa: F401  (imports before the baseline reading)

    from llama2_hf.convert_meta import convert_meta_checkpoint

    logging.disable(logging.INFO)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            status = _status_mb()
            for key in peaks:
                peaks[key] = max(peaks[key], status[key])
            time.sleep(0.002)

    before = _status_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if mode == "streaming":
        convert_meta_checkpoint(src, out, max_shard_size=shard_size, progress=False)
    else:
        _naive_convert(src, out)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    after = _status_mb()
    print(json.dumps({"before_rss_mb": before["VmRSS"], "peak_rss_mb": after["VmHWM"],
                      "peak_anon_mb": peaks["RssAnon"] - before["RssAnon"],
                      "peak_file_mb": peaks["RssFile"] - before["RssFile"], "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768, help="model width (default 768)")
    parser.add_argument("--layers", type=int, default=12, help="number of layers (default 12)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    parser.add_argument("--shards", type=int, default=2, help="model-parallel shards to write (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="checkpoint dtype (default bfloat16, as Meta's release)")
    parser.add_argument("--shard-sizes", nargs="+", default=["100MB", "1GB"],
                        help="max_shard_size values to measure (default: 100MB 1GB)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="SentencePiece tokenizer.model (default: $LLAMA2_HF_DATA/llama2-tokenizer)")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SRC", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, src, out, size = args.child
        child(mode, Path(src), Path(out), size)
        return

    import sentencepiece as spm
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from meta_reference import random_meta_state_dict, write_meta_checkpoint

    if not args.tokenizer.is_file():
        raise SystemExit(f"No tokenizer at {args.tokenizer}: pass --tokenizer")
    vocab = spm.SentencePieceProcessor(model_file=str(args.tokenizer)).vocab_size()
    params = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "multiple_of": 256,
              "norm_eps": 1e-05, "vocab_size": -1}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "meta"
        sd = random_meta_state_dict(params, vocab, dtype=getattr(torch, args.dtype))
        n_params = sum(v.numel() for v in sd.values())
        write_meta_checkpoint(src, params, sd, args.shards)
        del sd
        (src / "tokenizer.model").write_bytes(args.tokenizer.read_bytes())
        ckpt_mb = sum(p.stat().st_size for p in src.glob("consolidated.*.pth")) / 2**20
        runs = [("naive", "-")] + [("streaming", size) for size in args.shard_sizes]
        for i, (mode, size) in enumerate(runs):
            out = Path(tmp) / f"hf{i}"
            proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(out), size],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            delta = res["peak_rss_mb"] - res["before_rss_mb"]
            print(json.dumps({
                "bench": "convert_meta_peak_memory", "mode": mode, "max_shard_size": size, "params": n_params,
                "dtype": args.dtype, "meta_shards": args.shards, "checkpoint_mb": round(ckpt_mb, 1),
                "rss_before_mb": round(res["before_rss_mb"], 1), "peak_rss_mb": round(res["peak_rss_mb"], 1),
                "peak_rss_above_before_mb": round(delta, 1), "ratio_to_checkpoint": round(delta / ckpt_mb, 3),
                "peak_anon_above_before_mb": round(res["peak_anon_mb"], 1),
                "peak_file_backed_above_before_mb": round(res["peak_file_mb"], 1), "seconds": round(res["seconds"], 2),
            }), flush=True)
            for path in out.glob("*"):
                path.unlink()


if __name__ == "__main__":
    main()
