"""The TVM target for this machine's CPU, and TVM's thread pool sized for it.

TVM 0.27 refuses `mcpu=native` with the wheel's default triple and string targets with options, so the
CPU is read from /proc/cpuinfo and mapped to an LLVM CPU name; unknown CPUs get LLVM's generic x86-64
(correct everywhere, just without AVX2 codegen). Its runtime's default thread count is wrong on small
VMs (see `use_all_cores`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["host_cpu", "host_target", "host_target_spec", "use_all_cores"]

# (cpuinfo flag or family marker, LLVM cpu), most specific first
_X86_CPUS = (("avx512f", "skylake-avx512"), ("avx2", "haswell"), ("avx", "sandybridge"), ("sse4_2", "nehalem"))
# AMD: the newest Zen LLVM knows whose features the CPU has (Zen 5 reports family 1Ah and runs znver4 code)
_ZEN = (("avx512f", "znver4"), ("avx2", "znver2"))


def host_cpu() -> str:
    """The LLVM cpu name for this machine (x86-64 only; generic elsewhere)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "x86-64"
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    table = _ZEN + _X86_CPUS if fields.get("vendor_id") == "AuthenticAMD" else _X86_CPUS
    return next((cpu for flag, cpu in table if flag in flags), "x86-64")


def host_target_spec() -> dict:
    """The dict form TVM 0.27 accepts, e.g. {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", ...}."""
    spec = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1}
    if platform.machine() in ("x86_64", "AMD64"):
        spec["mtriple"] = "x86_64-linux-gnu"
    return spec


def host_target():
    import tvm

    return tvm.target.Target(host_target_spec())


def use_all_cores() -> int:
    """Let TVM's thread pool use every core this process may run on, unpinned (the number of threads).

    TVM 0.27's runtime starts hardware_concurrency / 2 threads on x86 (it assumes hyper-threading, so one
    thread on a 2-vCPU VM) and pins them to cores; pinned, two threads measured no faster than one here,
    unpinned twice as fast. Both are read from the environment when the pool starts, i.e. at the first
    parallel kernel call, so this must run before that; explicit TVM_NUM_THREADS / TVM_BIND_THREADS win.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    return int(os.environ["TVM_NUM_THREADS"])
