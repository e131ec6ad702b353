"""The automatic mixed-precision choice: 16-bit compute only where the hardware has it."""

import pytest

from bnzoo import precision
from bnzoo.config import parse_train_args

AMD_EPYC_FLAGS = "fpu vme sse sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_vbmi2"
SKYLAKE_FLAGS = "fpu vme sse sse2 avx2 avx512f avx512bw avx512cd avx512dq"
SAPPHIRE_RAPIDS_FLAGS = "fpu avx512f avx512_fp16 amx_bf16 amx_tile amx_int8"


def cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    return str(path)


@pytest.mark.parametrize(
    "flags, native",
    [(AMD_EPYC_FLAGS, True), (SAPPHIRE_RAPIDS_FLAGS, True), (SKYLAKE_FLAGS, False)],
)
def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    assert precision.cpu_has_native_bfloat16(cpuinfo(tmp_path, flags)) is native


def test_a_system_without_cpuinfo_has_no_native_bfloat16(tmp_path):
    assert precision.cpu_has_native_bfloat16(str(tmp_path / "absent")) is False


@pytest.mark.parametrize(
    "mixed_precision, gpu, bfloat16_cpu, policy",
    [
        (None, False, True, "mixed_bfloat16"),
        (None, False, False, "float32"),
        (None, True, False, "mixed_float16"),
        (False, True, True, "float32"),
        (True, False, False, "mixed_bfloat16"),  # asked for explicitly: emulated, but asked for
        (True, True, False, "mixed_float16"),
    ],
)
def test_policy_follows_the_flag_then_the_hardware(
    monkeypatch, mixed_precision, gpu, bfloat16_cpu, policy
):
    monkeypatch.setattr(precision, "has_gpu", lambda: gpu)
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: bfloat16_cpu)
    assert precision.resolve_policy(mixed_precision) == policy


def test_the_command_line_default_is_the_automatic_choice():
    assert parse_train_args([]).mixed_precision is None
    assert parse_train_args(["--mixed-precision"]).mixed_precision is True
    assert parse_train_args(["--no-mixed-precision"]).mixed_precision is False
