"""utils.precision: the one mixed-precision policy."""


def test_one_mixed_precision_policy_for_training_backbones_and_evaluation():
    """fp16 means float16 with loss scaling on CUDA and bfloat16 without a scaler on CPU, for every user."""
    import torch

    from backbones import iresnet, mobilefacenet
    from utils.precision import low_precision_dtype, mixed_precision

    dtype, scaler, autocast = mixed_precision(True, False, "cpu")
    assert dtype == torch.bfloat16 and not scaler.is_enabled() and autocast["enabled"]
    assert mixed_precision(False, True, "cpu")[0] == torch.bfloat16 and mixed_precision(False, False, "cpu")[0] is None
    assert low_precision_dtype("cuda") == torch.float16
    assert iresnet.autocast_dtype is low_precision_dtype and mobilefacenet.autocast_dtype is low_precision_dtype
