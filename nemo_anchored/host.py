"""The machine this process runs on, as the records that carry timings name it (a lab's
results.json, a benchmark's JSON): a time means little without the CPU that took it."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux) with its family and model numbers (a
    VM may show only "AMD EPYC": the family tells the generation), else what ``platform``
    knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            fields = {}
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        name = fields["model name"]
    except (OSError, KeyError):
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name
