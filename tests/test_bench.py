"""The benchmark scripts: argument errors and the profile's op categories (no timing here)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "arguments,named",
    [
        (["--models", "resnet50"], "resnet50"),
        (["--precisions", "float16"], "float16"),
        (["--rounds", "0"], "--rounds"),
    ],
)
def test_bench_models_rejects_bad_arguments_before_building_anything(arguments, named):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_models.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert named in result.stderr.strip().splitlines()[-1]


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
