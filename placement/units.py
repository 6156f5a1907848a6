"""Byte quantities as people write them: 128GB, 96 GiB, 64e9."""

import re

from .errors import PlanError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_bytes(text: str) -> int:
    m = _SIZE.match(str(text))
    if not m:
        raise PlanError(f"cannot read {text!r} as a memory size (try 128GB)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    binary = "i" in unit
    letter = unit[:1] if unit[:1] in "kmgtp" and unit else ""
    scale = 1024 ** "kmgtp".index(letter) * 1024 if binary and letter else _SCALE[letter]
    value = int(number * scale)
    if value <= 0:
        raise PlanError(f"memory size must be positive, got {text!r}")
    return value


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"
