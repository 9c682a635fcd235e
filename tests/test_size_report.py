"""`bench report` over results of several model sizes: the size-scaling figure and its table, each
framework's fastest mode per model against the bytes a decoded token reads."""

import pandas as pd
import pytest

from conftest import bench
from engine.model.synth import write_synthetic


@pytest.fixture(scope="module")
def sizes_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes")
    models = [str(write_synthetic(d / f"{s}-q8_0.gguf", s, "q8_0", seed=1)) for s in ("tiny", "small")]
    out = d / "sizes.csv"
    r = bench("run", "-f", "numpy", "-f", "llamacpp", "-m", models[0], "-m", models[1], "--prompt-tokens", "8",
              "-n", "4", "-r", "2", "-O", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _table(md: str) -> pd.DataFrame:
    lines = md.split("## Decode against model size")[1].split("\n## ")[0].strip().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return pd.DataFrame(rows[2:], columns=rows[0])


def test_report_draws_speed_against_model_size(sizes_csv, tmp_path):
    r = bench("report", str(sizes_csv), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    png = tmp_path / "size_scaling.png"
    assert png.exists() and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    table = _table((tmp_path / "report.md").read_text())
    df = pd.read_csv(sizes_csv)
    assert len(table) == 4 and set(table.framework) == {"numpy", "llamacpp"}
    assert list(table.model) == ["tiny-q8_0"] * 2 + ["small-q8_0"] * 2  # ordered by bytes per token
    for row in table.itertuples():
        cell = df[(df.framework == row.framework) & df.model.str.endswith(row.model + ".gguf")]
        assert float(row.decode_tps) == pytest.approx(cell.decode_tps.mean(), rel=6e-3, abs=0.5)
        # every framework at the model's fewest bytes: llama.cpp's Q8_0 blocks, not numpy's f32 copy
        native = df[(df.framework == "llamacpp") & df.model.str.endswith(row.model + ".gguf")]
        assert float(row.mb_per_token) == pytest.approx(native.bytes_per_token.mean() / 1e6, rel=6e-3)


def test_one_model_draws_no_size_figure(sizes_csv, tmp_path):
    df = pd.read_csv(sizes_csv)
    one = tmp_path / "one.csv"
    df[df.model == df.model.iloc[0]].to_csv(one, index=False)
    r = bench("report", str(one), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "rep" / "size_scaling.png").exists()
    assert "## Decode against model size" not in (tmp_path / "rep" / "report.md").read_text()


def test_moe_rows_count_the_routed_experts_bytes(arch_models, tmp_path):
    """bytes_per_token and the roofline of a mixture of experts: 2 of its 4 experts a token, not the file."""
    from engine.model.spec import ModelSpec

    path = arch_models["qwen3moe"]
    spec, out = ModelSpec.open(path), tmp_path / "moe.csv"
    r = bench("run", "-f", "llamacpp", "-m", path, "--prompt-tokens", "8", "-n", "4", "-r", "1", "-O", str(out))
    assert r.returncode == 0, r.stderr
    row = pd.read_csv(out).iloc[0]
    experts = sum(spec.file_bytes(n) for n in spec.tensor_names if n.endswith("_exps.weight"))
    whole = sum(spec.file_bytes(n) for n in spec.tensor_names) + spec.file_bytes("token_embd.weight")  # tied head
    kv = spec.config.kv_bytes_per_token(2) * (8 + 4 / 2)  # llama.cpp's f16 cache at the mean decode depth
    assert row.bytes_per_token < whole - experts // 3
    assert row.bytes_per_token == pytest.approx(spec.decode_read_bytes(spec.file_bytes) + kv, rel=1e-9)
    assert row.roofline_frac == pytest.approx(row.bytes_per_token * row.decode_tps / 1e9 / row.host_gbps, rel=1e-6)
