"""MLX's CPU float matmuls run through the host's OpenBLAS (the set-up installs it) unless
`-o blas=bundled` asks for the reference BLAS the Linux wheel ships; each row says which, and the
logits follow the reference either way."""

import json
import subprocess
import sys

from conftest import ROOT, bench, require_backend


def test_mlx_rows_name_their_blas_and_both_follow_the_reference(tiny_f32, tmp_path):
    require_backend("mlx")
    from backends.mlx_blas import default_blas

    assert default_blas() == "openblas", "scripts/setup.sh installs OpenBLAS (libopenblas0-pthread)"
    for blas in ("openblas", "bundled"):
        out = tmp_path / f"{blas}.csv"
        r = bench("run", "-f", "mlx", "-m", str(tiny_f32), "-p", "f32", "-o", f"blas={blas}", "-n", "8", "-r", "1",
                  "-O", str(out))
        assert r.returncode == 0, r.stderr
        row = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[0])
        assert (row["status"], row["extra"]["blas"], row["options"]) == ("ok", blas, {"blas": blas})
        assert row["match_tokens"] == 8 and row["kld_mean"] < 1e-6, row
        # OpenBLAS says how many threads it runs on; the reference BLAS and MLX's own kernels use one
        assert row["threads_used"] >= 1 if blas == "openblas" else row["threads_used"] == 1


def test_one_process_cannot_switch_mlxs_blas():
    code = ("from backends.mlx_blas import import_mlx\n"
            "import_mlx('openblas')\n"
            "import_mlx('bundled')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert r.returncode != 0
    assert "mlx is already loaded in this process with its openblas BLAS; blas=bundled needs a fresh process" in r.stderr
