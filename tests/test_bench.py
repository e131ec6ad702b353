"""The benchmark scripts: argument errors and the profile's op categories (no timing here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def usage_error(script, *arguments):
    """The last stderr line of bench/`script` with `arguments`, which must exit with status 2."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "arguments,named",
    [
        (["--models", "resnet50"], "resnet50"),
        (["--precisions", "float16"], "float16"),
        (["--rounds", "0"], "--rounds"),
    ],
)
def test_bench_models_rejects_bad_arguments_before_building_anything(arguments, named):
    assert named in usage_error("bench_models.py", *arguments)


@pytest.mark.parametrize(
    "name,op_type,category",
    [
        ("bn_inception_1/conv2_3x3_1/convolution", "_MklNativeConv2D", "conv forward"),
        ("bn_inception_1/conv2_3x3_relu_1/Relu", "_MklNativeFusedConv2D", "conv forward"),
        ("bn_inception_1/conv2_3x3_bn_1/FusedBatchNormV3", "_FusedConv2D", "conv forward"),
        (
            "gradient_tape/bn_inception_1/conv2_3x3_1/convolution/Conv2DBackpropFilter",
            "_MklNativeConv2DBackpropFilterWithBias",
            "conv backward",
        ),
        (
            "bn_inception_1/conv2_3x3_bn_1/FusedBatchNormV3",
            "_MklNativeFusedBatchNormEx",
            "BN kernels",
        ),
        (
            "gradient_tape/bn_inception_1/conv2_3x3_bn_1/FusedBatchNormGradV3",
            "_MklNativeFusedBatchNormGradV3",
            "BN kernels",
        ),
        ("bn_inception_1/inception_5b_3x3_bn_1/mul_4", "Mul", "BN other ops"),
        ("sgd_2/Mul_160", "Mul", "optimizer"),
        ("gradient_tape/bn_inception_1/conv2_3x3_relu_1/ReluGrad", "ReluGrad", "ReLU"),
        ("gradient_tape/bn_inception_1/inception_3a_output_1/Slice_2", "Slice", "concat"),
        ("bn_inception_1/pool1_3x3_s2_1/MaxPool2d", "_MklNativeMaxPool", "pooling"),
        ("AddN_31", "AddN", "other"),
    ],
)
def test_profile_groups_ops_by_kernel_type_then_layer_scope(name, op_type, category):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from profile_training_step import categorize
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert categorize(name, op_type) == category


ZEN1_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC Processor
flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC Processor
"""
SAPPHIRE_RAPIDS_FLAGS = "avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8"


def machine_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import machine
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return machine


def test_machine_line_names_the_cpu_and_its_instruction_sets(tmp_path, monkeypatch):
    machine = machine_module()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(ZEN1_CPUINFO)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    described = machine.describe_machine(str(cpuinfo))
    assert described.cpu_model == "AMD EPYC Processor"
    assert described.cpu_id == "AuthenticAMD family 23 model 1"
    assert described.instruction_sets == {
        "AVX2": True,
        "AVX-512F": False,
        "AVX512-BF16": False,
        "AMX": False,
    }
    assert described.describe() == (
        f"CPU: AMD EPYC Processor (AuthenticAMD family 23 model 1), {described.cores} "
        f"core{'' if described.cores == 1 else 's'}; AVX2 yes, AVX-512F no, AVX512-BF16 no, AMX no"
    )

    cpuinfo.write_text(ZEN1_CPUINFO.replace("avx2 bmi2", SAPPHIRE_RAPIDS_FLAGS))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    described = machine.describe_machine(str(cpuinfo))
    assert all(described.instruction_sets.values())
    assert described.describe().endswith("AMX yes; ONEDNN_MAX_CPU_ISA=AVX2")
    assert described.as_dict()["kernel_settings"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_machine_without_cpuinfo_still_names_the_architecture(tmp_path):
    described = machine_module().describe_machine(str(tmp_path / "missing"))
    assert described.cpu_model and described.cores >= 1
    assert not any(described.instruction_sets.values())


def test_json_results_carry_the_machine(tmp_path):
    machine = machine_module()
    path = tmp_path / "results.json"
    machine.write_results(str(path), {"rows": [{"train_ms": 1.5}]})
    record = json.loads(path.read_text())
    assert record["machine"] == machine.describe_machine().as_dict()
    assert record["rows"] == [{"train_ms": 1.5}]


@pytest.mark.parametrize(
    "arguments,named",
    [(["--precisions", "float16"], "float16"), (["--size", "100"], "--size")],
)
def test_bench_pytorch_peer_rejects_bad_arguments_before_building_anything(arguments, named):
    assert named in usage_error("bench_pytorch_peer.py", *arguments)
