"""gptft's LoRA adapters are PEFT adapters: peft loads gptft's onto transformers' GPT-2, gptft loads
peft's, with equal logits both ways (language models and classifiers)."""

import json

import pytest
import torch
from torch.testing import assert_close

from gptft.classifier import GPTClassifier
from gptft.config import LoRAConfig
from gptft.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter_config, save_adapter
from gptft.model import GPT
from gptft.trainable import set_trainable

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # parity with a peer library (and importing peft costs seconds)


class _Peft:
    """``peft``, imported by the first test that uses it, not when the suite is collected."""

    def __getattr__(self, name):
        return getattr(pytest.importorskip("peft"), name)


peft = _Peft()

ALL = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _ids(n=3, length=12):
    return torch.randint(0, 50257, (n, length), generator=torch.Generator().manual_seed(5))


def _perturb(model):
    """Nonzero LoRA updates (and a nonzero head bias), as after training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name == "head.bias":
                p.normal_(std=0.05)


def test_gptft_lm_adapter_loads_in_peft(tiny_config, tmp_path):
    base = GPT(tiny_config).eval()
    base.save_pretrained(tmp_path / "base")
    model = GPT.from_pretrained(tmp_path / "base").eval()
    cfg = LoRAConfig(rank=4, alpha=8, targets=ALL)
    set_trainable(model, "lora", cfg)
    _perturb(model)
    save_adapter(model, tmp_path / "adapter", cfg, extra={"base_model": str(tmp_path / "base")})
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == \
        ("LORA", 4, 8, True)
    assert config["target_modules"] == ALL and config["base_model_name_or_path"] == str(tmp_path / "base")

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = _ids()
    with torch.no_grad():
        expected = model.eval()(x)
        assert_close(peft_model(input_ids=x).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(base(x), expected, atol=1e-3)  # the adapter changes the model


def test_peft_lm_adapter_loads_in_gptft(tiny_config, tmp_path):
    GPT(tiny_config).save_pretrained(tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                           task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, lora)
    _perturb(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    cfg, extra = read_adapter_config(tmp_path / "peft")
    assert sorted(cfg.targets) == ["c_attn", "c_proj"] and cfg.alpha / cfg.rank == 4

    model = GPT.from_pretrained(tmp_path / "base")
    load_adapter(model, tmp_path / "peft")
    x = _ids()
    with torch.no_grad():
        assert_close(model.eval()(x), peft_model.eval()(input_ids=x).logits, atol=1e-5, rtol=0)


def _hf_classifier(folder, num_labels):
    return transformers.GPT2ForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, pad_token_id=50256)


def test_gptft_classifier_adapter_loads_in_peft(tiny_config, tmp_path):
    GPT(tiny_config).save_pretrained(tmp_path / "base")
    model = GPTClassifier(GPT.from_pretrained(tmp_path / "base"), 3)
    cfg = LoRAConfig(rank=4, alpha=8, targets=[*ALL, "head"])  # a LoRA head is saved merged
    set_trainable(model, "lora", cfg)
    _perturb(model)
    with torch.no_grad():
        model.head.lora_B.normal_(std=0.05)
    save_adapter(model, tmp_path / "adapter", cfg)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score", "ln_f"]
    assert "head" not in config["target_modules"]

    peft_model = peft.PeftModel.from_pretrained(_hf_classifier(tmp_path / "base", 3), tmp_path / "adapter")
    x, lengths = _ids(), torch.tensor([12, 7, 3])
    x[1, 7:] = x[2, 3:] = 50256  # right padding with the end-of-text id
    with torch.no_grad():
        expected = model.eval()(x, lengths)
        assert_close(peft_model.eval()(input_ids=x).logits, expected, atol=1e-5, rtol=0)

    rebuilt = GPTClassifier(GPT.from_pretrained(tmp_path / "base"), 3)  # and back into gptft
    load_adapter(rebuilt, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(rebuilt.eval()(x, lengths), expected, atol=1e-5, rtol=0)


def test_peft_classifier_adapter_loads_in_gptft(tiny_config, tmp_path):
    GPT(tiny_config).save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                           task_type="SEQ_CLS")
    peft_model = peft.get_peft_model(_hf_classifier(tmp_path / "base", 2), lora)
    _perturb(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = GPTClassifier(GPT.from_pretrained(tmp_path / "base"), 2)
    load_adapter(model, tmp_path / "peft")
    x, lengths = _ids(), torch.tensor([12, 12, 12])
    with torch.no_grad():
        assert_close(model.eval()(x, lengths), peft_model.eval()(input_ids=x).logits, atol=1e-5, rtol=0)


def test_unsupported_peft_configs_are_named(tmp_path):
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"")
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "c_attn", "bias": "all"}))
    from gptft.errors import GPTFTError

    with pytest.raises(GPTFTError, match="bias: 'all' is not supported.*regular expression"):
        read_adapter_config(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(GPTFTError, match="peft_type is 'IA3'"):
        read_adapter_config(tmp_path)


@pytest.mark.slow
def test_finetune_continues_from_a_peft_adapter(tiny_config, tmp_path):
    """``model.adapter``: a peft adapter of a transformers GPT-2 is loaded and trained on; its
    LoRA config replaces the job's (lr ~ 0: the run's merged model is the adapted one)."""
    from pathlib import Path

    from gptft.cli import main
    from gptft.runs import load_gpt

    GPT(tiny_config).save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True,
                           task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), lora)
    _perturb(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"} for i in range(20)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    configs = Path(__file__).resolve().parents[1] / "configs"
    args = ["finetune", "--config", str(configs / "instruct-lora.yaml"),
            f"model.checkpoint={tmp_path / 'base'}", f"model.adapter={tmp_path / 'peft'}",
            f"data.path={tmp_path / 'data.json'}", "train.lr=1e-12", "train.max_steps=1",
            "train.batch_size=4", "train.eval_every=0", "train.device=cpu", "data.max_length=null",
            "generate.max_new_tokens=1", f"output_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    cfg, _ = read_adapter_config(tmp_path / "run" / "adapter")
    assert (cfg.rank, cfg.alpha, cfg.targets) == (2, 6, ["attn.c_attn"])  # the adapter's, not lora.*
    model, _ = load_gpt(tmp_path / "run")
    x = _ids()
    with torch.no_grad():
        assert_close(model(x), peft_model.eval()(input_ids=x).logits, atol=1e-5, rtol=0)
    assert main([*args[:-1], "model.trainable=all", f"output_dir={tmp_path / 'other'}"]) == 2
