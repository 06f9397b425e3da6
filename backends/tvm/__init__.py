"""The `tvm` backend: Relax import, BSR/dense TVMScript matmul kernels chosen by measurement, export_library."""

from pcc.backends.tvm.target import TvmTarget

__all__ = ["TvmTarget"]
