"""Speed targets, measured side by side in one run on the default model; prints ratios.

    .venv/bin/python scripts/perf.py [torch|mlx|tinygrad|llamacpp|hybrid|batch|all] [--gen N] [--repeats R]

Every measurement runs in a fresh process: ours through the harness's own isolated cells (the
numbers `bench run` reports), the baselines (Hugging Face `generate()`, a raw llama-cpp-python
loop, mlx-lm's `stream_generate`) through a one-task process pool. Timings on a shared machine are
noisy: read the ratios, and run it twice before believing a small difference.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from engine.measure.bandwidth import host_bandwidth
from engine.measure.cell import Cell, physical_cores
from engine.model.spec import ModelSpec, default_model_path
from engine.sweep.isolation import run_cells
from engine.generate.prompts import seeded_prompt

PROMPT, SEED = 32, 0


@dataclass
class Figure:
    name: str
    decode_tps: float
    roofline_frac: float = float("nan")
    peak_rss_mb: float = float("nan")
    compile_s: float = float("nan")


def ours(name: str, framework: str, precision: str, gen: int, repeats: int, compile: bool = False,
         options: tuple = (), timeout_s: float = 1800, batch_size: int = 1) -> Figure:
    cell = Cell(framework=framework, model=default_model_path(), precision=precision, prompt_tokens=PROMPT,
                gen_tokens=gen, repeats=repeats, warmup=1, compile=compile, options=options, timeout_s=timeout_s,
                batch_size=batch_size)
    (_, rows), = run_cells([cell], host_bandwidth()["host_gbps"], "perf")
    if rows[0].status != "ok":
        print(f"  {name}: {rows[0].status}: {rows[0].error}", file=sys.stderr)
        return Figure(name, float("nan"))
    med = lambda f: statistics.median(getattr(r, f) for r in rows)  # noqa: E731
    return Figure(name, med("decode_tps"), med("roofline_frac"), rows[0].peak_rss_bytes / 1e6, rows[0].compile_s)


def _in_child(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        return pool.submit(fn, *args).result()


def hf_generate_and_engine_decode_tps(gen: int, repeats: int) -> tuple[float, float]:
    """HF `generate()` and the same model stepped by our engine, alternated in one process, so the
    ratio measures the engine's own overhead and nothing else."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    import backends
    from engine.generate.engine import GenerationConfig, InferenceEngine

    spec = ModelSpec.open(default_model_path())
    backend = backends.open_backend("transformers", spec, "f32", "cpu", max_seq_len=PROMPT + gen).backend
    prompt = seeded_prompt(spec, PROMPT, SEED)
    engine, cfg = InferenceEngine(backend), GenerationConfig(max_new_tokens=gen, ignore_eos=True)

    class Clock(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    hf, ours = [], []
    for i in range(repeats + 1):
        clock = Clock()
        backend.model.generate(torch.tensor([prompt]), max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                               streamer=clock, pad_token_id=spec.field("tokenizer.ggml.eos_token_id"))
        run = engine.generate(prompt, cfg)
        if i:  # the first pair warms up; put() sees the prompt first, then each new token
            hf.append((gen - 1) / (clock.t[-1] - clock.t[1]))
            ours.append(run.decode_tps)
    return statistics.median(hf), statistics.median(ours)


def llamacpp_raw_decode_tps(gen: int, repeats: int) -> float:
    """A bare llama-cpp-python greedy loop: eval one token, argmax of the logits, repeat."""
    import llama_cpp
    import numpy as np

    spec = ModelSpec.open(default_model_path())
    prompt = seeded_prompt(spec, PROMPT, SEED)
    threads = physical_cores()  # every core, as the harness gives every framework by default
    llm = llama_cpp.Llama(default_model_path(), n_ctx=PROMPT + gen, n_batch=PROMPT + gen, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    n_vocab = spec.config.vocab_size
    runs = []
    for i in range(repeats + 1):
        llm.reset()
        llm.eval(prompt)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
        t0 = time.perf_counter()
        for _ in range(gen - 1):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
        if i:
            runs.append((gen - 1) / (time.perf_counter() - t0))
    llm.close()
    return statistics.median(runs)


def mlx_lm_decode_tps(gen: int, repeats: int) -> float:
    """mlx-lm's own Llama and `stream_generate`, built from the same (dequantized, f32) weights."""
    from backends.mlx_blas import import_mlx

    mx = import_mlx()  # first: mlx-lm then runs on the BLAS our mlx backend binds
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from backends.transformers_hf import HF_LAYER_NAMES
    from engine.model.tokenizer import Tokenizer

    mx.set_default_device(mx.cpu)
    spec = ModelSpec.open(default_model_path())
    c = spec.config
    model = Model(ModelArgs(model_type="llama", hidden_size=c.dim, num_hidden_layers=c.n_layers,
                            intermediate_size=c.ffn_dim, num_attention_heads=c.n_heads, rms_norm_eps=c.rms_eps,
                            vocab_size=c.vocab_size, num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_base,
                            tie_word_embeddings=spec.tied_embeddings, max_position_embeddings=c.context_length))
    w = spec.load_weights(mx.array)
    weights = [("model.embed_tokens.weight", w.tok_embd), ("model.norm.weight", w.output_norm)]
    for i, layer in enumerate(w.layers):
        weights += [(f"model.layers.{i}.{hf}.weight", getattr(layer, ours_)) for ours_, hf in HF_LAYER_NAMES.items()]
    model.load_weights(weights)
    mx.eval(model.parameters())
    tok = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_spec(spec)._tk), eos_token_ids=[])
    prompt = seeded_prompt(spec, PROMPT, SEED)
    runs = []
    for i in range(repeats + 1):
        last = None
        for last in stream_generate(model, tok, prompt, max_tokens=gen):
            pass
        if i:
            runs.append(last.generation_tps)
    return statistics.median(runs)


def section_torch(gen: int, repeats: int) -> list[tuple[Figure, str, float]]:
    hf_tps, engine_tps = _in_child(hf_generate_and_engine_decode_tps, gen, repeats)
    hf = Figure("HF generate() f32 (baseline)", hf_tps)
    rows = [(hf, "", 0.0), (Figure("transformers f32, our engine (same process)", engine_tps), hf.name, 1.0)]
    for name, fw, prec, comp, target in [
        ("transformers f32, our engine (isolated cell)", "transformers", "f32", False, 0.0),
        ("torch f32 eager", "torch", "f32", False, 1.5), ("torch f32 compiled", "torch", "f32", True, 1.5),
        ("torch bf16 eager", "torch", "bf16", False, 3.0), ("torch bf16 compiled", "torch", "bf16", True, 3.0),
    ]:
        rows.append((ours(name, fw, prec, gen, repeats, comp), hf.name, target))
    return _ratios(rows)


def section_mlx(gen: int, repeats: int):
    base = Figure("mlx-lm stream_generate f32 (baseline)", _in_child(mlx_lm_decode_tps, gen, repeats))
    return _ratios([(base, "", 0.0), (ours("mlx f32, our engine", "mlx", "f32", gen, repeats), base.name, 1.0),
                    (ours("mlx q4_1 native, our engine", "mlx", "q4_1", gen, repeats), base.name, 0.0)])


def section_tinygrad(gen: int, repeats: int):
    return _ratios([(ours("tinygrad f32 BEAM=0", "tinygrad", "f32", gen, repeats), "", 0.0),
                    (ours("tinygrad f32 BEAM=2", "tinygrad", "f32", gen, repeats, options=(("beam", 2),),
                          timeout_s=3000), "", 0.0)])


def section_llamacpp(gen: int, repeats: int):
    raw = Figure(f"raw llama-cpp-python loop, {physical_cores()} threads (baseline)", _in_child(llamacpp_raw_decode_tps, gen, repeats))
    return _ratios([(raw, "", 0.0), (ours("llamacpp q4_1, our engine", "llamacpp", "q4_1", gen, repeats), raw.name, 0.95)])


def section_hybrid(gen: int, repeats: int):
    t = ours("torch f32 eager", "torch", "f32", gen, repeats)
    rows = [(t, "", 0.0), (ours("tinygrad f32", "tinygrad", "f32", gen, repeats), t.name, 0.0),
            (ours("hybrid f32", "hybrid", "f32", gen, repeats), t.name, 0.0)]
    return _ratios(rows)


BATCH = 8
# framework, precision (the default model at f32; llama.cpp at the file's own Q4_1), target for batch 8 / batch 1
BATCH_TARGETS = [("numpy", "f32", 3.0), ("torch", "f32", 3.0), ("llamacpp", "q4_1", 3.0), ("mlx", "f32", 0.0),
                 ("tinygrad", "f32", 0.0), ("hybrid", "f32", 0.0), ("transformers", "f32", 0.0)]


def section_batch(gen: int, repeats: int):
    """Aggregate decode tok/s of 8 sequences in lockstep against one sequence, per framework."""
    rows = []
    for fw, prec, target in BATCH_TARGETS:
        one = ours(f"{fw} {prec} batch 1", fw, prec, gen, repeats)
        rows += [(one, "", 0.0), (ours(f"{fw} {prec} batch {BATCH}", fw, prec, gen, repeats, batch_size=BATCH),
                                  one.name, target)]
    return _ratios(rows)


def _ratios(rows):
    base = {f.name: f for f, _, _ in rows}
    return [(f, (f.decode_tps / base[b].decode_tps) if b else float("nan"), t, b) for f, b, t in rows]


SECTIONS = {"torch": section_torch, "mlx": section_mlx, "tinygrad": section_tinygrad, "llamacpp": section_llamacpp,
            "hybrid": section_hybrid, "batch": section_batch}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", nargs="?", default="all", choices=[*SECTIONS, "all"])
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    console = Console(width=200)
    console.print(f"host memory bandwidth {host_bandwidth()['host_gbps']:.1f} GB/s; prompt {PROMPT}, "
                  f"generate {args.gen}, median of {args.repeats}")
    for name in SECTIONS if args.section == "all" else [args.section]:
        t = Table(title=name, header_style="bold")
        for c in ("measurement", "decode tok/s", "roofline", "peak RSS MB", "compile s", "ratio", "vs", "target"):
            t.add_column(c)
        for f, ratio, target, vs in SECTIONS[name](args.gen, args.repeats):
            fmt = lambda v, s=".2f": "-" if v != v else format(v, s)  # noqa: E731
            ok = "" if not target or ratio != ratio else (" [green]met[/]" if ratio >= target else " [red]missed[/]")
            t.add_row(f.name, fmt(f.decode_tps, ".1f"), fmt(f.roofline_frac), fmt(f.peak_rss_mb, ".0f"),
                      fmt(f.compile_s, ".1f"), fmt(ratio), vs, (f">= {target:g}x" + ok) if target else "")
        console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
