"""What this machine offers: physical cores, available memory, and CPU features llama.cpp must not use. No
llama_cpp here."""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from functools import lru_cache
from pathlib import Path


def physical_cores() -> int:
    """Physical cores (llama.cpp's own default thread count); logical CPUs where that is unknown."""
    logical = os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return logical
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical_id = value.strip()
        elif key == "core id":
            core_id = value.strip()
            cores.add((physical_id, core_id))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return max(1, min(len(cores) or logical, usable))


def available_memory_bytes() -> int | None:
    """Memory the OS could give us now (MemAvailable on Linux), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# AMX: llama.cpp's AMX kernels are not used unless LLMRUN_AMX=1.
#
# llama.cpp built with -march=native on a CPU with AMX (Intel Sapphire Rapids and later) multiplies
# quantized weights with AMX tiles. Built by GCC 12 (Debian 12's compiler, with which pip builds
# llama-cpp-python) on this project's machines, the first prompt dies: a general-protection fault at
# `ldtilecfg` in ggml_backend_amx_mul_mat (native llama-completion too), while the same tile
# configuration loads fine from a hand-written probe. llama.cpp has no switch for AMX alone (its
# --no-repack also drops the AVX-512 repacked weights: 1.5x in prompt speed here), but it skips AMX
# when the kernel refuses AMX state (arch_prctl(ARCH_REQ_XCOMP_PERM)). So llmrun makes that one call
# fail with a seccomp filter, and llama.cpp runs its AVX-512 kernels, as on a CPU without AMX.
_SYS_ARCH_PRCTL = 158
_SYS_SECCOMP = 317
_ARCH_REQ_XCOMP_PERM = 0x1023
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1  # every thread of the process, not only this one
_EPERM = 1


@lru_cache(maxsize=1)
def has_amx() -> bool:
    """True on Linux x86-64 when the CPU offers AMX."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        return False
    return False


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse_amx() -> bool:
    """Make ``arch_prctl(ARCH_REQ_XCOMP_PERM)`` fail with EPERM in this process (all its threads, and children);
    every other system call is untouched. False where seccomp filters cannot be installed."""
    load, jump_eq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jump_eq, 0, 5, _AUDIT_ARCH_X86_64),
        (load, 0, 0, 0),  # seccomp_data.nr
        (jump_eq, 0, 3, _SYS_ARCH_PRCTL),
        (load, 0, 0, 16),  # seccomp_data.args[0], low half
        (jump_eq, 0, 1, _ARCH_REQ_XCOMP_PERM),
        (ret, 0, 0, 0x00050000 | _EPERM),  # SECCOMP_RET_ERRNO
        (ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *instruction) for instruction in program))
    fprog = _SockFprog(len(program), ctypes.addressof(code))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # required of an unprivileged filter
            return False
        flags = _SECCOMP_FILTER_FLAG_TSYNC
        return bool(libc.syscall(_SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog)) == 0)
    except (OSError, AttributeError):
        return False


def avoid_amx(allowed: bool) -> bool:
    """Keep llama.cpp off AMX in this process and the processes it starts, unless ``allowed`` (LLMRUN_AMX=1);
    False when the CPU has AMX and it could not be refused."""
    return allowed or not has_amx() or refuse_amx()
