"""Convert Meta's original Llama 2 checkpoint (`consolidated.NN.pth` + `params.json` + `tokenizer.model`) to a
Hugging Face model directory (sharded safetensors, `config.json`, `generation_config.json`, tokenizer files).

Meta's files are model-parallel shards written by fairscale layers (`llama/model.py`), one per GPU of the release
(7B: 1, 13B: 2, 70B: 8). Each weight is split by the rule of the layer that owns it:

====================================  =========================  ===============
Meta parameter                        layer                      split dimension
====================================  =========================  ===============
attention.wq / wk / wv, feed_forward  ColumnParallelLinear       0 (output rows)
.w1 / w3, output
attention.wo, feed_forward.w2         RowParallelLinear          1 (input columns)
tok_embeddings                        ParallelEmbedding          1 (embedding dim)
attention_norm, ffn_norm, norm        replicated                 -
rope.freqs (in some releases)         buffer                     ignored
====================================  =========================  ===============

Meta's RoPE rotates interleaved pairs `(x[2i], x[2i+1])` (complex numbers), transformers' rotates `(x[i], x[i+d/2])`
(`rotate_half`). Both rotate pair i by the same angle, so reordering the output rows of `wq` and `wk` inside each
head (even rows first, then odd rows) turns one convention into the other; `wk` is reordered per KV head.

Memory: shards are opened with `torch.load(mmap=True, weights_only=True)`; each tensor is merged on its own, written
straight into the current safetensors file and freed; after each file the shard mappings are dropped, so the input
pages read so far leave the resident set. Peak memory is therefore about one output file (`max_shard_size`) of
(reclaimable) mapped input plus the largest tensor, whatever the model size (benchmarks/README.md has measurements).

Safety of the output folder: everything is checked (params, shards, shapes, dtype, tokenizer) before a file is
written, and the files are written into a temporary sibling folder that is swapped in only when complete
(`runner.replacing_folder`), so a kill or a failure leaves an existing model as it was. An existing folder is never
converted into: it is refused, or with `overwrite` replaced as a whole, so no stale file of another model
(`pytorch_model.bin`, `adapter_config.json`, other shards) survives next to the new weights.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils.hub import convert_file_size_to_int

from .configuration_llama2 import Llama2Config
from .modeling_llama2 import Llama2ForCausalLM
from .runner import UsageError, replacing_folder

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
_IGNORED_KEYS = frozenset({"rope.freqs"})  # RoPE table stored by some releases; rebuilt from the config
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# Meta's sampling defaults of `Llama.text_completion` / `chat_completion` (meta-llama/llama `llama/generation.py`).
_META_TEMPERATURE = 0.6
_META_TOP_P = 0.9


@dataclass(frozen=True)
class _Tensor:
    """One weight of the merged model: where it comes from and how it is rebuilt."""

    meta_name: str
    hf_name: str
    shape: tuple[int, ...]  # full (merged) shape
    split_dim: int | None  # None: replicated in every shard
    rope_heads: int | None  # number of heads whose rows are reordered to rotate-half layout (wq, wk), else None

    def shard_shape(self, n_shards: int) -> tuple[int, ...]:
        if self.split_dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.split_dim] //= n_shards
        return tuple(shape)


def meta_layout(config: Llama2Config) -> list[_Tensor]:
    """Every weight of a Meta checkpoint for `config`, in the order it is written (embeddings, layers, norm, head).

    The list is the contract the shards are checked against: names, full shapes, split rule, RoPE reordering.
    """
    d, hd = config.hidden_size, config.head_dim
    nh, nkv, ffn, vocab = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size, \
        config.vocab_size
    layout = [_Tensor("tok_embeddings.weight", "model.embed_tokens.weight", (vocab, d), 1, None)]
    for i in range(config.num_hidden_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        layout += [
            _Tensor(m + "attention.wq.weight", h + "self_attn.q_proj.weight", (nh * hd, d), 0, nh),
            _Tensor(m + "attention.wk.weight", h + "self_attn.k_proj.weight", (nkv * hd, d), 0, nkv),
            _Tensor(m + "attention.wv.weight", h + "self_attn.v_proj.weight", (nkv * hd, d), 0, None),
            _Tensor(m + "attention.wo.weight", h + "self_attn.o_proj.weight", (d, nh * hd), 1, None),
            _Tensor(m + "feed_forward.w1.weight", h + "mlp.gate_proj.weight", (ffn, d), 0, None),
            _Tensor(m + "feed_forward.w3.weight", h + "mlp.up_proj.weight", (ffn, d), 0, None),
            _Tensor(m + "feed_forward.w2.weight", h + "mlp.down_proj.weight", (d, ffn), 1, None),
            _Tensor(m + "attention_norm.weight", h + "input_layernorm.weight", (d,), None, None),
            _Tensor(m + "ffn_norm.weight", h + "post_attention_layernorm.weight", (d,), None, None),
        ]
    layout += [
        _Tensor("norm.weight", "model.norm.weight", (d,), None, None),
        _Tensor("output.weight", "lm_head.weight", (vocab, d), 0, None),
    ]
    return layout


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from Meta's interleaved RoPE pairs to rotate-half pairs.

    Inside each head of size d, Meta rotates rows (2i, 2i+1) together; rotate-half rotates rows (i, i + d/2). The
    new row order per head is [0, 2, 4, ..., d-2, 1, 3, ..., d-1]. `weight` is (n_heads * d, in_features).
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    per_head = weight.reshape(n_heads, head_dim, cols)  # (heads, d, in)
    return per_head[:, order].reshape(rows, cols)


def _find_shards(input_dir: Path) -> list[Path]:
    indexed = []
    for path in input_dir.glob("consolidated.*.pth"):
        match = _SHARD_RE.match(path.name)
        if match:
            indexed.append((int(match.group(1)), path))
    if not indexed:
        raise UsageError(f"No consolidated.NN.pth files in {input_dir}: expected Meta's model-parallel shards "
                         "consolidated.00.pth, consolidated.01.pth, ...")
    indexed.sort()
    numbers = [n for n, _ in indexed]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise UsageError(f"Model-parallel shards in {input_dir} are not numbered 00..{len(numbers) - 1}: found "
                         f"{[p.name for _, p in indexed]}; missing {[f'consolidated.{n:02d}.pth' for n in missing]}")
    return [p for _, p in indexed]


def _find_tokenizer(input_dir: Path, tokenizer_path: str | Path | None) -> Path:
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if not path.is_file():
            raise UsageError(f"tokenizer_path {path} does not exist")
        return path
    # Meta's download script puts tokenizer.model next to the size folders (llama-2-7b/, llama-2-13b/, ...).
    for candidate in (input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"No tokenizer.model in {input_dir} or its parent: pass tokenizer_path= (--tokenizer)")


def _read_params(input_dir: Path) -> dict:
    path = input_dir / "params.json"
    if not path.is_file():
        raise UsageError(f"Missing params.json in {input_dir}: Meta's checkpoint folder holds params.json next to "
                         "the consolidated.NN.pth shards")
    try:
        with open(path, encoding="utf-8") as f:
            params = json.load(f)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(params, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(params).__name__}")
    return params


class _ShardReader:
    """Memory-mapped access to the model-parallel shards, reopened on demand.

    Pages of a mapping stay resident until it is closed, so `release()` drops the mappings after each output
    file: the resident set then holds only the pages read since the last file was written.
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self._shards: list[dict[str, torch.Tensor]] | None = None

    def shards(self) -> list[dict[str, torch.Tensor]]:
        if self._shards is None:
            self._shards = []
            for path in self.paths:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except (RuntimeError, pickle.UnpicklingError) as err:
                    raise UsageError(f"{path.name} is not a loadable PyTorch state dict ({err})") from err
                if not isinstance(state, dict):
                    raise UsageError(f"{path.name} holds a {type(state).__name__}, expected a state dict")
                self._shards.append({k: v for k, v in state.items() if k not in _IGNORED_KEYS})
        return self._shards

    def release(self) -> None:
        self._shards = None  # the last reference: the mappings close here (no reference cycles, no gc needed)


def _key_diff(keys: set[str], reference: set[str]) -> str:
    missing, extra = sorted(reference - keys), sorted(keys - reference)
    return (f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''} ({len(extra)})")


def _check_shards(shards: list[dict[str, torch.Tensor]], paths: Sequence[Path], layout: list[_Tensor],
                  config: Llama2Config) -> None:
    """Refuse shards whose key sets differ, whose shapes do not follow Meta's split rules for the config, or whose
    replicated norms differ."""
    n = len(shards)
    # Meta gives each rank n_heads / n and n_kv_heads / n whole heads (`n_local_heads`, `n_local_kv_heads`).
    for field, value in (("n_heads", config.num_attention_heads), ("n_kv_heads", config.num_key_value_heads)):
        if value % n:
            raise UsageError(f"params.json has {field}={value}, which cannot be split into {n} model-parallel "
                             f"shards ({n} consolidated.NN.pth files found)")
    for t in layout:
        if t.split_dim is not None and t.shape[t.split_dim] % n:
            raise UsageError(f"{t.meta_name} has {t.shape[t.split_dim]} entries along dim {t.split_dim} by "
                             f"params.json, which cannot be split into {n} model-parallel shards")
    first = set(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != first:
            raise UsageError(f"{path.name} and {paths[0].name} have different key sets: {path.name} has "
                             f"{_key_diff(set(shard), first)}")
    expected = {t.meta_name for t in layout}
    if first != expected:
        raise UsageError(f"The shards do not have the keys params.json implies ({config.num_hidden_layers} layers): "
                         f"{_key_diff(first, expected)}")
    for path, shard in zip(paths, shards):
        for t in layout:
            got, want = tuple(shard[t.meta_name].shape), t.shard_shape(n)
            if got == want:
                continue
            hint = ""
            if t.split_dim is not None and len(got) == len(want) and got[t.split_dim] and \
                    t.shape[t.split_dim] % got[t.split_dim] == 0 and t.shape[t.split_dim] // got[t.split_dim] != n:
                hint = (f"; its shape fits {t.shape[t.split_dim] // got[t.split_dim]} shards, but {n} "
                        "consolidated.NN.pth files were found")
            rule = "replicated" if t.split_dim is None else f"split on dim {t.split_dim} into {n}"
            raise UsageError(f"{path.name}: {t.meta_name} has shape {list(got)}, expected {list(want)} (full shape "
                             f"{list(t.shape)} from params.json and the tokenizer's vocabulary, {rule}){hint}")
    # Norms are small: compare them now, so that nothing is written for shards of different checkpoints.
    for t in layout:
        if t.split_dim is None:
            for path, shard in zip(paths[1:], shards[1:]):
                if not torch.equal(shard[t.meta_name], shards[0][t.meta_name]):
                    raise UsageError(f"{t.meta_name} must be replicated across model-parallel shards, but "
                                     f"{path.name} differs from {paths[0].name}: the shards come from different "
                                     "checkpoints")


def _merge(t: _Tensor, shards: list[dict[str, torch.Tensor]], dtype: torch.dtype | None) -> torch.Tensor:
    """Rebuild one full tensor from its model-parallel pieces, in rotate-half layout and the output dtype."""
    pieces = [shard[t.meta_name] for shard in shards]
    if t.split_dim is None or len(pieces) == 1:
        full = pieces[0]  # replicated tensors were checked equal in `_check_shards`
    else:
        full = torch.cat(pieces, dim=t.split_dim)
    if t.rope_heads is not None:
        full = interleaved_to_rotate_half(full, t.rope_heads)
    if dtype is not None and full.dtype != dtype:
        full = full.to(dtype)
    return full.contiguous()


def _plan_files(layout: list[_Tensor], itemsize: int, max_bytes: int) -> list[list[_Tensor]]:
    """Group tensors, in order, into files of at most `max_bytes` (a larger single tensor gets a file of its own)."""
    files: list[list[_Tensor]] = [[]]
    size = 0
    for t in layout:
        nbytes = itemsize * torch.Size(t.shape).numel()
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += nbytes
    return files


def _file_names(n_files: int) -> Iterator[str]:
    if n_files == 1:
        yield SAFE_WEIGHTS_NAME
        return
    for i in range(n_files):
        yield f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"


class _SafetensorsWriter:
    """Writes one safetensors file tensor by tensor.

    `safetensors.torch.save_file` needs every tensor of a file in memory at once; here the header is written first
    from the planned names, shapes and dtype (the format: 8-byte little-endian header length, JSON header padded
    to 8 bytes, then the raw little-endian data in header order), and each merged tensor is written and freed.
    """

    def __init__(self, path: Path, entries: list[_Tensor], dtype: torch.dtype):
        itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in entries:
            nbytes = itemsize * torch.Size(t.shape).numel()
            header[t.hf_name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                                 "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.data_size = offset
        self._pending = [(t.hf_name, t.shape, dtype) for t in entries]
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, got = self._pending.pop(0), (name, tuple(tensor.shape), tensor.dtype)
        if expected != got:
            raise RuntimeError(f"safetensors writer expected {expected}, got {got}")
        # Reinterpret as bytes without a copy (numpy has no bfloat16).
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    def __enter__(self) -> "_SafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        if exc[0] is None and self._pending:
            raise RuntimeError(f"safetensors file closed with {len(self._pending)} tensors unwritten")


def existing_content(output_dir: Path, ignore: Sequence[str] = ()) -> list[str]:
    """Names in `output_dir` (sorted), without `ignore`; [] when it does not exist."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name not in ignore)


def check_output(output_dir: Path, overwrite: bool, ignore: Sequence[str] = ()) -> None:
    """Refuse a non-empty `output_dir` unless `overwrite` (which replaces the whole folder, stale files included)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output_dir {output_dir} exists and is not a folder")
    found = existing_content(output_dir, ignore)
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise UsageError(f"{output_dir} is not empty ({shown}): choose an empty folder, or pass overwrite (--overwrite)"
                         " to replace the whole folder once the new model is complete")


def save_tokenizer(tokenizer_path: Path, output_dir: Path) -> None:
    """Write the SentencePiece-exact Llama2Tokenizer files (tokenizer.json, tokenizer_config.json, ...)."""
    from .tokenization_llama2 import Llama2Tokenizer

    Llama2Tokenizer.from_sentencepiece(str(tokenizer_path)).save_pretrained(str(output_dir))
    shutil.copyfile(tokenizer_path, output_dir / "tokenizer.model")  # keep the original for sentencepiece users


@dataclass
class ConversionPlan:
    """A checked checkpoint, ready to write: what `check_meta_checkpoint` found, nothing written yet."""

    input_dir: Path
    tokenizer_path: Path
    config: Llama2Config
    reader: "_ShardReader"
    layout: list[_Tensor]
    dtype: torch.dtype
    max_bytes: int
    n_shards: int


def check_meta_checkpoint(input_dir: str | Path, *, tokenizer_path: str | Path | None = None,
                          max_shard_size: int | str = "5GB", dtype: str | torch.dtype | None = None) -> ConversionPlan:
    """Every check of a conversion, before any file is written (UsageError naming the file and what is wrong)."""
    import sentencepiece as spm

    if sys.byteorder != "little":
        raise RuntimeError("convert-meta writes safetensors' little-endian data from memory: big-endian hosts are "
                           "not supported")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UsageError(f"input_dir {input_dir} is not a directory")
    params = _read_params(input_dir)
    paths = _find_shards(input_dir)
    tok_path = _find_tokenizer(input_dir, tokenizer_path)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    except (RuntimeError, OSError) as err:  # sentencepiece reports a corrupt model as a bare RuntimeError
        raise UsageError(f"{tok_path}: not a SentencePiece tokenizer.model ({str(err).splitlines()[0]})") from None
    # params.json has vocab_size -1 in the release: Meta takes it from the tokenizer (`tokenizer.n_words`).
    config = Llama2Config.from_meta_params(params, vocab_size=sp.vocab_size(),
                                           bos_token_id=sp.bos_id() if sp.bos_id() >= 0 else None,
                                           eos_token_id=sp.eos_id() if sp.eos_id() >= 0 else None)
    out_dtype = _DTYPES[dtype] if isinstance(dtype, str) and dtype in _DTYPES else dtype
    if out_dtype is not None and out_dtype not in _SAFETENSORS_DTYPES:
        raise UsageError(f"dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
    max_bytes = convert_file_size_to_int(max_shard_size)
    if max_bytes <= 0:
        raise UsageError(f"max_shard_size must be positive, got {max_shard_size!r}")

    layout = meta_layout(config)
    reader = _ShardReader(paths)
    shards = reader.shards()
    _check_shards(shards, paths, layout, config)
    src_dtypes = {v.dtype for shard in shards for v in shard.values()}
    del shards
    reader.release()
    if out_dtype is None:
        if len(src_dtypes) != 1:
            raise UsageError(f"The shards mix dtypes {sorted(map(str, src_dtypes))}: pass dtype= to choose one")
        out_dtype = next(iter(src_dtypes))
        if out_dtype not in _SAFETENSORS_DTYPES:
            raise UsageError(f"The shards hold {out_dtype} weights, which this converter does not write as they are: "
                             f"pass dtype (--dtype) as one of {sorted(_DTYPES)}")
    return ConversionPlan(input_dir, tok_path, config, reader, layout, out_dtype, max_bytes, len(paths))


def write_conversion(plan: ConversionPlan, folder: Path, progress: bool = True) -> int:
    """Write the checked conversion into `folder` (which exists); returns the bytes of weights written."""
    config, reader, out_dtype = plan.config, plan.reader, plan.dtype
    logger.info("Converting %d model-parallel shard(s) of %s (%d layers, %d heads, %d KV heads) to %s",
                plan.n_shards, plan.input_dir, config.num_hidden_layers, config.num_attention_heads,
                config.num_key_value_heads, out_dtype)
    files = _plan_files(plan.layout, torch.empty((), dtype=out_dtype).element_size(), plan.max_bytes)
    weight_map: dict[str, str] = {}
    total_size = 0
    bar = tqdm(total=len(plan.layout), desc="convert-meta", unit="tensor", disable=not progress)
    for group, name in zip(files, _file_names(len(files))):
        shards = reader.shards()
        with _SafetensorsWriter(folder / name, group, out_dtype) as writer:
            for t in group:
                writer.write(t.hf_name, _merge(t, shards, out_dtype))  # the merged copy is freed right after
                weight_map[t.hf_name] = name
                bar.update()
        total_size += writer.data_size
        logger.info("Wrote %s (%d tensors)", name, len(group))
        del shards
        reader.release()
    bar.close()
    if len(files) > 1:
        with open(folder / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")

    config.dtype = out_dtype
    config.architectures = ["Llama2ForCausalLM"]
    config.save_pretrained(folder)
    # The code files, as `save_pretrained` of a model writes them: the config's auto_map points at them, so users
    # without this package can load the directory with trust_remote_code=True.
    custom_object_save(Llama2ForCausalLM, folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=True,
                     temperature=_META_TEMPERATURE, top_p=_META_TOP_P,
                     max_length=config.max_position_embeddings).save_pretrained(folder)
    save_tokenizer(plan.tokenizer_path, folder)
    logger.info("Wrote %.1f MB of weights in %d file(s)", total_size / 1e6, len(files))
    return total_size


def convert_meta_checkpoint(input_dir: str | Path, output_dir: str | Path, *, tokenizer_path: str | Path | None = None,
                            max_shard_size: int | str = "5GB", dtype: str | torch.dtype | None = None,
                            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Meta Llama 2 checkpoint folder to a Hugging Face model directory loadable by
    `Llama2ForCausalLM.from_pretrained(output_dir)`, with the tensor names and layout of `meta-llama/Llama-2-*-hf`.

    Args:
        input_dir: folder with `params.json` and `consolidated.00.pth` ... `consolidated.{N-1}.pth`.
        output_dir: absent or empty (or any folder with `overwrite`). Receives `model.safetensors` (or
            `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json` when the weights exceed
            `max_shard_size`), `config.json`, `generation_config.json`, the tokenizer files (with Meta's
            `tokenizer.model`) and the model code files that the config's `auto_map` names (`modeling_llama2.py`,
            ...), as `save_pretrained` writes them.
        tokenizer_path: Meta's `tokenizer.model`; default: in `input_dir`, else in its parent (Meta's layout).
        max_shard_size: upper bound of one safetensors file (`"5GB"`, `"500MB"` or bytes); also bounds peak memory.
        dtype: output dtype (`"float32"`, `"bfloat16"`, `"float16"` or a torch dtype); None keeps the checkpoint's
            (bfloat16 for Meta's release; a float64 checkpoint needs one).
        overwrite: replace a non-empty `output_dir` as a whole, once the new folder is complete (otherwise refused).
        progress: show a progress bar over tensors.

    Raises:
        UsageError (a ValueError): missing params.json / shards / tokenizer; a corrupt tokenizer.model; shards
            numbered with gaps; shards whose key sets differ from the model params.json describes; shapes that do
            not follow Meta's split rules for the number of shards; replicated norms that differ between shards; a
            vocabulary that disagrees with the tokenizer; a dtype with no safetensors output; a non-empty output_dir
            without overwrite. All are raised before anything is written.

    Returns the output directory.
    """
    output_dir = Path(output_dir)
    plan = check_meta_checkpoint(input_dir, tokenizer_path=tokenizer_path, max_shard_size=max_shard_size,
                                 dtype=dtype)
    check_output(output_dir, overwrite)
    with replacing_folder(output_dir) as tmp:
        write_conversion(plan, tmp, progress)
    logger.info("Saved %s", output_dir)
    return output_dir


__all__ = ["ConversionPlan", "check_meta_checkpoint", "check_output", "convert_meta_checkpoint",
           "interleaved_to_rotate_half", "meta_layout", "write_conversion"]
