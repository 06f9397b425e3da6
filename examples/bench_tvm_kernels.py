"""Kernel table: TVM BSR vs TVM dense vs torch dense vs onnxruntime dense, one process, medians.

For each batch/sequence size M, weight shape K x N, density and block shape, a block-sparse weight is
drawn at that density and y = x @ W is timed four ways, interleaved (every engine once per round, so
they share the machine's noise): pcc's BSR kernel, pcc's dense TVMScript kernel (the same code generator
without the sparsity), torch.matmul on the dense array, and a one-MatMul ONNX model in onnxruntime. Two
threads everywhere. Prints a table and writes kernels.csv / kernels.json to --out.

    python examples/bench_tvm_kernels.py [--quick] [--repeats 20] --out out/bench_tvm_kernels
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from tqdm import tqdm

from pcc.backends.onnx.runtime import session
from pcc.backends.tvm.host import host_target
from pcc.backends.tvm.kernels import DENSE_STRIP, bsr_matmul_primfunc, dense_matmul_primfunc, to_bsr

SIZES = (1, 16, 128)
SHAPES = ((768, 768), (768, 3072), (3072, 768))
DENSITIES = (0.05, 0.1, 0.2, 0.3)
BLOCKS = ((1, 1), (16, 1), (4, 4))


def block_sparse(rng: np.random.Generator, k: int, n: int, block: tuple[int, int], density: float) -> np.ndarray:
    r, c = block
    keep = rng.random((-(-n // r), -(-k // c))) < density
    mask = np.repeat(np.repeat(keep, r, axis=0), c, axis=1)[:n, :k].T
    return (rng.standard_normal((k, n)) * mask).astype(np.float32)


def onnx_matmul(weight: np.ndarray, m: int) -> bytes:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def interleaved(calls: dict[str, callable], repeats: int) -> dict[str, float]:
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def main() -> None:
    import tvm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_tvm_kernels"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="density 0.1 only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    target = host_target()
    rng = np.random.default_rng(0)
    densities = (0.1,) if args.quick else DENSITIES
    rows = []
    configs = [(m, s, d, b) for m in SIZES for s in SHAPES for d in densities for b in BLOCKS]
    dense_cache: dict[tuple[int, int, int], object] = {}
    for m, (k, n), density, block in tqdm(configs, desc="kernels"):
        weight = block_sparse(rng, k, n, block, density)
        x = rng.standard_normal((m, k)).astype(np.float32)
        matrix = to_bsr(weight, block)
        bsr = tvm.compile(tvm.IRModule({"main": bsr_matmul_primfunc(m, k, n, matrix)}), target=target)["main"]
        if (m, k, n) not in dense_cache:
            dense_cache[m, k, n] = tvm.compile(tvm.IRModule({"main": dense_matmul_primfunc(m, k, n)}), target=target)["main"]
        dense = dense_cache[m, k, n]
        tx = tvm.runtime.tensor(x)
        bsr_args = [tx, *(tvm.runtime.tensor(a) for a in matrix.arrays())]
        bsr_out = tvm.runtime.tensor(np.zeros((m, matrix.block_grid[0] * block[0]), np.float32))
        dense_args = [tx, tvm.runtime.tensor(weight)]
        dense_out = tvm.runtime.tensor(np.zeros((m, -(-n // DENSE_STRIP) * DENSE_STRIP), np.float32))
        ort = session(onnx_matmul(weight, m), threads=2)
        xt, wt = torch.from_numpy(x), torch.from_numpy(weight)
        timing = interleaved({
            "tvm_bsr": lambda: bsr(*bsr_args, bsr_out),
            "tvm_dense": lambda: dense(*dense_args, dense_out),
            "torch": lambda: torch.matmul(xt, wt),
            "onnxruntime": lambda: ort.run(None, {"x": x}),
        }, args.repeats)
        error = float(np.abs(bsr_out.numpy()[:, :n] - x @ weight).max() / max(np.abs(x @ weight).max(), 1e-12))
        rows.append({"m": m, "k": k, "n": n, "density": density, "block": f"{block[0]}x{block[1]}", **timing,
                     "bsr_vs_tvm_dense": timing["tvm_dense"] / timing["tvm_bsr"], "bsr_vs_torch": timing["torch"] / timing["tvm_bsr"],
                     "bsr_vs_onnxruntime": timing["onnxruntime"] / timing["tvm_bsr"], "relative_error": error})
    print(f"{'M':>4} {'K x N':>10} {'dens':>5} {'block':>5} {'BSR ms':>8} {'TVM dense':>9} {'torch':>7} {'ORT':>7}  speed-up vs TVM dense / torch / ORT")
    for row in rows:
        print(f"{row['m']:>4} {row['k']:>4}x{row['n']:<5} {row['density']:>5.2f} {row['block']:>5} {row['tvm_bsr']:>8.3f} "
              f"{row['tvm_dense']:>9.3f} {row['torch']:>7.3f} {row['onnxruntime']:>7.3f}  "
              f"{row['bsr_vs_tvm_dense']:.1f}x / {row['bsr_vs_torch']:.1f}x / {row['bsr_vs_onnxruntime']:.1f}x")
    with open(args.out / "kernels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "kernels.json").write_text(json.dumps({"target": str(target), "repeats": args.repeats, "rows": rows}, indent=1))
    print(f"wrote {args.out / 'kernels.csv'}")


if __name__ == "__main__":
    main()
