"""chatforge.runtime: CPU flags, the CPUs a process may use (affinity, cgroup v1/v2 quota, from fake
files), the OpenMP wait policy the CLI sets before torch loads, and the --precision auto rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge import runtime

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2
"""


def test_read_cpu_flags_takes_the_first_processor(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(CPUINFO)
    model, flags = runtime.read_cpu_flags(p)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "avx512_vnni", "avx2"} <= flags and "fpu" in flags
    assert runtime.read_cpu_flags(tmp_path / "missing") == (None, set())


def _v2(tmp_path: Path, groups: dict[str, str], self_path: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, cpu_max in groups.items():
        d = root / rel if rel else root
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text(f"0::{self_path}\n")
    return root, proc


def test_cgroup_v2_quota_is_the_tightest_of_the_group_and_its_ancestors(tmp_path):
    root, proc = _v2(tmp_path, {"": "max 100000", "pod": "150000 100000", "pod/app": "max 100000"}, "/pod/app")
    assert runtime.cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    root, proc = _v2(tmp_path / "b", {"": "max 100000", "a": "max 100000"}, "/a")
    assert runtime.cgroup_cpu_quota(root, proc) is None  # "max": no limit


def test_cgroup_v2_inside_a_container_reads_the_root_it_is_mounted_at(tmp_path):
    # cgroup namespace off: /proc/self/cgroup names a path the container does not mount
    root, proc = _v2(tmp_path, {"": "50000 100000"}, "/kubepods/pod123/abc")
    assert runtime.cgroup_cpu_quota(root, proc) == pytest.approx(0.5)


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cgroup"
    d = root / "cpu,cpuacct" / "docker" / "abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("200000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert runtime.cgroup_cpu_quota(root, proc) == pytest.approx(2.0)
    (d / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert runtime.cgroup_cpu_quota(root, proc) is None
    assert runtime.cgroup_cpu_quota(root, tmp_path / "no-such-file") is None


def test_available_cpus_caps_affinity_by_the_quota_rounded_up():
    assert runtime.available_cpus(quota=None, affinity=8) == 8
    assert runtime.available_cpus(quota=1.5, affinity=8) == 2
    assert runtime.available_cpus(quota=16.0, affinity=4) == 4
    assert runtime.available_cpus(quota=0.1, affinity=4) == 1


def test_cpu_info_is_plain_json_and_describes_this_process():
    info = runtime.cpu_info()
    assert json.loads(json.dumps(info)) == info
    assert set(info["flags"]) == set(runtime.FAST_PATH_FLAGS)
    assert info["affinity_cpus"] == len(os.sched_getaffinity(0))
    assert 1 <= info["available_cpus"] <= info["affinity_cpus"]
    assert len(info["load_average"]) == 3


SPR = {"avx2", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}  # Sapphire Rapids
ZEN4 = {"avx2", "avx512_vnni", "avx512_bf16"}  # AMD EPYC Zen 4: bf16 dot products, no AMX


@pytest.mark.parametrize(("flags", "int8_ok", "width", "expected"), [
    (SPR, True, None, "int8"),
    (SPR, True, 256, "int8"),
    (SPR, True, 128, "fp32"),  # too narrow for int8 or bf16 to pay
    (SPR, False, 512, "bf16"),  # a family int8 does not apply to
    (ZEN4, True, 512, "int8"),
    (ZEN4, True, 128, "fp32"),
    (ZEN4, False, 512, "fp32"),  # bf16 without AMX was not faster for one stream
    ({"avx2", "avx_vnni"}, True, 384, "int8"),
    ({"avx2"}, True, 512, "int8"),  # AVX2 alone (AMD EPYC Zen 3): FBGEMM's int8 still 2.4x fp32 at d512
    ({"avx2"}, True, 128, "fp32"),
    ({"avx2"}, False, 512, "fp32"),
    (set(), True, 512, "fp32"),  # no AVX2 (arm64, say): int8 not measured there
])
def test_pick_precision_rule(flags, int8_ok, width, expected):
    picked, reason = runtime.pick_precision(flags, int8_ok, width)
    assert picked == expected and reason
    as_dict = {f: f in flags for f in runtime.FAST_PATH_FLAGS}
    assert runtime.pick_precision(as_dict, int8_ok, width)[0] == expected


ZEN3 = {"avx2", "fma"}  # AMD EPYC Zen 3 (Milan): AVX2 only, bf16 emulated


@pytest.mark.parametrize(("flags", "device", "cuda_bf16", "expected"), [
    (SPR, "cpu", False, "bf16"),
    (ZEN4, "cpu", False, "bf16"),  # avx512_bf16 dot products: native bf16 matmuls without AMX
    (ZEN3, "cpu", False, "fp32"),  # bf16 emulated: a training step 10-28x slower than fp32 there
    (set(), "cpu", False, "fp32"),
    (ZEN3, "cuda", True, "bf16"),  # the GPU decides, not the host CPU
    (SPR, "cuda", False, "fp32"),
])
def test_pick_train_precision_takes_bf16_only_where_it_is_native(flags, device, cuda_bf16, expected):
    picked, reason = runtime.pick_train_precision(flags, device, cuda_bf16)
    assert picked == expected and reason


def test_trainer_resolves_auto_and_warns_about_emulated_bf16(monkeypatch, caplog):
    import torch

    from chatforge.training import trainer

    for flags, expected in ((ZEN3, "fp32"), (SPR, "bf16")):
        monkeypatch.setattr(trainer, "read_cpu_flags", lambda f=flags: ("test CPU", f))
        assert trainer.resolve_train_precision("auto", torch.device("cpu")) == expected
        assert trainer.resolve_train_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(trainer, "read_cpu_flags", lambda: ("AMD EPYC", ZEN3))
    with caplog.at_level("WARNING", logger="chatforge.training.trainer"):
        assert trainer.resolve_train_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: kept
    assert "AMD EPYC" in caplog.text and "emulated" in caplog.text and "auto" in caplog.text


def test_set_omp_wait_policy_keeps_the_users_choice():
    env: dict[str, str] = {}
    assert runtime.set_omp_wait_policy(env) == "PASSIVE"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(runtime.OMP_SPIN_COUNT)}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert runtime.set_omp_wait_policy(env) == "ACTIVE" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "0"}  # a spin count alone is a choice too
    assert runtime.set_omp_wait_policy(env) == "default" and env == {"GOMP_SPINCOUNT": "0"}


def test_configure_threads_sizes_torch_from_available_cpus(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda *a, **k: 1.0)
        assert runtime.configure_threads({}) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda *a, **k: None)
        n = len(os.sched_getaffinity(0))
        assert runtime.configure_threads({}) == n and torch.get_num_threads() == n
        assert runtime.configure_threads({}, share=n) == 1
        assert runtime.configure_threads({"OMP_NUM_THREADS": "3"}) == torch.get_num_threads()  # the user's
    finally:
        torch.set_num_threads(before)


def test_configure_threads_leaves_reserved_cpus_to_the_server(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        for cpus, want in ((1, 1), (2, 1), (4, 3)):
            monkeypatch.setattr(runtime, "available_cpus", lambda *a, c=cpus, **k: c)
            assert runtime.configure_threads({}, reserve=1) == want == torch.get_num_threads()
            assert runtime.configure_threads({}) == cpus  # training and tools keep every CPU
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cpus, want", [(1, 1), (2, 1), (3, 2), (16, 15)])
def test_serving_threads_keep_one_cpu_for_the_servers_own_threads(cpus, want):
    assert runtime.serving_threads({}, cpus=cpus) == want


def test_serving_threads_follow_omp_num_threads_and_reject_nonsense():
    assert runtime.serving_threads({"OMP_NUM_THREADS": "3"}, cpus=2) == 3  # the user's choice wins
    assert runtime.serving_threads({"OMP_NUM_THREADS": " "}, cpus=4) == 3  # blank: unset
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="OMP_NUM_THREADS=.*positive integer"):
            runtime.serving_threads({"OMP_NUM_THREADS": bad}, cpus=2)


# The chatforge entry point sets the policy before any command imports torch, and the OpenMP runtime
# torch loads then runs with it: libgomp's OMP_DISPLAY_ENV shows its spin count (0 = passive waiting).
PROBE = """
import os, sys
import chatforge.cli as cli

def probe():
    print("torch-before", "torch" in sys.modules)
    import torch
    torch.ones(64, 64) @ torch.ones(64, 64)
    print("policy", os.environ.get("OMP_WAIT_POLICY"), flush=True)

cli.app = probe
cli.main()
"""


def _probe(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **env_extra)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


def test_chatforge_entry_point_sets_a_short_spin_then_passive_wait_policy_before_torch_loads():
    """Fails on the old code, which set PASSIVE alone (libgomp then spins 0 times: every short parallel region of a
    batch-1 forward had to wake its workers)."""
    r = _probe({})
    assert r.returncode == 0, r.stderr
    assert "torch-before False" in r.stdout and "policy PASSIVE" in r.stdout
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in r.stderr  # took effect, with the short spin:
    assert f"GOMP_SPINCOUNT = '{runtime.OMP_SPIN_COUNT}'" in r.stderr
    r = _probe({"OMP_WAIT_POLICY": "ACTIVE"})  # the user's choice wins
    assert "policy ACTIVE" in r.stdout and "OMP_WAIT_POLICY = 'ACTIVE'" in r.stderr


@pytest.mark.parametrize("soft, share, expected", [(1024, 0.5, 512), (1024, 0.25, 256), (20, 0.5, 16),
                                                   (1_048_576, 0.5, 4096)])
def test_fd_budget_is_a_share_of_the_descriptor_limit_within_bounds(monkeypatch, soft, share, expected):
    import resource

    from chatforge.runtime import fd_budget

    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, soft))
    assert fd_budget(share) == expected


def test_fd_budget_without_a_limit_is_the_most(monkeypatch):
    import resource

    from chatforge.runtime import fd_budget

    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert fd_budget(0.25) == 4096
