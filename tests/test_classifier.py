import pytest
import torch
from torch.testing import assert_close

from gptft import GPT
from gptft.classifier import GPTClassifier
from gptft.config import LoRAConfig
from gptft.errors import GPTFTError
from gptft.trainable import set_trainable


def test_pools_the_last_real_token(tiny_config):
    model = GPTClassifier(GPT(tiny_config), 2).eval()
    a = torch.randint(0, 50257, (1, 5))
    padded = torch.cat([a, torch.full((1, 6), 50256)], dim=1)
    with torch.no_grad():
        alone = model(a, torch.tensor([5]))
        in_batch = model(padded, torch.tensor([5]))
        at_last_position = model.head(model.backbone.hidden_states(padded)[:, -1])
    assert_close(in_batch, alone, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(at_last_position, alone)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("policy,expected", [
    ("head", {"head.weight", "head.bias"}),
    ("last_block", {"head.weight", "head.bias", "backbone.ln_f.weight", "backbone.ln_f.bias"}
     | {f"backbone.h.1.{n}" for n in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight",
                                      "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
                                      "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                                      "mlp.c_proj.weight", "mlp.c_proj.bias")}),
])
def test_trainable_policies_freeze_exactly(tiny_config, policy, expected):
    model = GPTClassifier(GPT(tiny_config), 2)
    n = set_trainable(model, policy)
    assert trainable_names(model) == expected
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_last_two_blocks_and_all(tiny_config):
    tiny_config.n_layers = 3
    model = GPTClassifier(GPT(tiny_config), 2)
    set_trainable(model, "last_two_blocks")
    names = trainable_names(model)
    assert any(n.startswith("backbone.h.1.") for n in names)
    assert any(n.startswith("backbone.h.2.") for n in names)
    assert not any(n.startswith(("backbone.h.0.", "backbone.wte", "backbone.wpe")) for n in names)
    set_trainable(model, "all")
    assert names < trainable_names(model) == {n for n, _ in model.named_parameters()}


def test_lora_policy_trains_adapters_and_head(tiny_config):
    model = GPTClassifier(GPT(tiny_config), 2)
    set_trainable(model, "lora", LoRAConfig(rank=2))
    names = trainable_names(model)
    assert {"head.weight", "head.bias"} <= names
    assert all("lora_" in n or n.startswith("head.") for n in names)


def test_head_policy_without_head(tiny_config):
    with pytest.raises(GPTFTError, match="no parameter to train"):
        set_trainable(GPT(tiny_config), "head")


def test_loading_a_classifier_draws_no_random_initialisation(tiny_config, tmp_path):
    """A saved classifier is rebuilt on ``meta`` and its weights loaded into empty storage: no
    random initialisation is computed only to be overwritten (the global RNG is untouched)."""
    from gptft.classifier import load_classifier
    from gptft.runs import save_model

    model = GPTClassifier(GPT(tiny_config), 2)
    save_model(tmp_path, model, {"task": "classification", "model": tiny_config.to_dict(),
                                 "tokenizer": "gpt2", "labels": ["ham", "spam"], "max_length": 16})
    (tmp_path / ".gptft-run").write_text('{"state": "finished"}')
    before = torch.get_rng_state()
    loaded = load_classifier(tmp_path).model
    assert torch.equal(torch.get_rng_state(), before)
    assert loaded.backbone.lm_head.weight is loaded.backbone.wte.weight
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
