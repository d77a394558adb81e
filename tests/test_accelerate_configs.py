"""The example Accelerate configs load with Accelerate's own config class and say what the docs say."""

from pathlib import Path

import pytest

ClusterConfig = pytest.importorskip("accelerate.commands.config.config_args").ClusterConfig

ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def load(name: str):
    return ClusterConfig.from_yaml_file(str(ACCELERATE / name))


def test_all_configs_present():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == [
        "cpu.yaml", "fsdp.yaml", "multi-gpu.yaml", "multi-node.yaml"]


def test_cpu():
    c = load("cpu.yaml")
    assert str(c.distributed_type) in ("NO", "DistributedType.NO")
    assert c.use_cpu is True and c.num_processes == 1 and c.num_machines == 1


def test_multi_gpu():
    c = load("multi-gpu.yaml")
    assert c.distributed_type == "MULTI_GPU"
    assert c.num_processes == 8 and c.num_machines == 1 and c.mixed_precision == "bf16"
    assert c.use_cpu is False


def test_fsdp():
    c = load("fsdp.yaml")
    assert c.distributed_type == "FSDP" and c.mixed_precision == "bf16"
    f = c.fsdp_config
    assert f["fsdp_version"] in (1, 2)
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_transformer_layer_cls_to_wrap"] == "Block"
    assert f["fsdp_use_orig_params"] is True
    assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_fsdp_wraps_a_real_class():
    from gptft import model

    name = load("fsdp.yaml").fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert isinstance(getattr(model, name), type)


def test_multi_node():
    c = load("multi-node.yaml")
    assert c.distributed_type == "MULTI_GPU"
    assert c.num_machines == 2 and c.num_processes % 2 == 0 and c.machine_rank == 0
    assert c.main_process_ip and c.main_process_port == 29500
