"""The backend dispatch and the contract check (real DeepSpeed instances: tests/test_zero.py)."""

import types

import pytest
import torch

from gmt_align.backends import UnsupportedOptimizerError, backend_for, torch_optimizer, zero3, zero12
from gmt_align.backends.layout import Contract
from gmt_align.backends.zero import REFUSALS, refusals_in_config


def test_attach_dispatches_on_the_optimizer_class():
    assert backend_for(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])) is torch_optimizer
    fake_ds = type("DeepSpeedZeroOptimizer_Stage3", (), {"__module__": "deepspeed.runtime.zero.stage3"})()
    assert backend_for(fake_ds) is zero3
    other = type("FP16_Optimizer", (), {"__module__": "deepspeed.runtime.fp16.fused_optimizer"})()
    with pytest.raises(UnsupportedOptimizerError, match="^GMT cannot mask inside DeepSpeed's FP16_Optimizer$"):
        backend_for(other)
    with pytest.raises(UnsupportedOptimizerError, match="^GMT cannot mask inside object$"):
        backend_for(object())


def test_a_renamed_attribute_is_refused_at_attach_in_one_line():
    # a DeepSpeed that renamed an attribute a backend reads must not go on unmasked
    present = {name: None for name in zero12.CONTRACT.optimizer if name != "zenflow"}
    optimizer = types.SimpleNamespace(**{**present, "bit16_groups": [[]]})
    with pytest.raises(UnsupportedOptimizerError) as error:
        zero12.layout(optimizer, [])
    message = str(error.value)
    assert "zenflow" in message and "deepspeed 0.19.8" in message and "\n" not in message
    optimizer.zenflow = False
    assert zero12.CONTRACT.missing(optimizer, [types.SimpleNamespace()]) == ["parameter._hp_mapping"]
    mapping = types.SimpleNamespace(hp_fragment_address=None)
    assert zero12.CONTRACT.missing(optimizer, [types.SimpleNamespace(_hp_mapping=mapping)]) == [
        "_hp_mapping.lp_fragment_address"]


def test_a_conditional_attribute_must_exist_exactly_when_its_condition_holds():
    contract = Contract(checked_with="deepspeed 0.19.8", optimizer=("partial_offload",),
                        conditional={"backup_optimizer": lambda optimizer: optimizer.partial_offload < 1})
    assert contract.missing(types.SimpleNamespace(partial_offload=1.0)) == []
    assert contract.missing(types.SimpleNamespace(partial_offload=0.5)) == ["backup_optimizer (expected present)"]
    assert contract.missing(types.SimpleNamespace(partial_offload=1.0, backup_optimizer=1)) == [
        "backup_optimizer (expected absent)"]


def test_each_refused_json_setting_gives_its_line():
    assert refusals_in_config({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}) == []
    config = {"zero_optimization": {"round_robin_gradients": True, "zenflow": {"topk_ratio": 0.1},
                                    "offload_optimizer": {"device": "nvme"}}, "optimizer": {"type": "Muon"}}
    assert refusals_in_config(config) == list(REFUSALS.values())
