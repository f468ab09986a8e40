"""Reading GGUF checkpoints (llama.cpp's format) into Hugging Face form.

`read_gguf` dequantizes every tensor to float32 and renames it to the parameter name a
transformers model of the same architecture uses; `convert_gguf_to_hf` writes that out as an
ordinary HF model directory (config, safetensors, tokenizer), so the rest of the runtime only ever
loads one format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from smallm.runtime.model.quantized import QuantizedTensor

SOURCE_MARKER = "gguf_source.json"
"""File in a converted directory that records which GGUF it came from (see `source_fingerprint`)."""


@dataclass(frozen=True)
class _Arch:
    """How one GGUF architecture maps onto its transformers model class."""

    hf_class: str
    model_type: str
    # llama.cpp's converter reorders q/k rows per head for its interleaved rotary embedding, but
    # only for the llama family; qwen2/qwen3 files are written in HF's rotate_half order.
    permuted_qk: bool
    # Which projections carry a bias when the model has attention biases; qwen2 always has them.
    bias_projections: tuple[str, ...]
    always_biased: bool = False
    qk_norm: bool = False


_ARCHS = {
    "llama": _Arch("LlamaForCausalLM", "llama", True, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen2": _Arch(
        "Qwen2ForCausalLM", "qwen2", False, ("q_proj", "k_proj", "v_proj"), always_biased=True
    ),
    "qwen3": _Arch(
        "Qwen3ForCausalLM", "qwen3", False, ("q_proj", "k_proj", "v_proj", "o_proj"), qk_norm=True
    ),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass
class GGUFModel:
    """A GGUF checkpoint in HF form: `config` is what `config.json` would hold, `tensors` the
    float32 state dict under transformers' parameter names and shapes."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a llama/qwen2/qwen3 GGUF file, dequantizing every tensor to float32.

    Raises `ValueError` for an unsupported architecture, tensor type or rope scaling, and for a
    file whose tensors do not make up a complete model.
    """
    reader = GGUFReader(path)
    metadata = _scalar_metadata(reader)
    arch_name = metadata.get("general.architecture")
    if arch_name not in _ARCHS:
        raise ValueError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; "
            f"supported: {', '.join(sorted(_ARCHS))}"
        )
    arch = _ARCHS[arch_name]
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{path}: has a rope_freqs.weight tensor (llama3-style rope scaling), "
            "which this loader does not support"
        )
    config = _build_config(arch_name, arch, metadata, reader)
    tensors = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        values = _dequantize(tensor)
        if arch.permuted_qk:
            values = _unpermute_qk(values, hf_name, config)
        tensors[hf_name] = values
    _check_complete(path, arch, config, tensors)
    return GGUFModel(config=config, tensors=tensors)


def _scalar_metadata(reader: GGUFReader) -> dict[str, Any]:
    """The file's non-array key/values; the big arrays (the vocabulary) are left to the tokenizer."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.FLOAT32:
            # The shortest decimal that is the same float32, so config.json says 1e-05 where the
            # original model did rather than 9.999999747378752e-06; both are one float32.
            value = float(str(np.float32(value)))
        metadata[key] = value
    return metadata


def _build_config(
    arch_name: str, arch: _Arch, metadata: dict[str, Any], reader: GGUFReader
) -> dict[str, Any]:
    def key(name: str) -> Any:
        return metadata.get(f"{arch_name}.{name}")

    def required(name: str) -> Any:
        if key(name) is None:
            raise ValueError(f"GGUF metadata has no {arch_name}.{name}")
        return key(name)

    tensor_shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    hidden = int(required("embedding_length"))
    heads = int(required("attention.head_count"))
    head_dim = int(key("attention.key_length") or hidden // heads)
    rope_dims = key("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(
            f"rope.dimension_count {rope_dims} != head_dim {head_dim}: "
            "partial rotary embeddings are not supported"
        )
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": int(required("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(required("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base") or 10000.0),
        "max_position_embeddings": int(required("context_length")),
        # The embedding matrix is the ground truth for the vocabulary the weights were trained on.
        "vocab_size": tensor_shapes["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": arch.always_biased or "blk.0.attn_q.bias" in tensor_shapes,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        if gguf_key in metadata:
            config[hf_key] = int(metadata[gguf_key])
    rope_scaling = _rope_scaling(key("rope.scaling.type"), key("rope.scaling.factor"))
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(kind: str | None, factor: float | None) -> dict[str, Any] | None:
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor or 1.0)}
    raise ValueError(f"rope scaling type {kind!r} is not supported (only linear)")


def _hf_name(gguf_name: str) -> str:
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match:
        layer, module, kind = match.groups()
        if module in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[module]}.{kind}"
    else:
        module, _, kind = gguf_name.rpartition(".")
        if module in _GLOBAL_NAMES and kind == "weight":
            return f"{_GLOBAL_NAMES[module]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known transformers counterpart")


def _dequantize(tensor: Any) -> torch.Tensor:
    """One reader tensor as float32 in torch's dimension order (GGUF lists ne0, the fastest
    varying dimension, first)."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
            f"which the installed gguf package cannot dequantize"
        ) from error
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only memory map; torch needs its own copy.
    if not values.flags.writeable:
        values = values.copy()
    return torch.from_numpy(values)


def _unpermute_qk(values: torch.Tensor, hf_name: str, config: dict[str, Any]) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of q/k (weights and biases).

    Within a head llama.cpp stores the rotary pairs interleaved (row 2i, 2i+1 = HF rows i and
    i + head_dim/2); HF's rotate_half wants the two halves contiguous.
    """
    if ".self_attn.q_proj." in hf_name:
        heads = config["num_attention_heads"]
    elif ".self_attn.k_proj." in hf_name:
        heads = config["num_key_value_heads"]
    else:
        return values
    rows = values.shape[0]
    half = rows // heads // 2
    grouped = values.reshape(heads, half, 2, *values.shape[1:])
    return grouped.transpose(1, 2).reshape(values.shape).contiguous()


def _check_complete(
    path: str | Path, arch: _Arch, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *(f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
    ]
    if config["attention_bias"]:
        per_layer += [f"self_attn.{p}.bias" for p in arch.bias_projections]
    if arch.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for layer in range(config["num_hidden_layers"]):
        expected.update(f"model.layers.{layer}.{name}" for name in per_layer)
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: tensors do not match a {arch.hf_class}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def source_fingerprint(gguf_path: str | Path) -> dict[str, Any]:
    """What identifies a GGUF file cheaply (name, size, mtime), recorded by `convert_gguf_to_hf`
    in `SOURCE_MARKER` so a cache can tell whether a converted directory is stale."""
    stat = Path(gguf_path).stat()
    return {"gguf_file": Path(gguf_path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def gguf_origin(model_dir: str | Path) -> Path | None:
    """The GGUF file a converted directory was made from, if it is still there unchanged."""
    try:
        recorded = json.loads((Path(model_dir) / SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    candidates = [Path(recorded["path"])] if recorded.get("path") else []
    if not candidates:  # converted before paths were recorded: the default model's file?
        from smallm.runtime.model.default_model import DefaultModelMissing, find_default_gguf

        try:
            candidates.append(find_default_gguf())
        except DefaultModelMissing:
            return None
    for path in candidates:
        if path.is_file() and matches_fingerprint(recorded, path):
            return path
    return None


def matches_fingerprint(recorded: dict[str, Any], gguf_path: str | Path) -> bool:
    """Whether a marker's fingerprint fields describe ``gguf_path`` as it is now."""
    fingerprint = source_fingerprint(gguf_path)
    return {k: recorded.get(k) for k in fingerprint} == fingerprint


# GGUF types that are not loaded packed: which smallm quantization they are requantized to.
_REQUANTIZE_AS = {
    **dict.fromkeys(("Q6_K", "Q8_K", "Q8_1"), "int8"),
    **dict.fromkeys(("Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q3_K", "Q2_K"), "int4"),
}


def read_gguf_quantized(path: str | Path) -> dict[str, QuantizedTensor | str | None]:
    """The file's quantized linear weights under HF parameter names.

    Q4_0 / Q4_1 / Q8_0 tensors come back as QuantizedTensor, read from their blocks with no
    float detour (q/k rows un-permuted like ``read_gguf``). Other quantized types map to the
    kind they should be requantized to (``"int4"``/``"int8"``, from the dequantized weights);
    float tensors (F32/F16/BF16) map to None: they stay dense.
    """
    from smallm.runtime.model.quantized import GGUF_DIRECT_TYPES, from_gguf_blocks

    reader = GGUFReader(path)
    metadata = _scalar_metadata(reader)
    arch = _ARCHS.get(metadata.get("general.architecture"))
    out: dict[str, QuantizedTensor | str | None] = {}
    for tensor in reader.tensors:
        if not tensor.name.endswith(".weight") or len(tensor.shape) != 2:
            continue
        hf_name = _hf_name(tensor.name)
        kind = tensor.tensor_type.name
        if kind not in GGUF_DIRECT_TYPES:
            out[hf_name] = _REQUANTIZE_AS.get(kind, "int4" if kind.startswith("IQ") else None)
            continue
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))
        qt = from_gguf_blocks(kind, np.asarray(tensor.data), shape)
        if arch is not None and arch.permuted_qk:
            heads = _qk_heads(hf_name, metadata)
            if heads:
                qt = qt.rows(_unpermute_index(shape[0], heads))
        out[hf_name] = qt
    return out


def _qk_heads(hf_name: str, metadata: dict[str, Any]) -> int | None:
    arch = metadata["general.architecture"]
    heads = int(metadata[f"{arch}.attention.head_count"])
    if ".self_attn.q_proj." in hf_name:
        return heads
    if ".self_attn.k_proj." in hf_name:
        return int(metadata.get(f"{arch}.attention.head_count_kv") or heads)
    return None


def _unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order that ``_unpermute_qk`` produces: ``unpermuted = permuted[index]``."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the GGUF model as an HF model directory: `config.json`, float32
    `model.safetensors`, `generation_config.json`, the tokenizer (with its chat template) and
    `SOURCE_MARKER`.

    The directory appears whole or not at all: it is written next to `out_dir` and renamed into
    place. An existing `out_dir` is replaced only when `overwrite` is true.
    """
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # mkdtemp makes it owner-only; the finished model directory should be readable like any other.
    staging.chmod(0o755)
    try:
        _write_model(gguf_path, staging)
        _write_tokenizer(gguf_path, staging)
        # The path lets the runner read the file's quantized blocks directly (gguf_origin).
        marker = {**source_fingerprint(gguf_path), "path": str(gguf_path)}
        (staging / SOURCE_MARKER).write_text(json.dumps(marker))
        _move_into_place(staging, out_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_model(gguf_path: Path, out_dir: Path) -> None:
    from safetensors.torch import save_file

    model = read_gguf(gguf_path)
    weights = out_dir / "model.safetensors"
    save_file(model.tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors creates it owner-only
    (out_dir / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    generation = {
        key: model.config[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if key in model.config
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        template = GGUFReader(gguf_path).get_field("tokenizer.chat_template")
        if template is not None:
            tokenizer.chat_template = template.contents()
    tokenizer.save_pretrained(str(out_dir))


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    retired = None
    if overwrite and out_dir.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first.
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, retired / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except OSError as error:
        if out_dir.exists():  # another conversion into out_dir finished first
            raise FileExistsError(f"{out_dir} appeared while converting into it") from error
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
