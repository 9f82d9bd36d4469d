"""The machine a process runs on: CPU model and the flags that decide the fast paths, the CPUs it may
actually use (affinity and the cgroup CPU quota, not ``os.cpu_count()``), load; and the process-wide
settings chatforge derives from them (OpenMP wait policy, torch's intra-op threads, ``--precision auto``).

Importing this module does not import torch: the CLI sets the OpenMP wait policy through it before
torch (and its OpenMP runtime, which reads the environment once when it loads) is imported.
Benchmarks record :func:`cpu_info` beside their figures, so results say which machine they came from.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "FAST_PATH_FLAGS",
    "INT8_MIN_WIDTH",
    "auto_precision",
    "available_cpus",
    "cgroup_cpu_quota",
    "configure_threads",
    "cpu_info",
    "fd_budget",
    "pick_precision",
    "int8_dot_products",
    "native_bf16",
    "pick_train_precision",
    "read_cpu_flags",
    "set_omp_wait_policy",
]

# The CPU flags that decide which serving path is fastest (see pick_precision):
# amx_*: Intel AMX tiles (bf16 and int8 matmuls in hardware, Sapphire Rapids and later);
# avx512_bf16: bf16 dot products (Cooper Lake, AMD Zen 4); avx512_vnni / avx_vnni: int8 dot products
# (the fbgemm/oneDNN int8 kernels); avx512f / avx2: the vector width of every other kernel.
FAST_PATH_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def read_cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str | None, set[str]]:
    """(model name, flags) of the first processor listed in a /proc/cpuinfo-style file; (None, set())
    where there is none (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # Features: the same list on arm64
            flags = set(value.split())
        if model is not None and flags:
            break
    return model, flags


def _cgroup_v2_quota(cpu_max: Path) -> float | None:
    """cpu.max holds ``"$MAX $PERIOD"`` (``max`` = no limit) -> CPUs' worth of time per period."""
    try:
        quota, _, period = cpu_max.read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max" or not period:
        return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _cgroup_v1_quota(cpu_dir: Path) -> float | None:
    """cpu.cfs_quota_us (-1 = no limit) over cpu.cfs_period_us."""
    try:
        q = int((cpu_dir / "cpu.cfs_quota_us").read_text().strip())
        p = int((cpu_dir / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when nothing limits it.

    cgroup v2: ``cpu.max`` of the process's group and of every group above it (the tightest applies);
    cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in the ``cpu`` controller's hierarchy. Inside
    a container the group's path (from ``/proc/self/cgroup``) is often not mounted under its own name,
    the container's group being mounted at the root, so the root is read as well.
    """
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.strip().lstrip("/")
        if controllers == "":  # v2 unified hierarchy ("0::/path")
            if not (root / "cpu.max").exists() and not (root / rel / "cpu.max").exists():
                continue
            group = root / rel
            while True:  # the group and each ancestor up to the root
                q = _cgroup_v2_quota(group / "cpu.max")
                if q is not None:
                    quotas.append(q)
                if group == root or root not in group.parents:
                    break
                group = group.parent
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for d in (mount / rel, mount):
                    q = _cgroup_v1_quota(d)
                    if q is not None:
                        quotas.append(q)
    return min(quotas) if quotas else None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def fd_budget(share: float, most: int = 4096, least: int = 16) -> int:
    """How many connections one kind of client may hold: ``share`` of this process's file-descriptor limit
    (RLIMIT_NOFILE, soft), within [least, most]. The gRPC port takes half and the HTTP port a quarter, so
    clients that open connections and never use them cannot take the descriptors the other port, the
    conversation store, the logs and model files need ("Too many open files")."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return most
    return max(least, min(most, int(soft * share)))


def available_cpus(quota: float | None = None, affinity: int | None = None) -> int:
    """CPUs this process can actually keep busy: its affinity mask, capped by the cgroup quota rounded
    up (a 1.5-CPU quota can still use 2 threads' worth of time in bursts); at least 1.

    ``quota``/``affinity`` default to this process's (:func:`cgroup_cpu_quota`, ``sched_getaffinity``).
    """
    n = affinity if affinity is not None else _affinity()
    q = quota if quota is not None else cgroup_cpu_quota()
    if q is not None:
        n = min(n, math.ceil(q))
    return max(1, n)


def cpu_info() -> dict:
    """A plain JSON-able description of this machine for benchmarks and logs."""
    model, flags = read_cpu_flags()
    quota = cgroup_cpu_quota()
    affinity = _affinity()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "model_name": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "flags": {f: f in flags for f in FAST_PATH_FLAGS},
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": affinity,
        "cgroup_cpu_quota": quota,
        "available_cpus": available_cpus(quota, affinity),
        "load_average": load,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    torch = sys.modules.get("torch")  # only when already imported: reading these must not load torch
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_quantized_engine"] = torch.backends.quantized.engine
    return info


# Spins (libgomp: about 100 per microsecond) an idle OpenMP worker waits actively before it sleeps, where chatforge
# chooses: a short spin, then PASSIVE. See set_omp_wait_policy.
OMP_SPIN_COUNT = 1000


def set_omp_wait_policy(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT=OMP_SPIN_COUNT`` (idle OpenMP workers spin about 10 us,
    then sleep) unless the user set either; returns the policy in effect.

    With libgomp's default, workers spin 300,000 times (about 3 ms) after each parallel region waiting for the
    next: on a shared or CPU-quota'd machine that burns the CPU time other threads (and processes) need. The
    issue measured one training step at 1.3 s of CPU with the default and 0.10 s with PASSIVE on a loaded 2-core
    machine. PASSIVE alone (no spin) has its own cost: each of the hundreds of short regions of a batch-1 forward
    must wake its workers, which doubled a BERT-sized encoder's latency on a quiet machine. A 1,000-spin wait
    keeps both (``benchmarks/omp_wait_policy.py``, AMD EPYC Zen 5, 2 threads): batch-1 inference 1.6 ms quiet
    against 4.0 with PASSIVE and 2.0 with the default, training steps as with PASSIVE quiet and with 3 busy
    processes beside it; only batch-1 inference under that contention pays (8.6 ms against PASSIVE's 5.7, the
    default's 15.7). The OpenMP runtime reads both once, when torch loads it, so this must run before ``import torch``.
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)
        if "torch" in sys.modules:
            logger.debug("OMP_WAIT_POLICY set after torch was imported: it applies to child processes only")
    return env.get("OMP_WAIT_POLICY", "default")


def configure_threads(environ: MutableMapping[str, str] | None = None, share: int = 1, reserve: int = 0) -> int:
    """Size torch's intra-op thread pool from the CPUs actually available (:func:`available_cpus`),
    divided by ``share`` (processes on this machine splitting them, e.g. torchrun's local ranks), less
    ``reserve`` CPUs left to other work of the process (at least 1 thread), unless the user chose
    (``OMP_NUM_THREADS``); returns the thread count in effect.

    torch sizes its pool from the machine's cores, which in a container with a CPU quota (or a
    process pinned to fewer CPUs) means more threads than CPUs: each parallel region then waits for
    threads that are not scheduled. A server passes ``reserve=SERVING_RESERVED_CPUS`` (:func:`serving_threads`).
    """
    import torch

    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        logger.info("torch threads: %d (OMP_NUM_THREADS=%s)", n, env["OMP_NUM_THREADS"])
        return n
    cpus = max(1, available_cpus() // max(1, share))
    n = max(1, cpus - reserve)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    logger.info("torch threads: %d (CPUs available to this process: affinity %d, cgroup quota %s)%s",
                n, _affinity(), cgroup_cpu_quota(),
                f"; {cpus - n} of them left to the server's own threads" if n < cpus else "")
    return n


# CPUs a serving process keeps out of its compute pools (torch, CTranslate2, ONNX Runtime) once it has two or more.
# Beside every decoding step the server runs Python of its own: the asyncio loop handing each token to gRPC, gRPC's
# threads, detokenization, the store writer. With every CPU in the compute pool, each parallel region of a step
# waits for a worker the loop has pre-empted. On a 2-CPU AMD EPYC (Zen 5) a GPT-2 4 x 256 served over gRPC made
# 1.43x (fp32) and 2.11x (int8) the tokens/s for one stream and 1.28x / 1.57x for 8 streams with one torch thread
# instead of two, 2.2-5.7x through the CTranslate2 backend (benchmarks/results/served-generation-amd-epyc-zen5,
# docs/results/performance.md, "A third CPU kind"). A classifier's batches are the exception (runner_threads).
SERVING_RESERVED_CPUS = 1


def serving_threads(environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """Compute threads for a serving process's engines (torch, CTranslate2, ONNX Runtime): the CPUs available
    (:func:`available_cpus`) less :data:`SERVING_RESERVED_CPUS`, at least 1; ``OMP_NUM_THREADS`` when the user
    set it (a positive integer)."""
    env = os.environ if environ is None else environ
    chosen = (env.get("OMP_NUM_THREADS") or "").strip()
    if chosen:
        try:
            n = int(chosen)
        except ValueError:
            n = 0
        if n >= 1:
            return n
        raise ValueError(f"OMP_NUM_THREADS={chosen!r} is not a thread count; allowed: a positive integer")
    cpus = available_cpus() if cpus is None else cpus
    return max(1, cpus - SERVING_RESERVED_CPUS)


def runner_threads(task: str, alongside_decoding: bool = False, environ: Mapping[str, str] | None = None,
                   cpus: int | None = None) -> tuple[int, int] | None:
    """torch threads of a serving runner: (for a call of one row, for a call of more), or None when the user chose
    with ``OMP_NUM_THREADS`` (every thread keeps that).

    Decoding steps (``task`` "generation") use :func:`serving_threads` whatever the batch: 8 concurrent streams were
    faster on one thread than on two on 2 CPUs. A classifier uses it for one text, where the event loop's work per
    call weighs most (one caller: 1.46-1.78x the texts/s of two threads), and every available CPU for a batch of
    texts: with one thread for batches too, 32 concurrent callers lost 4-21 %; with this split they hold (0.99-1.06x;
    benchmarks/results/served-classification-amd-epyc-zen5). torch's thread count is not reliably per thread (a
    count one thread sets is what the others read), so a classifier served ``alongside_decoding`` (the same process
    hosts a generator) keeps the decoding count for its batches too: the runners never change it under each other."""
    env = os.environ if environ is None else environ
    if (env.get("OMP_NUM_THREADS") or "").strip():
        return None
    cpus = available_cpus() if cpus is None else cpus
    one = serving_threads({}, cpus)
    return (one, cpus) if task == "classification" and not alongside_decoding else (one, one)


# --precision auto leaves models narrower than this (the median input width of their linear layers) in
# fp32: benchmarks/results/int8-sizes.json measured a GPT decoder at d_model 128 at 0.85x fp32 with int8 and
# 0.55x with bf16 for a single stream (per-call activation quantization and casts cost more than the
# small matmuls save), and int8 at 1.2-2.0x (batch 1) and 1.6-3.2x (batch 8) at d_model 256-512.
INT8_MIN_WIDTH = 256


def pick_precision(flags: set[str] | dict, int8_ok: bool = True, width: int | None = None) -> tuple[str, str]:
    """``--precision auto``: (precision, reason) from the CPU flags and the model's width.

    The rule, from benchmarks/results/int8-sizes.json and precision-speed.json (decoding and Classify,
    measured on an Intel Xeon with AMX; for other CPU kinds it follows the instructions the kernels need):

    * fp32 for a model narrower than :data:`INT8_MIN_WIDTH` (``width``; None = wide enough);
    * int8 where the CPU has FBGEMM's int8 kernels and the family can be quantized (``int8_ok``): int8 dot
      products (avx512_vnni / avx_vnni / amx_int8), or AVX2 alone, where the kernels multiply-add bytes without
      VNNI and still won (an AMD EPYC Zen 3, benchmarks/results/int8-sizes-amd-epyc-avx2.json: GPT decoding
      1.17x/1.97x fp32 at d_model 256, batch 1/8, 2.4x/3.2x at 512; 0.64x at 128, under INT8_MIN_WIDTH):
      decoding reads every weight each token, and int8 reads a quarter of fp32's;
    * else bf16 where the CPU has AMX (amx_bf16): batched steps faster (1.2-1.9x at batch 8 here, 8-stream
      serving 1.7x in serving-base-bf16.json), a single stream 0.7-0.9x;
    * else fp32 (bf16 without AMX has not been faster than fp32 here).
    """
    have = {f for f, on in flags.items() if on} if isinstance(flags, dict) else set(flags)
    if width is not None and width < INT8_MIN_WIDTH:
        return "fp32", f"linear layers {width} wide < {INT8_MIN_WIDTH}, where int8 and bf16 measured slower"
    int8_dot = have & {"avx512_vnni", "avx_vnni", "amx_int8"}
    if int8_ok and int8_dot:
        return "int8", f"int8 dot products ({', '.join(sorted(int8_dot))})"
    if int8_ok and "avx2" in have:
        return "int8", "FBGEMM's AVX2 int8 kernels (no VNNI; measured faster than fp32 from d_model 256)"
    why = "int8 does not apply to this family" if not int8_ok else "no AVX2 or int8 dot-product instructions"
    if "amx_bf16" in have:
        return "bf16", f"AMX bf16 tiles; {why}"
    return "fp32", why


# CPU instructions that make bf16 matmuls native; without them oneDNN converts and computes in fp32 per element.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def pick_train_precision(flags: set[str] | dict, device_type: str = "cpu",
                         cuda_bf16: bool = False) -> tuple[str, str]:
    """``train.precision: auto``: (precision, reason) for training on this device.

    bf16 autocast on a GPU that supports it, or on a CPU with native bf16 matmuls (AMX tiles or avx512_bf16: 6x and
    2.5x fp32's matmul rate on the first two kinds measured; on an AMD EPYC Zen 5, avx512_bf16 without AMX, 4.4x, and
    a GPT training step ran at 1.94x fp32's tokens/s, benchmarks/results/bench-2026-12-05-amd-zen5; with fp32's linear
    layers on oneDNN since, still 1.2x, and the ChatbotData Transformer's epoch 1.07x, bench-2026-12-06-amd-zen5-training);
    fp32 elsewhere.
    On a CPU without them (an AMD EPYC with AVX2 only, benchmarks/results/train-precision-amd-epyc-avx2.json) a bf16
    training step took 10x (the CLINC150 Transformer) to 28x (the ChatbotData GPT) as long as fp32's.
    """
    if device_type == "cuda":
        return ("bf16", "the GPU supports bf16") if cuda_bf16 else ("fp32", "the GPU has no bf16 support")
    have = {f for f, on in flags.items() if on} if isinstance(flags, dict) else set(flags)
    native = have & set(BF16_CPU_FLAGS)
    if native:
        return "bf16", f"native bf16 matmuls ({', '.join(sorted(native))})"
    return "fp32", f"no native bf16 matmuls on this CPU (none of {', '.join(BF16_CPU_FLAGS)}): bf16 is emulated"


INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_dot_products(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) has int8 dot-product instructions (VNNI or AMX): without them
    u8s8 kernels add products in 16-bit lanes and can saturate (engines then want 7-bit weights)."""
    return bool(set(INT8_DOT_FLAGS) & (read_cpu_flags()[1] if flags is None else set(flags)))


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) computes bf16 matmuls natively (AMX or avx512_bf16)."""
    return bool(set(BF16_CPU_FLAGS) & (read_cpu_flags()[1] if flags is None else set(flags)))


FP32_LINEAR_ENV = "CHATFORGE_FP32_LINEAR"
FP32_LINEAR_CHOICES = ("auto", "onednn", "aten")


def fp32_linear_kernels(environ: Mapping[str, str] | None = None, cpu_model: str | None = None) -> tuple[str, str]:
    """Which matmul serves fp32 linear layers -> (``onednn`` | ``aten``, why).

    ``CHATFORGE_FP32_LINEAR`` chooses (``auto``, the default, ``onednn`` or ``aten``). ``auto`` picks oneDNN on AMD
    CPUs, where torch's own path (oneMKL's sgemm) ran a GPT decode step's linear layers 1.5-1.9x slower than oneDNN
    (``benchmarks/fp32_linear.py``, AMD EPYC, AVX2), and keeps torch's path elsewhere (not measured on other CPUs).
    """
    env = os.environ if environ is None else environ
    choice = env.get(FP32_LINEAR_ENV, "auto").strip().lower() or "auto"
    if choice not in FP32_LINEAR_CHOICES:
        raise ValueError(f"{FP32_LINEAR_ENV}={env.get(FP32_LINEAR_ENV)!r} is not supported; allowed: "
                         f"{', '.join(FP32_LINEAR_CHOICES)}")
    if choice != "auto":
        return choice, f"{FP32_LINEAR_ENV}={choice}"
    model = cpu_model if cpu_model is not None else (read_cpu_flags()[0] or "")
    if "AMD" in model.upper():
        return "onednn", f"auto: {model!r} is an AMD CPU, where oneDNN's fp32 matmul was measured faster than oneMKL's"
    return "aten", f"auto: {model or 'this CPU'!r} is not an AMD CPU (oneDNN measured faster on AMD only)"


def auto_precision(int8_ok: bool = True, width: int | None = None) -> tuple[str, str]:
    """:func:`pick_precision` for this machine's CPU."""
    return pick_precision(read_cpu_flags()[1], int8_ok, width)
