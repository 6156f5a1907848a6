"""macOS caps what the GPU may wire at Metal's recommended working set, which
follows the `iogpu.wired_limit_mb` sysctl. A rank beyond it pages; raising
the limit (sudo, until the next reboot) lets it fit. Pure."""

import math

MB = 2**20
# What a proposed limit leaves to macOS and everything else on the machine:
# 8 GiB, or a sixteenth of the memory on machines over 128 GiB. An
# assumption, not a measurement: macOS itself runs in a few GB, and the
# ranks' own processes are outside the wired weights.
MACOS_RESERVE_FRACTION = 1 / 16
MACOS_RESERVE_MIN_BYTES = 8 * 2**30


def wired_limit_mb(needed_bytes: float, total_bytes: int) -> int | None:
    """The iogpu.wired_limit_mb that lets `needed_bytes` be wired on a
    machine of `total_bytes`, or None when no limit could without starving
    macOS of memory."""
    reserve = max(MACOS_RESERVE_MIN_BYTES, total_bytes * MACOS_RESERVE_FRACTION)
    mb = math.ceil(needed_bytes / MB)
    return mb if mb * MB <= total_bytes - reserve else None


def sysctl(mb: int) -> str:
    return f"sudo sysctl iogpu.wired_limit_mb={mb}"
