"""The scheduled dense kernel: every register tile against numpy on shapes that fit no tile, and packing."""

from __future__ import annotations

import numpy as np
import pytest

from pcc.backends.tvm.dense import DenseVariant, dense_matmul_primfunc, dense_variants, pack_dense_weight
from pcc.backends.tvm.host import host_target_spec
from pcc.backends.tvm.tuning import build_kernel

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize(("m", "k", "n"), [(1, 70, 37), (13, 19, 150), (7, 3, 5)])
def test_every_tile_matches_numpy(m, k, n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    for variant in dense_variants(m, n):
        kernel = build_kernel(dense_matmul_primfunc(m, k, n, variant=variant), host_target_spec())
        out = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(pack_dense_weight(weight, variant)), out)
        np.testing.assert_allclose(out.numpy(), x @ weight, rtol=1e-4, atol=1e-5, err_msg=variant.name)


def test_panels_cover_n_with_the_last_one_ending_at_n():
    weight = np.arange(3 * 40, dtype=np.float32).reshape(3, 40)
    packed = pack_dense_weight(weight, DenseVariant(4, 16))
    assert packed.shape == (3, 3, 16)
    np.testing.assert_array_equal(packed[2], weight[:, 24:40])
    assert DenseVariant.parse("mr6-nr64") == DenseVariant(6, 64)
    assert all(-(-v.mr // 2) * v.nr * 4 < 1024 for v in dense_variants(128, 3072))
