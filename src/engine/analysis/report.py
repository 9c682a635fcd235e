"""`bench report RESULTS.csv... --out DIR`: PNG figures and a markdown summary."""

from __future__ import annotations

from pathlib import Path

from engine.errors import InputError
from engine.results.modes import row_mode
from engine.results.writers import markdown_table


def _markdown_table(df) -> str:
    return markdown_table(list(df.columns), ([_cell(v) for v in row] for row in df.itertuples(index=False)))


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


WINNER_RULE = ("The fastest mode of any framework passing the fidelity bar, by median decode tok/s; `best` only "
               "where its 95% CI against the runner-up excludes 1, else `tied` with every mode it cannot be told "
               "from (the rule of `--modes best`, engine.measure.decide).")


def winners(df):
    """Per workload (and node), the decision among every framework's modes."""
    import pandas as pd

    from engine.measure.decide import decide
    from engine.measure.stats import ratio_text

    out = []
    for d in decide(df.to_dict("records"), across_frameworks=True):
        model, device, prompt, gen, batch, _, _, node = d.key
        vs = ratio_text(d.ratio.ratio, d.ratio.low, d.ratio.high, d.runner_up.label) if d.ratio else "-"
        verdict = {"best": "best", "none": "no mode passes the bar"}.get(d.verdict) or \
            "tied: " + ", ".join(c.label for c in d.tied)
        out.append({"model": model, "device": device, "prompt_tokens": prompt, "gen_tokens": gen,
                    "batch_size": batch, "node": node, "winner": d.top.label if d.top else "-",
                    "decode_tps_median": d.top.median if d.top else float("nan"), "verdict": verdict,
                    "vs runner-up (95% CI)": vs})
    return pd.DataFrame(out).sort_values(["model", "prompt_tokens", "gen_tokens", "batch_size", "node"])


def write_report(paths: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.analysis.frames import (FIGURES, cell_summary, correctness_table, fig_itl_cdf, load_latencies,
                                        load_results, size_scaling)

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise InputError(f"results file not found: {missing[0]}")
    try:
        df = load_results(paths)
    except Exception as e:
        raise InputError(f"cannot read results: {e}") from e
    if "status" not in df.columns:
        raise InputError(f"{paths[0]}: not a bench results CSV (no status column)")
    out.mkdir(parents=True, exist_ok=True)
    if "level_id" in df.columns:  # `bench serve` results
        if "cell_id" in df.columns:
            raise InputError("report `bench serve` results and `bench run` results separately")
        from engine.analysis.serving import write_serving_report

        return write_serving_report(df, paths, out, _markdown_table)
    lat = load_latencies(paths)
    summary = cell_summary(df, lat)
    figures = []
    if not summary.empty:
        for name, make in FIGURES.items():
            fig = make(summary)
            if fig is None:  # nothing to draw for these results (one batch size)
                continue
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
            figures.append(name)
        if not lat.empty:
            fig = fig_itl_cdf(lat)
            fig.savefig(out / "itl_cdf.png", dpi=110)
            plt.close(fig)
            figures.append("itl_cdf")
    md = [f"# Benchmark report\n\nSources: {', '.join(paths)}  \nRows: {len(df)}, cells: {df.cell_id.nunique()}, "
          f"failed cells: {df[df.status != 'ok'].cell_id.nunique()}\n"]
    if not summary.empty:
        host = df.host.dropna().unique().tolist()
        md.append(f"Host: {', '.join(map(str, host))}; memory bandwidth {df.host_gbps.dropna().mean():.1f} GB/s\n")
        md.append("## Cells\n\n" + _markdown_table(summary.round(4)) + "\n")
        md.append("## Winner per workload (decode tokens/s)\n\n" + WINNER_RULE + "\n\n"
                  + _markdown_table(winners(df)) + "\n")
        md.append("## Correctness against the reference\n\n" + _markdown_table(correctness_table(summary)) + "\n")
        sizes = size_scaling(summary)
        if not sizes.empty:
            md.append("## Decode against model size\n\nEach framework's fastest mode, one sequence, against the "
                      "model's MB per decoded token (the fewest any framework reads: weights routed to, "
                      "KV cache; roofline_frac uses each framework's own bytes).\n\n"
                      + _markdown_table(sizes.round(4)) + "\n")
    flagged = df[(df.status != "ok") | df["flags"].fillna("").astype(bool)].drop_duplicates("cell_id")
    flagged = flagged.assign(mode=[row_mode(r) for r in flagged.itertuples()])
    md.append("## Flagged cells\n")
    md.append(_markdown_table(flagged[["framework", "mode", "prompt_tokens", "gen_tokens",
                                       *(["batch_size"] if "batch_size" in flagged else []), "status", "flags", "error"]]
                              .fillna("")) if len(flagged) else "None.")
    md.append("\n## Figures\n\n" + "\n".join(f"![{f}]({f}.png)" for f in figures) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
