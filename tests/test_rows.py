"""Arrays cut into row blocks join back into the array they were cut from without a copy, and only then."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np

from mlxq.kernels import rows


def test_all_the_parts_in_order_join_into_the_array_they_were_cut_from():
    whole = mx.arange(40, dtype=mx.float32).reshape(10, 4)
    parts = rows.cut_rows(whole, [3, 5, 2])
    assert [p.shape[0] for p in parts] == [3, 5, 2]
    assert rows.joined_rows(parts) is whole


def test_other_joins_are_new_arrays_with_the_rows_joined():
    whole = mx.arange(40, dtype=mx.float32).reshape(10, 4)
    a, b, c = rows.cut_rows(whole, [3, 5, 2])
    other = mx.ones((2, 4))
    for join in ([a, c, b], [a, b], [a, b, other], [b, c]):
        got = rows.joined_rows(join)
        assert got is not whole
        np.testing.assert_array_equal(np.array(got), np.concatenate([np.array(p) for p in join]))
    (d,) = rows.cut_rows(whole, [10])
    np.testing.assert_array_equal(np.array(rows.joined_rows([a, d])), np.concatenate([np.array(a), np.array(d)]))


def test_the_record_of_a_part_goes_with_it():
    before = len(rows._CUTS)
    parts = rows.cut_rows(mx.zeros((6, 2)), [2, 4])
    assert len(rows._CUTS) == before + 2
    del parts
    gc.collect()
    assert len(rows._CUTS) == before


def test_fusing_layers_cut_from_one_array_takes_that_array():
    """What a GGUF read gives q/k/v (`formats.gguf.reader._Joint`): the fused layer holds the arrays read, not
    copies."""
    from mlxq.models.layers import QuantizedLinear, fuse_linears

    weight, scales, biases = mx.quantize(mx.random.normal((96, 64)), group_size=32, bits=4)
    layers = []
    for w, s, b in zip(*(rows.cut_rows(x, [64, 16, 16]) for x in (weight, scales, biases)), strict=True):
        layer = QuantizedLinear(64, w.shape[0], bias=False, group_size=32, bits=4)
        layer.weight, layer.scales, layer.biases = w, s, b
        layers.append(layer)
    fused = fuse_linears(layers)
    assert fused.weight is weight and fused.scales is scales and fused.biases is biases
