"""Each framework on a K-quant file's own blocks: the unpacked groups rebuild the gguf package's
dequantization, torch's int4 kernel and MLX's quantized matrices hold those values, and the modes
built on them match the numpy reference on the same file."""

from dataclasses import replace

import numpy as np
import pytest

import backends
from conftest import load_backend, reference_logits, rel_err, require_backend
from engine.errors import UnavailableError
from engine.model.quantize import llama_quantize
from engine.model.spec import ModelSpec
from engine.model.synth import SHAPES, write_synthetic
from engine.results.modes import mode_label
from engine.model.kquant import AFFINE_BITS, affine_groups

PROMPT = [5, 17, 99, 42, 7, 300, 12, 250]
STEPS = 4
NATIVE_TOLERANCE = 6e-2  # as test_backends' for Q4_0/Q4_1: bf16 activations (torch), quantized kernels (MLX)
# rows of 256: K-quant super-blocks fit (the "small" shape's 128 columns get Q5_0 fallbacks)
KQUANT_SHAPE = replace(SHAPES["small"], n_layers=2, dim=256, ffn_dim=512)


@pytest.fixture(scope="module")
def kquant_files(tmp_path_factory):
    where = tmp_path_factory.mktemp("kquant")
    src = write_synthetic(where / "k-f32.gguf", KQUANT_SHAPE, "f32", seed=4)
    return {q: str(llama_quantize(src, where / f"k-{q}.gguf", q, threads=1)) for q in ("q4_k_m", "q5_k_m")}


def matrices(spec, types):
    return [n for n in spec.tensor_names if spec.tensor_type(n) in types and len(spec.raw_tensor(n).shape) == 2]


def groups(spec, name):
    cols, rows = (int(n) for n in spec.raw_tensor(name).shape)
    return affine_groups(spec.raw_tensor(name).data, spec.tensor_type(name), rows, cols)


def gguf_values(spec, name):
    """The gguf package's own dequantization of a tensor, numpy layout (the reference's oracle)."""
    import gguf

    t = spec.raw_tensor(name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))


def test_k_quant_groups_rebuild_the_gguf_dequantization_exactly(kquant_files):
    seen = set()
    for path in kquant_files.values():
        spec = ModelSpec.open(path)
        for name in matrices(spec, AFFINE_BITS):
            g = groups(spec, name)
            assert g.u.max() < 2 ** g.bits
            np.testing.assert_array_equal(g.dequantize(), gguf_values(spec, name), err_msg=name)
            seen.add(spec.tensor_type(name))
        seen |= {spec.tensor_type(n) for n in spec.tensor_names}
    assert {"q4_k", "q5_k", "q6_k"} <= seen  # the files hold real K-quant matrices


def test_the_references_dequantization_is_the_gguf_packages(kquant_files, monkeypatch):
    """Every tensor the reference reads (group-32 types through kquant, the rest through gguf),
    in chunks of a few rows as a large model's are, equals the gguf package's values."""
    from engine.model import dequant

    monkeypatch.setattr(dequant, "CHUNK_BYTES", 4 * 256 * 3)  # three rows a chunk: the chunk edges are exercised
    for path in kquant_files.values():
        spec = ModelSpec.open(path)
        for name in spec.tensor_names:
            np.testing.assert_array_equal(dequant.dequantize(spec.raw_tensor(name), path), gguf_values(spec, name),
                                          err_msg=name)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_simple_block_groups_rebuild_the_gguf_dequantization_exactly(qtype):
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype.upper())
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, kind)
    np.testing.assert_array_equal(affine_groups(raw, qtype, 6, 128).dequantize(), gguf.quants.dequantize(raw, kind))


def torch_matrix(weight, cols):
    """A torch PackedWeight's values, read back through its own kernel (x = identity, in bf16)."""
    import torch

    return weight.matmul(torch.eye(cols)).T.numpy()


def test_torch_int4_kernel_holds_the_files_values(kquant_files):
    """Q4_K matrices as int4 weights: the kernel's products give back the file's values to the bf16
    rounding of scales, zeros and outputs (a wrong nibble order, sign or zero point is off by the
    weights' own size); Q6_K under rest=bf16 as bf16 weights."""
    from backends.torch_quant import Bf16Weight, Int4Weight, native_matrix

    require_backend("torch")
    spec = ModelSpec.open(kquant_files["q4_k_m"])
    assert matrices(spec, ("q4_k",)) and matrices(spec, ("q6_k",))
    for name in matrices(spec, ("q4_k",))[:4]:
        w = native_matrix(spec, name, "bf16")
        want = spec.hf_tensor(name)
        assert isinstance(w, Int4Weight)
        assert np.abs(torch_matrix(w, want.shape[1]) - want).max() < 1e-2 * np.abs(want).max(), name
    assert all(isinstance(native_matrix(spec, n, "bf16"), Bf16Weight) for n in matrices(spec, ("q6_k",)))


def test_mlx_quantized_matrices_hold_the_files_values_exactly(kquant_files):
    require_backend("mlx")
    from backends.mlx_blas import import_mlx
    from backends.mlx_llama import pack_bits

    mx = import_mlx()

    for path in kquant_files.values():
        spec = ModelSpec.open(path)
        for name in matrices(spec, AFFINE_BITS):
            g = groups(spec, name)
            got = mx.dequantize(mx.array(pack_bits(g.u, g.bits)), mx.array(g.scale), mx.array(g.bias),
                                group_size=32, bits=g.bits)
            np.testing.assert_array_equal(np.array(got), spec.tensor(name), err_msg=name)


def kquant_cases():
    """(framework, file, options) for every K-quant mode torch and MLX declare."""
    file = type("File", (), {"file_type": "q4_k_m", "config": type("Config", (), {"n_experts": 0})})  # a dense file
    return [(name, q, dict(m.options)) for name in ("torch", "mlx") for q in ("q4_k_m", "q5_k_m")
            for m in backends.get(name).modes(file, "cpu") if m.precision == "q4_k_m"]


@pytest.mark.parametrize("name,qtype,options", kquant_cases())
def test_k_quant_modes_match_reference_on_the_same_file(kquant_files, name, qtype, options):
    require_backend(name)
    path = kquant_files[qtype]
    ref = reference_logits(path, PROMPT, STEPS)
    b = load_backend(name, path, qtype, options=options)
    got = [b.prefill(PROMPT)] + [b.decode(int(np.argmax(r))) for r in ref[:-1]]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert rel_err(g, r) < NATIVE_TOLERANCE, f"step {i}: rel err {rel_err(g, r):.2e}"
        assert np.argmax(g) == np.argmax(r), f"step {i}: another greedy token"
    b.close()


def test_k_quant_modes_are_offered_and_labelled(kquant_files):
    spec = ModelSpec.open(kquant_files["q4_k_m"])
    labels = {n: [mode_label(m.precision, "", dict(m.options)) for m in backends.get(n).modes(spec, "cpu")]
              for n in ("torch", "mlx")}
    assert {"q4_k_m rest=f32", "q4_k_m rest=bf16"} <= set(labels["torch"])
    assert {"q4_k_m q6_k=f32", "q4_k_m q6_k=q8"} <= set(labels["mlx"])


def test_torch_k_quant_load_runs_int4_and_counts_its_matrices(kquant_files):
    require_backend("torch")
    import torch
    from backends.torch_quant import FileRows

    spec = ModelSpec.open(kquant_files["q4_k_m"])
    opened = backends.open_backend("torch", spec, "q4_k_m", options={"rest": "bf16"})
    details = opened.info.details
    assert details["rest"] == "bf16" and details["int4_matrices"] > 0 and details["bf16_matrices"] > 0
    table = opened.backend.weights.tok_embd  # the head has its own bf16 copy: lookups read the file's rows
    assert isinstance(table, FileRows)
    ids = torch.tensor([[3, 511, 3], [0, 7, 100]])
    np.testing.assert_array_equal(table.lookup(ids).numpy(), spec.tensor("token_embd.weight")[ids.numpy()])
    assert opened.info.weight_bytes < 0.5 * sum(int(np.prod(spec.raw_tensor(n).shape)) * 4 for n in spec.tensor_names)
    with pytest.raises(UnavailableError, match="option rest applies"):
        backends.open_backend("torch", spec, "f32", options={"rest": "bf16"})


def test_best_modes_of_torch_and_mlx_on_a_k_quant_file_make_their_cells(kquant_files):
    """`--modes best -f torch -f mlx`: every K-quant mode becomes a cell whose options its own
    framework accepts (the sweep types each cell's options against every framework of the run)."""
    from engine.measure.cell import Cell
    from engine.model.spec import open_spec
    from engine.sweep.best import with_modes
    from engine.sweep.cells import apply_options

    path = kquant_files["q4_k_m"]
    cells = apply_options(with_modes([Cell("torch", path), Cell("mlx", path)], open_spec), backends.parse_options)
    modes = {(c.framework, mode_label(c.precision, "", dict(c.options))) for c in cells}
    assert {("torch", "q4_k_m rest=bf16"), ("torch", "q4_k_m rest=f32"), ("mlx", "q4_k_m q6_k=q8")} <= modes


def resident_file_bytes(path) -> int:
    """This process's resident bytes of `path`'s mappings (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_a_native_load_leaves_no_packed_matrix_in_the_resident_set(kquant_files, tmp_path, framework):
    """The packed matrices are copies (int4 nibbles, MLX groups): their file pages must leave the
    process's resident set, as a dequantized tensor's do, or every row's peak memory counts the file
    twice (8B Q4_K_M under torch: 13.8 GB peak against a 10.8 GB estimate)."""
    import shutil

    require_backend(framework)
    path = shutil.copy(kquant_files["q4_k_m"], tmp_path / "own.gguf")  # a file no other test has mapped
    spec = ModelSpec.open(path)
    packed = sum(spec.raw_tensor(n).n_bytes for n in matrices(spec, ("q4_k",)))
    header = resident_file_bytes(path)  # an opened file: its metadata (the vocabulary) is read
    backend = load_backend(framework, path, precision="q4_k_m")  # its own map of the file
    assert backend is not None and packed > 256 * 1024
    assert resident_file_bytes(path) - 2 * header < 0.1 * packed
