"""Figures and tables over results CSVs, shared by `bench report` and notebooks/analysis.ipynb."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from engine.results.modes import full_mode, mode_label, row_mode

CELL = ["framework", "precision", "device", "model", "prompt_tokens", "gen_tokens", "batch_size", "threads",
        "optimization_level", "options"]


FIDELITY = ["kld_mean", "kld_p99", "same_top_p", "same_top_p_err", "rms_dp"]  # the corpus statistics

def latest_results(directory: str | os.PathLike = "results") -> Path:
    files = sorted(glob.glob(os.path.join(directory, "**", "*.csv"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no results CSV under {directory}/: run `bench run` first")
    return Path(files[-1])


def load_results(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    frames = [pd.read_csv(p).assign(source=str(p)) for p in paths]
    return pd.concat(frames, ignore_index=True)


def load_latencies(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per inter-token latency, from the JSONL beside each CSV (empty if none), with the
    cell, its source file and its mode, so latencies group by cell or by full mode."""
    rows = []
    for p in paths:
        jl = Path(p).with_suffix(".jsonl")
        if not jl.exists():
            continue
        for line in jl.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            where = {"cell_id": r.get("cell_id", ""), "source": str(p), "framework": r["framework"],
                     "mode": mode_label(r["precision"], r.get("optimization_level", ""), r.get("options"))}
            rows += [{**where, "itl_s": x} for x in r.get("itl_s", [])]
    return pd.DataFrame(rows, columns=["cell_id", "source", "framework", "mode", "itl_s"])


def _pooled_samples(keys: pd.Series, latencies: pd.DataFrame | None) -> list[np.ndarray]:
    """Per summary row, the inter-token latencies of all its repeats together; `keys` lists each
    row's (cell_id, source) pairs."""
    if latencies is None or latencies.empty:
        return [np.empty(0)] * len(keys)
    samples = {k: grp.to_numpy(float) for k, grp in latencies.groupby(["cell_id", "source"]).itl_s}
    return [np.concatenate([samples.get(k, np.empty(0)) for k in ks]) for ks in keys]


def cell_summary(df: pd.DataFrame, latencies: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per measured cell: its mode, means, the 95% CI of decode tok/s, memory, correctness,
    flags. ITL p50/p99 are over the pooled samples of all its repeats (`latencies`, from
    `load_latencies`); without them (a CSV with no JSONL), the mean of the repeats' percentiles."""
    ok = df[df.status == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=[*CELL, "mode"])
    if "batch_size" not in ok.columns:  # files from before batching: one sequence per cell
        ok = ok.assign(batch_size=1, decode_tps_per_seq=ok.decode_tps)
    sources = ok.source if "source" in ok else [""] * len(ok)
    ok = ok.assign(_sample_key=list(zip(ok.cell_id, sources)))
    g = ok.groupby([c for c in CELL if c in ok.columns], dropna=False)  # older files lack newer columns
    out = g.agg(decode_tps=("decode_tps", "mean"), ci_low=("decode_tps_ci95_low", "first"),
                ci_high=("decode_tps_ci95_high", "first"), decode_tps_per_seq=("decode_tps_per_seq", "mean"),
                itl_p50_s=("itl_p50_s", "mean"), itl_p99_s=("itl_p99_s", "mean"), ttft_s=("ttft_s", "mean"),
                prefill_tps=("prefill_tps", "mean"), peak_rss_mb=("peak_rss_bytes", lambda s: s.max() / 1e6),
                roofline_frac=("roofline_frac", "mean"), match_tokens=("match_tokens", "min"),
                kl_vs_reference=("kl_vs_reference", "mean"), top1_agreement=("top1_agreement", "mean"),
                **{c: (c, "mean") for c in (*FIDELITY, "bytes_per_token") if c in ok.columns},  # files from before the corpus lack them
                flags=("flags", lambda s: ";".join(sorted({f for v in s.dropna() for f in str(v).split(";") if f}))),
                repeats=("repeat", "count"),
                _sample_keys=("_sample_key", lambda s: tuple(sorted(set(s))))).reset_index()
    pooled = _pooled_samples(out._sample_keys, latencies)
    for col, q in (("itl_p50_s", 50), ("itl_p99_s", 99)):
        out[col] = [np.percentile(x, q) if x.size else mean for x, mean in zip(pooled, out[col])]
    out.insert(1, "mode", [row_mode(r) for r in out.itertuples()])
    out = out.drop(columns="_sample_keys")
    return out.sort_values(["model", "prompt_tokens", "gen_tokens", "batch_size", "decode_tps"],
                           ascending=[True, True, True, True, False])


def _label(r) -> str:
    return full_mode(r) + (f" batch {r.batch_size}" if r.batch_size > 1 else "")  # cell_summary always has it


def fig_decode(summary: pd.DataFrame):
    import matplotlib.pyplot as plt

    s = summary.sort_values("decode_tps")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(s) + 1.5))
    labels = [f"{_label(r)} p{r.prompt_tokens}/g{r.gen_tokens}" for r in s.itertuples()]
    err = np.vstack([s.decode_tps - s.ci_low.fillna(s.decode_tps), s.ci_high.fillna(s.decode_tps) - s.decode_tps])
    ax.barh(labels, s.decode_tps, xerr=np.clip(err, 0, None), color="tab:blue", capsize=3)
    ax.set_xlabel("decode tokens/s (mean, 95% CI)")
    ax.set_title("Decode throughput")
    fig.tight_layout()
    return fig


def fig_prefill(summary: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, grp in summary.groupby(["framework", "mode", "batch_size"]):
        grp = grp.groupby("prompt_tokens", as_index=False)[["ttft_s", "prefill_tps"]].mean()
        label = " ".join(key[:2]) + (f" batch {key[2]}" if key[2] > 1 else "")
        a1.plot(grp.prompt_tokens, grp.ttft_s * 1e3, marker="o", label=label)
        a2.plot(grp.prompt_tokens, grp.prefill_tps, marker="o", label=label)
    a1.set(xlabel="prompt tokens", ylabel="TTFT (ms)", title="Time to first token")
    a2.set(xlabel="prompt tokens", ylabel="prefill tokens/s", title="Prefill throughput")
    a1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_itl_cdf(latencies: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, grp in latencies.groupby(["framework", "mode"]):
        x = np.sort(grp.itl_s.to_numpy() * 1e3)
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=" ".join(key))
    ax.set(xlabel="inter-token latency (ms)", ylabel="fraction of tokens", title="Per-token latency CDF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_memory(summary: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in summary.itertuples():
        ax.scatter(r.peak_rss_mb, r.decode_tps)
        ax.annotate(_label(r), (r.peak_rss_mb, r.decode_tps), fontsize=7)
    ax.set(xlabel="peak RSS (MB)", ylabel="decode tokens/s", title="Memory against throughput")
    fig.tight_layout()
    return fig


def roofline_by_mode(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean roofline fraction per framework and full mode (tinygrad beam=0 and beam=2 apart)."""
    return summary.groupby(["framework", "mode"], as_index=False).roofline_frac.mean().sort_values("roofline_frac")


def fig_roofline(summary: pd.DataFrame):
    import matplotlib.pyplot as plt

    s = roofline_by_mode(summary)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(s) + 1.5))
    ax.barh([f"{a} {b}" for a, b in zip(s.framework, s["mode"])], s.roofline_frac, color="tab:green")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xlabel="fraction of the host's memory-bandwidth roofline", title="Decode roofline fraction")
    fig.tight_layout()
    return fig


def fig_batch(summary: pd.DataFrame):
    """Aggregate decode tok/s and per-step latency against batch size, one line per framework mode
    and workload; None when the results hold one batch size."""
    import matplotlib.pyplot as plt

    if summary.batch_size.nunique() < 2:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for (framework, mode, p, g), grp in summary.groupby(["framework", "mode", "prompt_tokens", "gen_tokens"]):
        grp = grp.sort_values("batch_size")
        label = f"{framework} {mode} p{p}/g{g}"
        a1.plot(grp.batch_size, grp.decode_tps, marker="o", label=label)
        a2.plot(grp.batch_size, grp.itl_p50_s * 1e3, marker="o", label=label)
    a1.set(xlabel="batch size", ylabel="decode tokens/s, all sequences", title="Throughput against batch size")
    a2.set(xlabel="batch size", ylabel="per-step latency p50 (ms)", title="Step latency against batch size")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
    a1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def size_scaling(summary: pd.DataFrame) -> pd.DataFrame:
    """Per model and framework, its fastest mode's single-sequence decode tok/s and roofline
    fraction, against the model's bytes per decoded token: the fewest any of its rows reads (the
    file's own encoding where a framework runs it natively; routed experts only, KV cache
    included), so every framework's point of one model sits at one x. Empty for one model."""
    if "bytes_per_token" not in summary:  # files from before the column
        return pd.DataFrame()
    s = summary[summary.batch_size == 1].dropna(subset=["bytes_per_token"])
    if s.model.nunique() < 2:
        return pd.DataFrame()
    x = s.groupby("model").bytes_per_token.min() / 1e6
    best = s.sort_values("decode_tps", ascending=False).drop_duplicates(["model", "framework"])
    best = best.assign(mb_per_token=best.model.map(x), model=[Path(str(m)).stem for m in best.model])
    cols = ["model", "mb_per_token", "framework", "mode", "decode_tps", "roofline_frac", "peak_rss_mb"]
    return best[cols].sort_values(["mb_per_token", "framework"]).reset_index(drop=True)


def fig_size_scaling(summary: pd.DataFrame):
    """Decode tok/s and roofline fraction against model bytes per token, one line per framework;
    None when the results hold one model."""
    import matplotlib.pyplot as plt

    t = size_scaling(summary)
    if t.empty:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for framework, grp in t.groupby("framework"):
        a1.plot(grp.mb_per_token, grp.decode_tps, marker="o", label=framework)
        a2.plot(grp.mb_per_token, grp.roofline_frac, marker="o", label=framework)
    a1.set(xlabel="MB read per decoded token", ylabel="decode tokens/s", title="Decode speed against model size",
           xscale="log", yscale="log")
    a2.set(xlabel="MB read per decoded token", ylabel="fraction of the bandwidth roofline",
           title="Roofline fraction against model size", xscale="log")
    a1.legend(fontsize=8)
    fig.tight_layout()
    return fig


FIGURES = {"decode_tps": fig_decode, "prefill_ttft": fig_prefill, "memory_vs_throughput": fig_memory,
           "roofline": fig_roofline, "batch_scaling": fig_batch, "size_scaling": fig_size_scaling}


def correctness_table(summary: pd.DataFrame) -> pd.DataFrame:
    fidelity = [c for c in FIDELITY if c in summary.columns] or ["kl_vs_reference", "top1_agreement"]
    t = summary[["framework", "mode", "prompt_tokens", "gen_tokens", "batch_size", "decode_tps", "match_tokens",
                 *fidelity, "flags"]]
    return t.rename(columns={"match_tokens": "tokens equal to reference"})
