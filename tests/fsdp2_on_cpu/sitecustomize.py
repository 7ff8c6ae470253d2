"""Tests only: let accelerate run its FSDP path on CPU ranks (gloo), where it otherwise never does.

accelerate 1.15 enables FSDP only for accelerator device types (``MULTI_GPU``, ``MULTI_XPU``, ...):
on a machine without one, ``accelerate launch`` with an FSDP config gives ``DistributedType.NO`` in
each rank (``MULTI_CPU``, plain DDP, with ``--use_cpu``), and the Trainer trains without FSDP. No
configuration or environment variable changes that. With this folder first on ``PYTHONPATH`` (so
Python imports this file at start-up) and ``GMT_TEST_FSDP_ON_CPU=1``, a rank that accelerate's
launcher started with an FSDP config gets ``("gloo", MULTI_GPU)`` from accelerate's backend choice
(``PartialState._prepare_backend``), and ``ACCELERATE_TORCH_DEVICE=cpu`` names its device. That
one answer is all that is replaced: ``accelerate launch``, its FSDP plugin and
``fsdp2_prepare_model`` (``fully_shard``), the Trainer and GMT run as shipped.
"""

import os

if os.environ.get("GMT_TEST_FSDP_ON_CPU") == "1" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
        and "LOCAL_RANK" in os.environ:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def _gloo_as_a_device(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    PartialState._prepare_backend = _gloo_as_a_device
