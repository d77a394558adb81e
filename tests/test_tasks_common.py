"""``save_final``: the run folder's weights from a compiled and/or LoRA model, without compiling."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.testing import assert_close

from gptft import GPT, load_classifier
from gptft.classifier import GPTClassifier
from gptft.config import load_job
from gptft.io import load_safetensors
from gptft.lora import merge_lora
from gptft.run import save_final
from gptft.trainable import set_trainable

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_save_final_of_a_compiled_lora_classifier(tiny_config, tmp_path):
    job = load_job(CONFIGS / "spam-tiny.yaml", ["model.trainable=lora", f"output_dir={tmp_path}"])
    model = GPTClassifier(GPT(tiny_config), 2)
    set_trainable(model, "lora", job.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    accelerator = Accelerator(cpu=True)
    compiled = accelerator.prepare(torch.compile(model))  # wrapped, not compiled: no forward runs
    meta = {"task": "classification", "model": tiny_config.to_dict(), "tokenizer": "gpt2",
            "labels": ["ham", "spam"], "max_length": 16}
    save_final(accelerator, compiled, job, meta, {"test_accuracy": 0.5})

    adapter = load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")  # PEFT's names
    assert {"base_model.model.score.weight", "base_model.model.transformer.ln_f.bias"} <= adapter.keys()
    modules = ("base_model.model.score.", "base_model.model.transformer.ln_f.")
    assert all(".lora_" in k or k.startswith(modules) for k in adapter)  # no "_orig_mod."
    saved = load_safetensors(tmp_path / "model.safetensors")
    expected = {k: v for k, v in merge_lora(model).state_dict().items() if k != "backbone.lm_head.weight"}
    assert saved.keys() == expected.keys()  # no "_orig_mod." prefix, no LoRA tensors
    for k in expected:
        assert_close(saved[k], expected[k], atol=0, rtol=0)
    ids = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        lengths = torch.tensor([8, 5])
        assert_close(load_classifier(tmp_path).model(ids, lengths), model(ids, lengths), atol=1e-6, rtol=0)
