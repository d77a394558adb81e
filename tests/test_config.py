from pathlib import Path

import pytest

from gptft.config import (
    job_from_dict,
    job_to_dict,
    job_to_yaml,
    load_job,
)
from gptft.errors import GPTFTError
from gptft.tasks.classification.config import ClassificationJob
from gptft.tasks.instruction.config import InstructionJob
from gptft.tasks.preference.config import PreferenceJob

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_and_documents_its_launch(path):
    job = load_job(path)
    assert isinstance(job, (ClassificationJob, InstructionJob, PreferenceJob))
    assert path.read_text().startswith("#") and "launch/finetune.py" in path.read_text().split("\n\n")[0]


def test_book_settings():
    spam = load_job(Path(__file__).resolve().parents[1] / "configs" / "spam.yaml")
    assert (spam.model.name, spam.model.weights, spam.model.trainable) == ("gpt2-small", "pretrained",
                                                                           "last_block")
    assert (spam.train.batch_size, spam.train.epochs, spam.train.lr, spam.train.weight_decay) == (
        8, 5, 5e-5, 0.1)
    inst = load_job(Path(__file__).resolve().parents[1] / "configs" / "instruct.yaml")
    assert (inst.model.name, inst.train.epochs, inst.train.lr, inst.train.batch_size) == (
        "gpt2-medium", 2, 5e-5, 8)
    assert (inst.data.prompt_style, inst.data.max_length) == ("alpaca", 1024)


def test_yaml_is_the_serialized_form(tmp_path):
    job = job_from_dict({"task": "instruction", "train": {"lr": 3e-4}, "lora": {"rank": 4}})
    (tmp_path / "j.yaml").write_text(job_to_yaml(job))
    assert job_to_dict(load_job(tmp_path / "j.yaml")) == job_to_dict(job)


def test_overrides_are_typed(tmp_path):
    (tmp_path / "j.yaml").write_text("task: classification\n")
    job = load_job(tmp_path / "j.yaml", ["train.epochs=1", "model.weights=random", "model.n_layers=4",
                                          "train.lr=1e-3", "train.resume=true", "data.labels=[a, b]"])
    assert (job.train.epochs, job.model.n_layers, job.train.lr, job.train.resume) == (1, 4, 1e-3, True)
    assert job.data.labels == ["a", "b"]
    job = load_job(tmp_path / "j.yaml", ["train.resume=runs/x/checkpoints/step-00000010"])
    assert job.train.resume == "runs/x/checkpoints/step-00000010"


def test_every_problem_reported_at_once_with_lines(tmp_path):
    (tmp_path / "j.yaml").write_text("task: classification\ntrain:\n  lr: -1\n  batch_size: 0\n"
                                     "  epochs: two\nmodel:\n  trainable: some\n  colour: red\n")
    with pytest.raises(GPTFTError) as e:
        load_job(tmp_path / "j.yaml", ["data.prompt_style=alpaca", "train.seed=x"])
    msg = str(e.value)
    assert "7 problem(s)" in msg
    assert "(override): train.seed: expected an integer" in msg
    assert "j.yaml:3: train.lr: must be > 0" in msg
    assert "j.yaml:4: train.batch_size: must be > 0" in msg
    assert "j.yaml:5: train.epochs: expected an integer, got 'two'" in msg
    assert "j.yaml:7: model.trainable: must be one of" in msg
    assert "j.yaml:8: model.colour: unknown key" in msg
    assert "(override): data.prompt_style: unknown key" in msg


def test_yaml_syntax_error_names_the_line(tmp_path):
    (tmp_path / "j.yaml").write_text("task: classification\ntrain:\n  lr: [1, 2\n  x: 1\n")
    with pytest.raises(GPTFTError, match=r"j.yaml:\d+:\d+: YAML syntax error"):
        load_job(tmp_path / "j.yaml")


def test_consistency_checks():
    with pytest.raises(GPTFTError, match="n_layers: only with weights=random"):
        job_from_dict({"task": "classification", "model": {"n_layers": 2}})
    with pytest.raises(GPTFTError, match=r"split: three fractions \(train, val, test\) > 0 summing to 1"):
        job_from_dict({"task": "classification", "data": {"split": [0.5, 0.5, 0.5]}})
    with pytest.raises(GPTFTError, match="override 'lr': expected dotted.key=value"):
        load_job(CONFIGS[0], ["lr"])


def test_yaml_words_for_choices_and_overrides_into_values(tmp_path):
    (tmp_path / "j.yaml").write_text("task: classification\ntrain:\n  lr: 0.001\n")
    assert load_job(tmp_path / "j.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(GPTFTError, match=r"\(override\): train.lr.x: train.lr is a value, not a section"):
        load_job(tmp_path / "j.yaml", ["train.lr.x=5"])
    with pytest.raises(GPTFTError, match="train.epoch: unknown key; did you mean train.epochs"):
        load_job(tmp_path / "j.yaml", ["train.epoch=3"])
    with pytest.raises(GPTFTError, match="train.lr: must be a finite number"):
        load_job(tmp_path / "j.yaml", ["train.lr=.inf"])
    with pytest.raises(GPTFTError, match=r"\(override\): model.name: expected a string, got \{'x': 1\}"):
        load_job(tmp_path / "j.yaml", ["model.name.x=1"])  # a key the file does not set


def test_instruction_data_format(tmp_path):
    job = job_from_dict({"task": "instruction", "data": {"format": "jsonl"}})
    assert job.data.format == "jsonl"
    with pytest.raises(GPTFTError, match="data.format: must be one of auto, json, jsonl"):
        job_from_dict({"task": "instruction", "data": {"format": "csv"}})


def test_one_engine_for_adapter_configs_and_command_options(tmp_path):
    import json

    from gptft.config import LoRAConfig
    from gptft.lora import read_adapter_config
    from gptft.validation import build

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": "4", "lora_alpha": 8, "target_modules": ["attn.c_attn", "mlp.cfc"]}))
    with pytest.raises(GPTFTError, match=r"adapter_config.json: rank: expected an integer.*mlp.cfc"):
        read_adapter_config(tmp_path)
    obj, problems = build(LoRAConfig, {"rank": 0, "colour": 1})
    assert problems == ["colour: unknown key (known: alpha, dropout, rank, targets)",
                        "rank: must be > 0 (got 0)"]
