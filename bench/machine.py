"""The machine a benchmark ran on: CPU model, cores, and the instruction sets that decide speed.

The same benchmark gives different answers on different x86-64 CPUs: TensorFlow's oneDNN
kernels pick their code path by instruction set (AVX2, AVX-512, AVX512-BF16, AMX), and
bfloat16 is native only with AVX512-BF16 or AMX (bnzoo.precision). A number without its machine
cannot be compared, so every bench script prints `describe()` above each table and puts
`as_dict()` in its JSON results.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

#: Instruction sets that change which kernels run, as /proc/cpuinfo spells their flags.
INSTRUCTION_SETS = {
    "AVX2": ("avx2",),
    "AVX-512F": ("avx512f",),
    "AVX512-BF16": ("avx512_bf16",),
    "AMX": ("amx_tile", "amx_bf16"),
}
#: Environment variables that change TensorFlow's CPU kernels.
KERNEL_SETTINGS = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class Machine:
    """What a benchmark needs to say about its machine.

    Attributes:
        cpu_model: the CPU's name (/proc/cpuinfo's `model name`).
        cpu_id: vendor, family and model numbers (`AuthenticAMD family 23 model 1`): names
            such as "AMD EPYC Processor" cover several generations.
        cores: CPUs this process may run on.
        instruction_sets: `{name: present}` for `INSTRUCTION_SETS`.
        kernel_settings: the `KERNEL_SETTINGS` environment variables that are set.
    """

    cpu_model: str
    cpu_id: str
    cores: int
    instruction_sets: dict[str, bool]
    kernel_settings: dict[str, str]

    def describe(self) -> str:
        """One line, e.g. `CPU: AMD EPYC Processor (AuthenticAMD family 23 model 1), 2 cores;
        AVX2 yes, AVX-512F no, AVX512-BF16 no, AMX no`."""
        sets = ", ".join(
            f"{name} {'yes' if present else 'no'}"
            for name, present in self.instruction_sets.items()
        )
        settings = "".join(f"; {key}={value}" for key, value in self.kernel_settings.items())
        core_text = f"{self.cores} core{'' if self.cores == 1 else 's'}"
        return f"CPU: {self.cpu_model} ({self.cpu_id}), {core_text}; {sets}{settings}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's entries of Linux's /proc/cpuinfo ({} elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def describe_machine(cpuinfo_path: str = "/proc/cpuinfo") -> Machine:
    """The machine this process runs on."""
    info = read_cpuinfo(cpuinfo_path)
    flags = set(info.get("flags", "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    cpu_id = " ".join(
        part
        for part in (
            info.get("vendor_id", ""),
            f"family {info['cpu family']}" if "cpu family" in info else "",
            f"model {info['model']}" if "model" in info else "",
        )
        if part
    )
    return Machine(
        cpu_model=info.get("model name") or platform.processor() or platform.machine(),
        cpu_id=cpu_id or platform.machine(),
        cores=cores,
        instruction_sets={
            name: any(flag in flags for flag in names) for name, names in INSTRUCTION_SETS.items()
        },
        kernel_settings={key: os.environ[key] for key in KERNEL_SETTINGS if key in os.environ},
    )


def machine_line() -> str:
    """`describe_machine().describe()`: the line to print above every table."""
    return describe_machine().describe()


def write_results(path: str, results: dict[str, Any]) -> None:
    """Write a benchmark's `results` as JSON at `path`, with the machine they were measured on
    (`"machine"`) and the load average at the end."""
    import json

    record = {"machine": describe_machine().as_dict(), "load_average": os.getloadavg(), **results}
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(record, stream, indent=2, default=str)
        stream.write("\n")
