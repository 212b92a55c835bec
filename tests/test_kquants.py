"""GGML block types in MLX (`mlxq.kernels.kquants`): dequantization bit-exact with gguf-py on random blocks and edge
cases, the exact MLX-affine form of the types that have one, and the block matmuls against plain float math."""

from __future__ import annotations

import subprocess
import sys

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxq.kernels import kquants

# byte offsets of each type's float16 scales inside a block (random bytes there would be NaN or inf)
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
          "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "TQ1_0": [52], "TQ2_0": [64], "IQ4_NL": [0], "IQ4_XS": [0],
          "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0], "IQ3_XXS": [0], "IQ3_S": [0], "IQ1_S": [0], "IQ1_M": []}
EDGE_SCALES = np.array([0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8, 1e-5, 1.0], np.float16)  # +-max, denormals


def random_blocks(kind: str, rows: int = 16, blocks_per_row: int = 4, seed: int = 0) -> np.ndarray:
    """Random bytes with finite float16 scales: the first rows' scales are edge cases (zero, +-max, denormal),
    and one row is all-zero bytes."""
    rng = np.random.default_rng(seed)
    elems, size = kquants.BLOCK_SIZES[kind]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * size), dtype=np.uint8)
    b = raw.reshape(-1, size)
    for at in F16_AT[kind]:
        scales = rng.normal(size=b.shape[0]).astype(np.float16)
        scales[: len(EDGE_SCALES)] = EDGE_SCALES
        b[:, at : at + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw[-1] = 0
    return raw


@pytest.mark.parametrize("kind", sorted(kquants.BLOCK_SIZES))
def test_dequantize_is_bit_exact_with_gguf_py(kind):
    raw = random_blocks(kind)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    got = np.array(kquants.dequantize(mx.array(raw), kind))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # NaN where gguf-py has NaN (IQ1_M's scale is spread over bytes)


def test_iq4_values_are_ggmls_table_at_every_code():
    """IQ4_NL / IQ4_XS values come from a rounded quartic, not a lookup: all 16 codes equal ggml's kvalues_iq4nl."""
    from gguf.quants import IQ4_NL

    assert np.array(kquants._iq4(mx.arange(16, dtype=mx.uint8))).tolist() == list(IQ4_NL.kvalues)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"])
def test_dequantize_of_quantized_data_with_an_outlier(kind):
    """Real codes from gguf-py's quantizer: normal weights, one huge outlier, an all-zero row."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 512)).astype(np.float32)
    w[3, 17] = 3e4
    w[5] = 0.0
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)
    np.testing.assert_array_equal(np.array(kquants.dequantize(mx.array(raw), kind)), gguf.quants.dequantize(raw, qtype))


LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@pytest.mark.parametrize("kind", sorted(kquants.AFFINE_BITS))
def test_affine_form_is_exact(kind):
    """Q4_K and Q5_K as 4/5-bit groups of 32, the legacy types likewise: MLX's own dequantization of the converted
    weight (scales and biases promoted to float32, as its quantized matmul does with a float32 input) equals
    gguf-py's of the blocks, bit for bit. The legacy types' scales and biases come as float16 (their scales are
    stored so), the K-quants' as float32 (a float16 times a 6-bit integer)."""
    raw = random_blocks(kind, rows=12)  # rows 0 and 1 hold the edge-case scales (+-65504 among them)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    bits = kquants.AFFINE_BITS[kind]
    for rows, half_biases in ((slice(2, None), kind in LEGACY),
                              # -8, -16 or -128 times 65504 overflows float16: those biases stay float32
                              (slice(None), kind in ("Q4_1", "Q5_1"))):
        weight, scales, biases = kquants.to_affine(mx.array(raw[rows]), kind, rows_per_step=5)  # several steps
        assert scales.dtype == (mx.float16 if kind in LEGACY else mx.float32)
        assert biases.dtype == (mx.float16 if half_biases else mx.float32)
        got = mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                            group_size=kquants.AFFINE_GROUP, bits=bits)
        np.testing.assert_array_equal(np.array(got), want[rows])


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q6_K", "IQ4_XS", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 7])  # GEMV (decode) and GEMM (prefill)
def test_matmul_on_blocks(kind, rows):
    raw = mx.array(random_blocks(kind, rows=24, blocks_per_row=2, seed=3)[:-1])  # no all-zero row here
    w = kquants.dequantize(raw, kind)
    x = mx.random.normal((2, rows, w.shape[1]), key=mx.random.key(0))
    got = kquants.matmul(x, raw, kind)
    want = np.einsum("bri,oi->bro", np.array(x, np.float64), np.array(w, np.float64))
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["Q3_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("rows", [1, kquants.DEQUANTIZE_FROM_ROWS])  # decode, prompt
def test_products_dequantize_a_slice_of_rows_at_a_time(kind, rows, monkeypatch):
    """Off Metal, a one-row product and a prompt's go through the weight a slice of 64 rows at a time (here: 200 rows
    in four slices, the last one short); the float weight they use is the whole one's, bit for bit (an identity
    input gives W^T back: one product by 1 per output, exact), and the product is the float one."""
    monkeypatch.setattr(kquants, "SLICE_BYTES", 1)  # the smallest slice: 64 rows
    raw = mx.array(random_blocks(kind, rows=201, blocks_per_row=1, seed=5)[:-1])
    w = kquants.dequantize(raw, kind)
    cols = w.shape[1]
    eye = mx.eye(cols)
    np.testing.assert_array_equal(np.array(kquants.matmul(eye, raw, kind)), np.array(w).T)
    for r in range(cols if rows == 1 else 0):  # one row at a time: each row of the identity gives a column of W^T
        if r % 37 == 0:
            np.testing.assert_array_equal(np.array(kquants.matmul(eye[r], raw, kind)), np.array(w)[:, r])
    x = mx.random.normal((rows, cols), key=mx.random.key(7))
    want = np.array(x, np.float64) @ np.array(w, np.float64).T
    np.testing.assert_allclose(np.array(kquants.matmul(x, raw, kind)), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# Four 2048 x 2048 layers (16 MB each as float32), two in Q5_0's MLX affine form, two in Q6_K blocks, run lazily on a
# prompt and on one row; prints MLX's peak of allocated memory above the model and input, in MB, for each
_CHAIN = """
import sys
import mlx.core as mx
import numpy as np
from mlxq.kernels import kquants
from mlxq.models.layers import BlockLinear, QuantizedLinear

rng = np.random.default_rng(0)
layers = []
for kind in ("Q5_0", "Q6_K", "Q5_0", "Q6_K"):
    elems, size = kquants.BLOCK_SIZES[kind]
    raw = rng.integers(0, 256, (2048, 2048 // elems * size), dtype=np.uint8)
    at = 0 if kind == "Q5_0" else 208
    per_row = raw.reshape(-1, size)
    per_row[:, at : at + 2] = np.full((per_row.shape[0], 1), 0.001, np.float16).view(np.uint8)
    if kind == "Q5_0":
        layer = QuantizedLinear(2048, 2048, bias=False, group_size=32, bits=5)
        layer.weight, layer.scales, layer.biases = kquants.to_affine(mx.array(raw), kind)
    else:
        layer = BlockLinear(2048, 2048, kind)
        layer.weight = mx.array(raw)
    layers.append(layer)
mx.eval([layer.parameters() for layer in layers])
mx.set_cache_limit(0)  # the peak counts what is allocated, not what MLX keeps for reuse
for rows in (32, 1):
    x = mx.random.normal((1, rows, 2048), key=mx.random.key(rows))
    mx.eval(x)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    for layer in layers:
        x = layer(x)
    mx.eval(x)
    print(rows, (mx.get_peak_memory() - base) / 2**20)
"""


def test_products_hold_one_slice_of_float_weight_at_once():
    """A lazy chain of layers (as a model's forward is built) holds about one slice of float weight while it
    computes (`SLICE_BYTES`, 432 KB; Q6_K's unpacking a few times that), not a layer's 16 MB, nor several layers' as
    MLX allocates ahead; measured in a child process (MLX's peak is the process's)."""
    if mx.metal.is_available():
        pytest.skip("the sliced path is the CPU reference's")
    out = subprocess.run([sys.executable, "-c", _CHAIN], check=True, timeout=300, capture_output=True, text=True)
    peaks = {int(rows): float(mb) for rows, mb in (line.split() for line in out.stdout.split("\n") if line)}
    print(peaks)
    assert peaks[32] < 6 and peaks[1] < 6, f"MLX's peak above the model, MB, by rows: {peaks}"


def test_a_prompts_slices_of_smollm2s_layers_have_one_size_and_reuse_one_buffer(monkeypatch):
    """Off Metal, every slice of float weight a prompt's products make of SmolLM2's layers (576 and 1536 weights
    wide; 192, 576 and 1536 rows) is `SLICE_BYTES` or half of it, the last ones too. MLX's CPU cache reuses a freed
    buffer only for a size within two pages of its own: the layers after the first (which makes both sizes) reuse
    what it left, and MLX's cache grows by their small outputs only, not by other sets of slice buffers."""
    if mx.metal.is_available():
        pytest.skip("the sliced path is the CPU reference's")
    layers = [(rows, mx.array(random_blocks("Q8_0", rows=rows, blocks_per_row=width // 32, seed=rows + width)))
              for rows, width in ((576, 576), (1536, 576), (576, 1536), (192, 576))]
    xs = {width: mx.random.normal((26, width), key=mx.random.key(width)) for width in (576, 1536)}
    mx.eval([raw for _, raw in layers], xs)
    made = []
    dequantize = kquants.dequantize

    def note_slice(blocks, kind, dtype=mx.float32, **options):
        out = dequantize(blocks, kind, dtype, **options)
        made.append(out.nbytes)
        return out

    monkeypatch.setattr(kquants, "dequantize", note_slice)
    limit = mx.set_cache_limit(1 << 30)  # process-wide: an earlier test's expert pool may hold it near 0
    try:
        mx.clear_cache()
        cached = []
        for _, raw in layers:
            mx.eval(kquants.matmul(xs[raw.shape[1] // 34 * 32], raw, "Q8_0"))
            cached.append(mx.get_cache_memory())
    finally:
        mx.set_cache_limit(limit)
    # what the later layers add: their slices' outputs (26 x 144 to 26 x 384 float32, 15-40 KB each)
    assert cached[-1] - cached[0] < kquants.SLICE_BYTES // 2, cached
    assert sorted(made) == [kquants.SLICE_BYTES // 2] * 2 + [kquants.SLICE_BYTES] * 9


def quantized_linear_from(kind: str, rows: int, seed: int = 6):
    """A QuantizedLinear holding GGUF blocks of an affine type in MLX's form (`to_affine`), with its blocks."""
    from mlxq.models.layers import QuantizedLinear

    raw = mx.array(random_blocks(kind, rows=rows + len(EDGE_SCALES) + 1, blocks_per_row=8, seed=seed)
                   [len(EDGE_SCALES) : -1])  # no edge-case scales: +-max times -16 overflows float16
    weight, scales, biases = kquants.to_affine(raw, kind)
    layer = QuantizedLinear(256, rows, bias=False, group_size=32, bits=kquants.AFFINE_BITS[kind])
    layer.weight, layer.scales, layer.biases = weight, scales, biases
    return layer, raw


def test_prompt_products_of_affine_layers_use_the_whole_float_weight(monkeypatch):
    monkeypatch.setattr(kquants, "SLICE_BYTES", 1)
    layer, raw = quantized_linear_from("Q5_0", rows=200)
    np.testing.assert_array_equal(np.array(layer(mx.eye(256))), np.array(kquants.dequantize(raw, "Q5_0")).T)


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q8_0"])
@pytest.mark.parametrize("sliced", [False, True])  # True: a few rows' products make biases 64 rows at a time
def test_biases_made_from_the_scales_are_dropped_and_made_again_exactly(kind, sliced, monkeypatch):
    """The legacy types' biases are -2^(bits-1) times their scales: held no more (off Metal), made per product, and
    every output (decode, prompt, an embedding's lookup and its use as the output head) is bit for bit the same."""
    import mlx.nn as nn

    from mlxq.models.layers import QuantizedEmbedding, drop_derived_biases

    if sliced:
        monkeypatch.setattr(kquants, "SLICE_BYTES", 1)  # the smallest slice: 64 of the 96 rows

    layer, _ = quantized_linear_from(kind, rows=96)
    table = QuantizedEmbedding(96, 256, group_size=32, bits=layer.bits)
    table.weight, table.scales, table.biases = layer.weight, layer.scales, layer.biases
    net = nn.Module()
    net.layer, net.table = layer, table
    ids = mx.array([[3, 95, 0, 3]])
    xs = [mx.random.normal((rows, 256), key=mx.random.key(rows)) for rows in (1, 3, 2 * kquants.DEQUANTIZE_FROM_ROWS)]

    def outputs():
        return [layer(x) for x in xs] + [table.as_linear(x) for x in xs] + [table(ids)]

    before = outputs()
    held = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    drop_derived_biases(net)
    if mx.metal.is_available():  # an inference-only CPU layout
        return
    assert "biases" not in layer and "biases" not in table
    assert sum(v.nbytes for _, v in tree_flatten(net.parameters())) == held - 2 * layer.scales.nbytes
    for got, want in zip(outputs(), before, strict=True):
        np.testing.assert_array_equal(np.array(got), np.array(want))


def test_a_wide_heads_biases_are_made_a_slice_of_rows_at_a_time(monkeypatch):
    """Decoding through a wide layer whose biases were dropped (a tied Q8_0 output head: SmolLM2's biases would be
    3.4 MB of float32 at every token) makes one slice of rows' biases at a time, not the whole layer's."""
    from mlxq.models.layers import QuantizedEmbedding, drop_derived_biases

    layer, _ = quantized_linear_from("Q8_0", rows=16384)
    table = QuantizedEmbedding(16384, 256, group_size=32, bits=8)
    table.weight, table.scales, table.biases = layer.weight, layer.scales, layer.biases
    whole_biases = table.biases.astype(mx.float32).nbytes  # 512 KB
    drop_derived_biases(table)
    if mx.metal.is_available():  # an inference-only CPU layout
        return
    monkeypatch.setattr(kquants, "SLICE_BYTES", 16 << 10)  # 512 rows: 32 slices
    x = mx.random.normal((1, 256), key=mx.random.key(1))
    mx.eval(x, table.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(table.as_linear(x))
    assert mx.get_peak_memory() - before < whole_biases // 2  # ~150 KB: the output twice, one slice's biases


def test_dropping_derived_biases_checks_a_few_layers_at_a_time(monkeypatch):
    """The check's float32 copies of scales and biases are made a group of layers (`SLICE_BYTES` of float32 scales)
    at a time, dropping as it goes: the load's peak holds one group's, not every layer's (7 MB for SmolLM2)."""
    import mlx.nn as nn

    from mlxq.models.layers import drop_derived_biases

    net = nn.Module()
    net.layers = [quantized_linear_from("Q8_0", rows=2048, seed=i)[0] for i in range(8)]
    monkeypatch.setattr(kquants, "SLICE_BYTES", 4 * net.layers[0].scales.size)  # one layer per group: 64 KB
    mx.eval(net.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    drop_derived_biases(net)
    if mx.metal.is_available():  # an inference-only CPU layout
        return
    assert all("biases" not in layer for layer in net.layers)
    assert mx.get_peak_memory() - before < 3 * 4 * net.layers[0].scales.size  # all 8 at once: 16 times that


def test_biases_of_their_own_are_kept():
    """Q4_1's and Q4_K's biases are minimums of their own, and a bias that overflowed float16 stays float32."""
    from mlxq.models.layers import drop_derived_biases

    for kind in ("Q4_1", "Q4_K"):
        layer, _ = quantized_linear_from(kind, rows=64)
        drop_derived_biases(layer)
        assert "biases" in layer
    raw = mx.array(random_blocks("Q5_0", rows=16, blocks_per_row=8))  # 65504 * -16 overflows float16
    layer, _ = quantized_linear_from("Q5_0", rows=16)
    layer.weight, layer.scales, layer.biases = kquants.to_affine(raw, "Q5_0")
    assert layer.biases.dtype == mx.float32
    drop_derived_biases(layer)
    assert "biases" in layer


@pytest.mark.parametrize("tokens", [1, 40])  # a few (token, expert) pairs; more pairs than experts
def test_gather_matmul_on_blocks(tokens):
    kind, experts = "Q6_K", 6
    raw = mx.array(random_blocks(kind, rows=experts * 8, blocks_per_row=1, seed=4)).reshape(experts, 8, -1)
    w = kquants.dequantize(raw, kind)  # [experts, 8, 256]
    x = mx.random.normal((tokens, 1, 1, 256), key=mx.random.key(1))
    idx = mx.random.randint(0, experts, (tokens, 2), key=mx.random.key(2))
    got = kquants.gather_matmul(x, raw, kind, idx)
    want = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx)
    assert got.shape == want.shape == (tokens, 2, 1, 8)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-3)


def test_take_rows_dequantizes_only_those_rows():
    raw = mx.array(random_blocks("Q3_K", rows=10, blocks_per_row=1))
    ids = mx.array([[3, 0], [9, 3]])
    np.testing.assert_array_equal(np.array(kquants.take_rows(raw, "Q3_K", ids)),
                                  np.array(kquants.dequantize(raw, "Q3_K"))[np.array(ids)])


def test_pack_codes_is_mlx_layout():
    rng = np.random.default_rng(5)
    for bits in (2, 3, 4, 5, 6, 8):
        codes = rng.integers(0, 1 << bits, size=(3, 64)).astype(np.uint8)
        packed = kquants.pack_codes(mx.array(codes), bits)
        ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
        np.testing.assert_array_equal(np.array(mx.dequantize(packed, ones, zeros, group_size=32, bits=bits)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_affine_dequantize_is_mlx_dequantize(bits):
    w = mx.random.normal((48, 256), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, 32, bits)
    assert mx.array_equal(kquants.unpack_codes(kquants.pack_codes(kquants.unpack_codes(packed, bits), bits), bits),
                          kquants.unpack_codes(packed, bits))
    np.testing.assert_array_equal(np.array(kquants.affine_dequantize(packed, scales, biases, 32, bits)),
                                  np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits)))


def test_quantized_layers_prompt_path_matches_the_quantized_matmul():
    """Off Metal, a prompt's rows go through dequantize + one matmul; decode rows through MLX's quantized matmul;
    both compute what nn.QuantizedLinear computes."""
    import mlx.nn as nn

    from mlxq.models.layers import DEQUANTIZE_FROM_ROWS, Embedding, Linear

    linear = Linear(256, 96, bias=True)
    ours, theirs = linear.to_quantized(32, 5), nn.QuantizedLinear.from_linear(linear, 32, 5)
    table = Embedding(96, 256)
    head, plain_head = table.to_quantized(32, 4), nn.QuantizedEmbedding.from_embedding(table, 32, 4)
    for rows in (1, DEQUANTIZE_FROM_ROWS, 3 * DEQUANTIZE_FROM_ROWS):
        x = mx.random.normal((rows, 256), key=mx.random.key(rows))
        np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(head.as_linear(x)), np.array(plain_head.as_linear(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(kquants.BIAS_PER_SCALE))
def test_biases_from_scales_holds_exactly_when_the_biases_survive_float16_and_equal_the_scales_times_the_factor(
        kind):
    """The scales-only check that a zero-point type's biases are derived (`_biases_from_scales`) agrees with what a
    load checks on the biases themselves (float32 products: float16 round trip and equality with scales times the
    factor) at the float16 values around the limit, for infinities, NaN, negative and subnormal scales."""
    factor = kquants.BIAS_PER_SCALE[kind]
    limit = 2.0**16 / -factor
    below = float(np.nextafter(np.float16(limit), np.float16(0)))
    cases = [[below, 1.0], [limit, 1.0], [-below], [-limit], [float("inf"), 3.0], [-float("inf")], [float("nan")],
             [2.0**-24, -0.0], [0.0], [below, float("inf")], [limit, float("inf")]]
    for values in cases:
        scales = mx.array(values, mx.float16)
        biases = factor * scales.astype(mx.float32)
        wanted = (mx.array_equal(biases.astype(mx.float16).astype(mx.float32), biases).item()
                  and mx.array_equal(scales.astype(mx.float32) * factor, biases).item())
        assert kquants._biases_from_scales(scales, kind).item() == wanted, values
