"""Peak resident memory of this process, for the benchmarks (Linux /proc; run one case per process)."""
from __future__ import annotations


def rss_bytes(field: str) -> int:
    """A /proc/self/status memory field in bytes: "VmRSS" (now) or "VmHWM" (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset the peak RSS (VmHWM) to the current RSS ("5" to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
