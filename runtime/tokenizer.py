"""Tokenizers: Hugging Face `tokenizers` built from tokenizer.json or GGUF metadata, chat templates,
and an incremental detokenizer for streaming.

A GGUF file has no tokenizer.json: its vocabulary, merges, token types and
special ids are metadata. They are assembled here into the same
`tokenizers.Tokenizer` transformers builds from that file (GPT2Tokenizer for
byte-level BPE, LlamaTokenizer for SentencePiece BPE with byte fallback, the
pre-tokenizer regex chosen by tokenizer.ggml.pre), so ids match transformers.

Chat templates are untrusted code from model files: they render in jinja2's
ImmutableSandboxedEnvironment, configured like transformers (trim_blocks,
lstrip_blocks, loopcontrols, raise_exception, tojson without HTML escaping).
"""
import functools
import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' table); others use GPT-2's
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def bytes_to_unicode():
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    shifted = 0  # the other bytes get code points from 256 up
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + shifted)
            shifted += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    """encode / decode / apply_chat_template / stream over a `tokenizers.Tokenizer`."""

    def __init__(self, backend, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 chat_template=None, add_bos=None, add_eos=None):
        self._backend = backend
        self.special_tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                                 ("unk_token", unk_token), ("pad_token", pad_token)) if v}
        self.bos_token_id = self._id(bos_token)
        eos_id = self._id(eos_token)
        self.eos_token_ids = set() if eos_id is None else {eos_id}
        self.pad_token_id = self._id(pad_token)
        self.chat_template = chat_template
        self._template = None
        if add_bos is not None or add_eos is not None:
            self._set_post_processor(bool(add_bos) and self.bos_token_id is not None,
                                     bool(add_eos) and eos_id is not None)

    def _id(self, token):
        return None if token is None else self._backend.token_to_id(token)

    def _set_post_processor(self, add_bos, add_eos):
        """BOS/EOS around each sequence, as transformers rewrites it when add_bos_token/add_eos_token is given."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = [(bos, self.bos_token_id)] * add_bos + [(eos, self._id(eos))] * add_eos
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def special_ids(self) -> frozenset:
        """Ids of the special added tokens (the ones decode(skip_special_tokens=True) drops)."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset:
        """Ids of the "<0xHH>" tokens when the decoder has SentencePiece byte fallback, else empty."""
        if "ByteFallback" not in repr(self._backend.decoder):
            return frozenset()
        vocab = self._backend.get_vocab()
        return frozenset(i for b in range(256) if (i := vocab.get(f"<0x{b:02X}>")) is not None)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_dir(cls, path):
        """From a Hugging Face directory: tokenizer.json, plus the special tokens and chat template of
        tokenizer_config.json, special_tokens_map.json and chat_template.jinja when present.

        Like transformers 5, tokenizer.json's post-processor alone decides whether BOS/EOS are added;
        add_bos_token/add_eos_token in tokenizer_config.json are ignored.
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            hint = ""
            if (path / "tokenizer.model").exists():
                hint = (" (it has a SentencePiece tokenizer.model; save it as tokenizer.json with transformers: "
                        "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
            raise FileNotFoundError(f"{path} has no tokenizer.json{hint}")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
        config = _json(path / "tokenizer_config.json")
        specials = _json(path / "special_tokens_map.json")
        tokens = {k: _content(config.get(k) or specials.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                                          "pad_token")}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one is used
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if (path / "chat_template.jinja").is_file():  # a separate file takes priority, as in transformers
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, chat_template=template, **tokens)

    @classmethod
    def from_gguf(cls, reader):
        """From GGUF tokenizer.ggml.* metadata (`reader`: a fuselm GGUFFile or a gguf.GGUFReader):
        model "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE with byte fallback)."""
        from .config import gguf_value

        def meta(key, default=None):
            return gguf_value(reader, f"tokenizer.{key}", default)

        kind, tokens = meta("ggml.model"), meta("ggml.tokens")
        if not tokens:
            raise ValueError("the GGUF file has no tokenizer.ggml.tokens")
        types = meta("ggml.token_type") or [1] * len(tokens)
        # `defaults`: the special tokens transformers' GPT2Tokenizer / LlamaTokenizer register by default
        if kind == "gpt2":
            backend, defaults = _byte_level(tokens, meta("ggml.merges") or [], meta("ggml.pre")), ["<|endoftext|>"]
        elif kind == "llama":
            backend = _sentencepiece(tokens, meta("ggml.merges"), meta("ggml.scores"))
            defaults = ["<unk>", "<s>", "</s>"]
        else:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2', 'llama'")
        named = {k: tokens[i] if (i := meta(f"ggml.{key}_token_id")) is not None and 0 <= i < len(tokens) else None
                 for k, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                ("pad_token", "padding"))}
        _add_gguf_special_tokens(backend, tokens, types, kind == "gpt2", defaults + list(named.values()))
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
        add_bos = meta("ggml.add_bos_token", kind == "llama")
        return cls(backend, chat_template=meta("chat_template"), add_bos=add_bos,
                   add_eos=meta("ggml.add_eos_token", False), **named)

    # ---------------------------------------------------------------- use

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _spelling(self):
        """How the vocabulary spells bytes: "byte-level" (GPT-2's table), "metaspace" (SentencePiece's
        U+2581 for a space) or None (ask decode)."""
        decoder = repr(self._backend.decoder)
        return "byte-level" if "ByteLevel" in decoder else "metaspace" if "\u2581" in decoder else None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for inside a text: what a token's logprob entry reports. Not
        decode([id]), which drops a SentencePiece token's leading space and turns part of a UTF-8
        character into U+FFFD; the bytes of consecutive tokens join to the text's bytes."""
        piece = self._backend.id_to_token(int(token_id))
        if piece is None or token_id in self.special_ids:
            return self.decode([token_id], skip_special_tokens=False).encode()
        if token_id in self.byte_fallback_ids:
            return bytes([int(piece[3:5], 16)])
        if self._spelling == "byte-level":
            table = _BYTE_DECODER
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        elif self._spelling == "metaspace":
            return piece.replace("\u2581", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text for chat `messages` ([{"role": ..., "content": ...}, ...])."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        messages = _check_messages(messages)
        if self._template is None:
            self._template = _compile(self.chat_template)
        import jinja2
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: the pieces `push` returns, joined with `flush()`, equal decode() of all ids.

    Each step decodes a short window: the tokens that produced the last emitted text (the prefix)
    plus the new ones, and emits what the window adds beyond the prefix. Decoding with a prefix of
    real text keeps context-dependent decoders right (SentencePiece's leading-space strip). Text is
    held back while it may still change: when it ends in U+FFFD (a multi-byte UTF-8 character is
    incomplete), or while the last visible token is a byte-fallback token ("<0xE2>"), since
    SentencePiece decodes a whole run of byte tokens together.
    """

    def __init__(self, tokenizer, skip_special_tokens=True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids = []
        self._prefix = self._read = 0  # window start; end of the tokens already turned into text
        self._in_byte_run = False

    def _decode(self, start, end=None):
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_id) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        if not (self._skip and token_id in self._tok.special_ids):
            self._in_byte_run = token_id in self._tok.byte_fallback_ids
        if self._in_byte_run:
            return ""
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """The text not yet returned (an incomplete character becomes U+FFFD, as decode() writes it)."""
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        self._prefix = self._read = len(self._ids)
        self._in_byte_run = False
        return text[len(prefix_text):]


# ------------------------------------------------------------------ helpers


def _json(path):
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _content(token):
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _byte_level(tokens, merges, pre):
    """transformers' GPT2Tokenizer for a GGUF vocabulary, split by the regex `pre` names."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # tokens written outside the byte alphabet (some converters store added tokens as raw text) are respelled
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    backend = _Backend(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                           continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = GGUF_PRE_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens, merges, scores):
    """transformers' LlamaTokenizer for a GGUF vocabulary: BPE with byte fallback, "▁" for spaces,
    a space prepended to the first word only. Without merges in the file they are rebuilt from the
    scores (transformers' generate_merges)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ")) for m in merges]
    else:
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores or [0.0] * len(tokens))))
    backend = _Backend(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _merges_from_scores(vocab, scores):
    """Every split of a token into two vocabulary tokens, best token score first (transformers' order)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_gguf_special_tokens(backend, tokens, types, byte_level, named):
    """Control tokens (and the named bos/eos/unk/pad ones) become special added tokens so they stay whole
    and decode() can skip them; user-defined ones become plain added tokens. In a byte-level vocabulary
    a control token spelled outside the byte alphabet is a converter mislabel and is left alone."""
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [t for t, kind in zip(tokens, types) if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    vocab = backend.get_vocab()
    control += [t for t in named if t is not None and t in vocab and t not in control]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab])


def _check_messages(messages):
    """The messages as plain dicts (None-valued keys dropped, as transformers does), after validation."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"messages[{i}][{key!r}] must be a string, got {m.get(key)!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _compile(template):
    """The template compiled in a sandbox, with the globals and filters transformers provides."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders as-is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid jinja2 (line {e.lineno}): {e.message}") from None
