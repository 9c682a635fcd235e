"""`bench report` on `bench serve` results: latency against throughput per server, and a table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

LEVEL = ["server", "model", "prompt_tokens", "gen_tokens", "profile", "concurrency", "rate_rps"]
METRICS = (("ttft_p50_s", "TTFT p50"), ("tpot_p50_s", "TPOT p50"), ("e2el_p50_s", "E2E latency p50"))


def level_summary(df: pd.DataFrame) -> pd.DataFrame:
    """The ok levels; a --find-max result row repeats its best level, so it is left out."""
    result = df["flags"].astype(str).str.contains("find_max") if "flags" in df.columns else pd.Series(False, df.index)
    ok = df[(df.status == "ok") & ~result]
    cols = [*LEVEL, "requests_ok", "requests_failed", "requests_not_sent", "request_throughput_rps", "output_tps",
            "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "itl_p50_s", "e2el_p50_s", "goodput_rps", "match_tokens", "startup_s"]
    return ok[[c for c in cols if c in ok.columns]].sort_values(["server", "profile", "concurrency", "rate_rps"])


def fig_latency_vs_throughput(summary: pd.DataFrame):
    """One panel per latency metric: each server's levels as a line, output tok/s on x."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for (server, profile), grp in summary.groupby(["server", "profile"]):
        grp = grp.sort_values("output_tps")
        for ax, (col, _) in zip(axes, METRICS):
            ax.plot(grp.output_tps, grp[col] * 1e3, marker="o", label=f"{server} ({profile})")
            for r in grp.itertuples():
                level = f"c{r.concurrency}" if profile == "concurrency" else f"{r.rate_rps:g}/s"
                ax.annotate(level, (r.output_tps, getattr(r, col) * 1e3), fontsize=7)
    for ax, (_, title) in zip(axes, METRICS):
        ax.set(xlabel="output tokens/s", ylabel=f"{title} (ms)", title=f"{title} against throughput", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_serving_report(df: pd.DataFrame, paths: list[str], out: Path, table) -> Path:
    import matplotlib.pyplot as plt

    summary = level_summary(df)
    md = [f"# Serving report\n\nSources: {', '.join(paths)}  \nRows: {len(df)}, servers: {df.server.nunique()}, "
          f"failed levels: {int((df.status != 'ok').sum())}\n"]
    if not summary.empty:
        fig = fig_latency_vs_throughput(summary)
        fig.savefig(out / "latency_vs_throughput.png", dpi=110)
        plt.close(fig)
        md.append("## Levels\n\n" + table(summary.round(4)) + "\n")
        md.append("![latency against throughput](latency_vs_throughput.png)\n")
    failed = df[df.status != "ok"]
    md.append("## Failed levels\n\n" + (table(failed[["server", "profile", "concurrency", "status", "error"]].fillna(""))
                                       if len(failed) else "None.") + "\n")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
