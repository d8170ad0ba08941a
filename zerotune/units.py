"""Numbers for people: counts and byte sizes in short units."""

from __future__ import annotations


def human(n: float, unit: str = "") -> str:
    """1234567 → '1.23M' (k, M, G, T steps of 1000; bytes use KiB/MiB/GiB steps of 1024)."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB"):
            if abs(n) < 1024 or suffix == "GiB":
                return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.2f} {suffix}"
            n /= 1024
    for suffix in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}" if suffix == "" else f"{n:.2f}{suffix}"
        n /= 1000
    return f"{n:.2f}T"
