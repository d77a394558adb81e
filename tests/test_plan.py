"""The memory planner (gptft/plan.py) and ``gptft plan``: parameter counts equal the real models',
the parts add up, what it suggests fits, the command's text and JSON; and (slow) its peak within
±15% of the measured CPU peak of real runs of two families x full / LoRA x checkpointing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptft.cli import main
from gptft.config import LoRAConfig
from gptft.errors import GPTFTError
from gptft.plan import Setup, Shape, fixes, parse_bytes, plan, trainable_params

ROOT = Path(__file__).resolve().parents[1]


def _qwen3():
    from gptft.models import build_model, preset_config

    return build_model(preset_config("qwen3-0.6b", emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                     head_dim=16, intermediate_size=96, vocab_size=300,
                                     context_length=64))


def _gpt2():
    from gptft.model import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4))


@pytest.mark.parametrize("build", [_gpt2, _qwen3])
def test_parameter_counts_equal_the_models(build):
    from gptft.lora import apply_lora
    from gptft.trainable import set_trainable

    model = build()
    shape = Shape.from_model(model)
    assert shape.params() == model.num_parameters()
    set_trainable(model, "last_block")
    assert trainable_params(shape, Setup(trainable="last_block")) == model.num_parameters(True)
    apply_lora(model, LoRAConfig(rank=4))  # every linear layer of every block
    assert trainable_params(shape, Setup(trainable="lora", lora_rank=4)) == model.num_parameters(True)


def test_a_hugging_face_config_gives_the_same_shape():
    shape = Shape.from_model(_qwen3())
    from gptft.models.families import to_hf_config

    assert Shape.from_hf_config(to_hf_config(_qwen3().config)) == shape


def test_parts_add_up_and_checkpointing_lora_and_fsdp_cut_the_peak():
    shape = dataclasses.replace(Shape.from_model(_qwen3()), n_layers=12)
    base = Setup(batch_size=8, seq_len=64, grad_accum_steps=2, gpus=4)
    p = plan(shape, base)
    parts = p.parts
    # with accumulation everything at once, but the loss's and the backward's temporaries
    assert p.peak == pytest.approx(sum(parts.values()) - min(parts["loss"], parts["backward"]))
    assert parts["gradients"] == 4 * p.total_params and parts["optimizer"] == 8 * p.total_params
    ckpt = plan(shape, dataclasses.replace(base, activation_checkpointing=True))
    assert ckpt.parts["activations"] < 0.5 * parts["activations"]
    every_other = plan(shape, dataclasses.replace(base, activation_checkpointing=2))
    assert ckpt.parts["activations"] < every_other.parts["activations"] < parts["activations"]
    lora = plan(shape, dataclasses.replace(base, trainable="lora", lora_rank=4))
    assert lora.parts["optimizer"] == 8 * shape.lora_params(4) < 0.2 * parts["optimizer"]
    fsdp = plan(shape, dataclasses.replace(base, fsdp=True))
    assert fsdp.parts["optimizer"] == pytest.approx(parts["optimizer"] / 4)
    offload = plan(shape, dataclasses.replace(base, fsdp=True, cpu_offload=True))
    assert offload.parts["optimizer"] == 0 and offload.peak < fsdp.peak
    dpo = plan(shape, dataclasses.replace(base, pairs=True, dpo_reference="model"))
    assert dpo.parts["reference"] == parts["weights"]
    assert dpo.parts["activations"] == pytest.approx(2 * parts["activations"])  # two sequences a pair


def test_every_suggested_setting_fits_with_the_same_global_batch():
    shape = Shape.from_model(_qwen3())
    setup = Setup(batch_size=16, seq_len=64, grad_accum_steps=1)
    budget = 0.6 * plan(shape, setup).peak
    found = fixes(shape, setup, budget)
    assert found
    for option, p in found:
        assert p.peak <= budget
        assert p.setup.batch_size * p.setup.grad_accum_steps == 16, option


def test_sizes():
    assert parse_bytes("80GB") == 80e9 and parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(GPTFTError, match="--gpu-memory"):
        parse_bytes("lots")


def test_plan_command_text_and_json(capsys):
    config = str(ROOT / "configs" / "instruct.yaml")
    assert main(["plan", "--config", config, "--gpu-memory", "8GB"]) == 0
    text = capsys.readouterr().out
    assert "peak" in text and "does not fit" in text and "train.activation_checkpointing=true" in text
    assert main(["plan", "--config", config, "model.trainable=lora", "--gpus", "8",
                 "--gpu-memory", "80GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["setup"]["fsdp"] is True and out["setup"]["gpus"] == 8
    b = out["bytes"]
    assert out["peak_bytes"] == pytest.approx(sum(b[k] for k in (
        "weights", "optimizer", "best_copy", "reference", "runtime")) + max(
        b["activations"] + max(b["loss"], b["backward"]), b["gradients"]), abs=2)


def test_plan_command_errors_are_one_line(capsys):
    config = str(ROOT / "configs" / "instruct.yaml")
    assert main(["plan", "--config", config, "--gpu-memory", "a lot"]) != 0
    assert main(["plan", "--config", config, "--gpus", "0"]) != 0
    assert main(["plan", "--config", config, "train.batch_size=0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "--gpu-memory" in err[0] and "--gpus" in err[1] and "train.batch_size" in "".join(err[2:])
    assert "Traceback" not in "".join(err)


@pytest.mark.slow
def test_the_plan_is_within_15_percent_of_the_measured_peak():
    """benchmarks/plan_check.py: 8 real CPU runs (GPT-2 classifier and Qwen3 language model, full
    and LoRA, with and without activation checkpointing), two at a time (each measures its own
    process's peak); minutes on a loaded machine."""
    out = subprocess.run([sys.executable, "benchmarks/plan_check.py", "--jobs", "2", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == 8
    for r in results:
        assert 0.85 <= r["ratio"] <= 1.15, r
