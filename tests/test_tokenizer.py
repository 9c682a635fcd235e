import pytest

from conftest import require_module
from engine.errors import ModelError
from engine.model.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces\n\n\ttabs  and   runs   of whitespace\n\n\n",
    "12345 3.14159 1,000,000 and 2024-11-24",
    "héllo wörld ñ 日本語 😀 emoji Ελληνικά",
    "def f(x):\n    return x**2  # comment\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "I'm you're they'll CAPS'S don't",
    "a\r\nb\u00a0c\u200bd",
    "",
]


@pytest.fixture(scope="module")
def tok(default_spec):
    return Tokenizer.from_spec(default_spec)


def test_known_ids(tok):
    # ids from llama.cpp for this file, kept here so the check stands without llama.cpp too
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # smollm splits digits one by one
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n") == [1, 4093, 198, 6004, 2, 198]


def _llama_cpp_vocab(path):
    """llama.cpp's own tokenizer for `path`: the oracle these tests compare against."""
    llama_cpp = require_module("llama_cpp", "llama-cpp-python is the oracle for this check")
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def llama_vocab(default_model):
    yield from _llama_cpp_vocab(default_model)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_llama_cpp(tok, llama_vocab, text):
    assert tok.encode(text) == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_stops(tok):
    assert tok.eos_id == 2 and tok.bos_id == 1 and not tok.add_bos
    assert tok.stop_ids == (2,)


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_is_sandboxed(tok):
    evil = Tokenizer.__new__(Tokenizer)
    evil.__dict__.update(tok.__dict__)
    evil.__dict__.pop("_template", None)
    evil.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ModelError, match="chat template"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_synthetic_tokenizer(tiny_f32):
    from engine.model.spec import ModelSpec

    t = Tokenizer.from_spec(ModelSpec.open(tiny_f32))
    ids = t.encode("the <|im_end|>")
    assert ids[-1] == 2 and t.decode(ids) == "the <|im_end|>"


SPM_TEXTS = ["hello world", "the in is it", "Hello World!", "  two  spaces", "héllo 😀 日本", "a\nb\tc",
             "<s>hello</s> the", "", " leading", "1234 x=y+z;"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from engine.model.synth import write_synthetic

    return str(write_synthetic(tmp_path_factory.mktemp("spm") / "spm.gguf", "tiny", "f32", tokenizer="llama"))


@pytest.fixture(scope="module")
def spm_llama_vocab(spm_model):
    yield from _llama_cpp_vocab(spm_model)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_ids_equal_llama_cpp(spm_model, spm_llama_vocab, text):
    from engine.model.spec import ModelSpec

    tok = Tokenizer.from_spec(ModelSpec.open(spm_model))
    assert tok.encode(text, add_bos=False) == spm_llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert tok.encode(text)[:1] == [1] and tok.add_bos  # SentencePiece files add BOS by default
    if "<" not in text:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_unknown_tokenizer_model_is_a_clear_error(tiny_f32, monkeypatch):
    from engine.model.spec import ModelSpec

    spec = ModelSpec.open(tiny_f32)
    real = spec.field
    monkeypatch.setattr(spec, "field", lambda key, default=None: "bert" if key == "tokenizer.ggml.model" else real(key, default))
    with pytest.raises(ModelError, match="tokenizer model 'bert' not supported"):
        Tokenizer.from_spec(spec)


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def arch_vocab(request, arch_models):
    """Synthetic files of the Qwen2 (byte-level BPE, qwen2 pre-tokenizer) and Gemma (SentencePiece
    without a space prefix, <start_of_turn> specials) kinds, with llama.cpp's tokenizer for each."""
    path = arch_models[request.param]
    for llm in _llama_cpp_vocab(path):
        yield path, llm


@pytest.mark.parametrize("text", TEXTS[:5] + ["<start_of_turn>user\nhello<end_of_turn>", "x  12345 ab"])
def test_architecture_tokenizers_equal_llama_cpp(arch_vocab, text):
    from engine.model.spec import ModelSpec

    path, llm = arch_vocab
    tok = Tokenizer.from_spec(ModelSpec.open(path))
    assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=tok.add_bos, special=True)
