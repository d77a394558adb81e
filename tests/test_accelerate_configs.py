"""The example Accelerate configs load with Accelerate's own config class and say what the docs say."""

from pathlib import Path

import pytest

ClusterConfig = pytest.importorskip("accelerate.commands.config.config_args").ClusterConfig

ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def load(name: str):
    return ClusterConfig.from_yaml_file(str(ACCELERATE / name))


def test_all_configs_present():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == [
        "cpu.yaml", "fsdp.yaml", "multi-gpu.yaml", "multi-node.yaml", "single.yaml"]


def test_cpu():
    c = load("cpu.yaml")
    assert str(c.distributed_type) in ("NO", "DistributedType.NO")
    assert c.use_cpu is True and c.num_processes == 1 and c.num_machines == 1


def test_single():
    c = load("single.yaml")
    assert str(c.distributed_type) in ("NO", "DistributedType.NO")
    assert c.use_cpu is False and c.num_processes == 1 and c.num_machines == 1


@pytest.mark.slow
def test_readme_launch_gives_no_warning_and_no_launcher_traceback(tmp_path):
    """The README's ``accelerate launch -q --config_file ...``: Accelerate warns of no defaults
    used, and a failing job ends with gptft's one-line error, not the launcher's traceback."""
    import subprocess
    import sys

    from conftest import cpu_launch_env

    root = ACCELERATE.parents[1]
    env = {k: v for k, v in cpu_launch_env().items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
                           str(ACCELERATE / "single.yaml"), str(root / "launch" / "finetune.py"),
                           "--config", str(root / "configs" / "spam-tiny.yaml"), "train.epochs=0",
                           f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "train.epochs: must be > 0 (got 0)" in proc.stderr
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    assert "were not passed to `accelerate launch`" not in proc.stderr + proc.stdout


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
    assert "fsdp_transformer_layer_cls_to_wrap" not in f  # each model's own block class
    assert f["fsdp_use_orig_params"] is True
    assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_multi_node():
    c = load("multi-node.yaml")
    assert c.distributed_type == "MULTI_GPU"
    assert c.num_machines == 2 and c.num_processes % 2 == 0 and c.machine_rank == 0
    assert c.main_process_ip and c.main_process_port == 29500


@pytest.mark.parametrize("name", ["gpt2-small", "qwen3-0.6b", "llama-3.2-1b", "gemma-3-1b"])
def test_fsdp_wraps_each_familys_block(name):
    """With no class named in the config, Accelerate's transformer policy wraps the family's
    block (the models' _no_split_modules), for a language model and a classifier alike."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from gptft.classifier import GPTClassifier
    from gptft.models import build_model, preset_config

    shape = dict(vocab_size=100, n_layers=2, emb_dim=32, n_heads=2, context_length=32)
    if not name.startswith("gpt2"):
        shape.update(n_kv_heads=1, head_dim=16, intermediate_size=64)
    model = build_model(preset_config(name, **shape))
    for wrapped in (model, GPTClassifier(model, 2)):
        plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap", fsdp_version=1)
        plugin.set_auto_wrap_policy(wrapped)
        assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {model.block_class}
