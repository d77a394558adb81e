import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from gptft import GPT, GPTConfig, GPTFTError
from gptft.config import LoRAConfig
from gptft.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_adapter,
    split_state_dict,
)

ALL = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


class Classifier(nn.Module):
    """GPT + a linear head on the last position, like the trainer's classifier."""

    def __init__(self, config: GPTConfig, num_classes: int = 3):
        super().__init__()
        self.gpt = GPT(config)
        self.head = nn.Linear(config.emb_dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.gpt.hidden_states(ids)[:, -1])


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(7))


def perturb(model: nn.Module) -> None:
    """Make every LoRA update nonzero, as after training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)


def test_fresh_wrap_equals_base_and_keeps_keys(tiny_config):
    model = GPT(tiny_config).eval()
    base_keys = set(model.state_dict())
    x = ids()
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    assert len(names) == 4 * tiny_config.n_layers and "h.1.mlp.c_proj" in names
    with torch.no_grad():
        assert torch.equal(model(x), before)
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == set(lora_state_dict(model))
    assert model.h[0].attn.c_attn.lora_A.shape == (4, 32)
    assert model.h[0].attn.c_attn.lora_B.shape == (96, 4)
    assert model.h[0].attn.c_attn.scaling == 2.0


def test_from_linear_shares_base_parameters():
    linear = nn.Linear(5, 3).to(torch.float64)
    lora = LoRALinear.from_linear(linear, rank=2, alpha=2, dropout=0.0)
    assert lora.weight is linear.weight and lora.bias is linear.bias
    assert lora.lora_A.dtype == torch.float64 and lora.lora_B.abs().sum() == 0
    no_bias = LoRALinear.from_linear(nn.Linear(5, 3, bias=False), rank=2, alpha=2)
    assert no_bias.bias is None and "bias" in no_bias._parameters
    assert no_bias.merged().bias is None


def test_merged_equals_unmerged(tiny_config):
    model = GPT(tiny_config).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    x = ids()
    with torch.no_grad():
        base = model(x)
        perturb(model)
        unmerged = model(x)
        assert merge_lora(model) is model
        merged = model(x)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert not any("lora" in k for k in model.state_dict())


def test_split_state_dict_equals_merging_the_modules(tiny_config):
    """The state-dict merge (what a sharded model is saved through) equals merging the modules."""
    from gptft.classifier import GPTClassifier
    from gptft.trainable import set_trainable

    cfg = LoRAConfig(rank=4, alpha=8, targets=ALL)
    model = GPTClassifier(GPT(tiny_config), 2)
    set_trainable(model, "lora", cfg)
    perturb(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter, merged = split_state_dict(model.state_dict(), trainable, cfg)
    # a classifier's adapter keeps its head and the final LayerNorm the head reads, as modules
    assert adapter.keys() == lora_state_dict(model).keys() | {"head.weight", "head.bias",
                                                              "backbone.ln_f.weight", "backbone.ln_f.bias"}
    expected = merge_lora(model).state_dict()
    assert merged.keys() == expected.keys()
    for k in expected:
        assert_close(merged[k], expected[k], atol=0, rtol=0)


def test_only_lora_parameters_get_gradients(tiny_config):
    model = GPT(tiny_config)
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["attn.c_attn", "mlp.c_fc"]))
    model(ids()).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        is_lora = name.endswith(("lora_A", "lora_B"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name


def test_head_target_and_frozen_head(tiny_config):
    model = Classifier(tiny_config)
    names = apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["attn.c_attn", "head"]))
    assert "head" in names and "gpt.lm_head" not in names
    assert isinstance(model.head, LoRALinear)
    model(ids()).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert {"head.lora_A", "head.lora_B"} <= trained

    plain = Classifier(tiny_config)
    apply_lora(plain, LoRAConfig(rank=2, alpha=2, targets=["attn.c_attn"]))
    assert type(plain.head) is nn.Linear and not plain.head.weight.requires_grad  # trainer re-enables


def test_apply_lora_errors(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(GPTFTError, match="match no nn.Linear"):
        apply_lora(model, LoRAConfig(targets=["head"]))
    with pytest.raises(GPTFTError, match="invalid LoRA config.*rank"):
        apply_lora(model, LoRAConfig(rank=0))
    apply_lora(model, LoRAConfig(targets=["attn.c_attn"]))
    with pytest.raises(GPTFTError, match="already applied"):
        apply_lora(model, LoRAConfig(targets=["mlp.c_fc"]))


def trained_classifier(config: GPTConfig, cfg: LoRAConfig) -> Classifier:
    model = Classifier(config)
    apply_lora(model, cfg)
    model.head.requires_grad_(True)
    perturb(model)
    with torch.no_grad():
        model.head.weight.normal_()
    return model.eval()


def test_adapter_round_trip(tiny_config, tmp_path):
    cfg = LoRAConfig(rank=4, alpha=4, dropout=0.1, targets=ALL)
    model = trained_classifier(tiny_config, cfg)
    base_state = {k: v for k, v in model.gpt.state_dict().items() if "lora" not in k}  # frozen: unchanged
    save_adapter(model, tmp_path / "adapter", cfg, extra={"base_model": "tiny", "labels": ["a", "b", "c"]})

    loaded_cfg, extra = read_adapter_config(tmp_path / "adapter")
    assert loaded_cfg == cfg
    assert extra == {"architecture": "gpt2", "base_model": "tiny", "labels": ["a", "b", "c"]}
    fresh = Classifier(tiny_config)  # different head init; same base weights
    fresh.gpt.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    x = ids()
    with torch.no_grad():  # the head's bias travels folded into ln_f's (PEFT's score has none)
        assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)
    assert fresh.head.weight.requires_grad and not fresh.gpt.wte.weight.requires_grad

    full = tmp_path / "full.pt"
    torch.save(model.state_dict(), full)
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size < 0.05 * full.stat().st_size


def test_adapter_errors_name_the_file(tiny_config, tmp_path):
    cfg = LoRAConfig(rank=2, alpha=2, targets=["attn.c_attn"])
    model = GPT(tiny_config)
    with pytest.raises(GPTFTError, match="call apply_lora first"):
        save_adapter(model, tmp_path / "a", cfg)
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "a", cfg)
    weights, config = tmp_path / "a" / ADAPTER_WEIGHTS, tmp_path / "a" / ADAPTER_CONFIG

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(GPTFTError, match=f"{ADAPTER_WEIGHTS}: not a readable safetensors"):
        load_adapter(GPT(tiny_config), tmp_path / "a")
    weights.unlink()
    with pytest.raises(GPTFTError, match=f"{ADAPTER_WEIGHTS}: weights file not found"):
        load_adapter(GPT(tiny_config), tmp_path / "a")
    config.write_text('{"rank": 2, "alpha": 2}')  # not a PEFT config
    with pytest.raises(GPTFTError, match=f"{ADAPTER_CONFIG}: peft_type is None"):
        load_adapter(GPT(tiny_config), tmp_path / "a")
    config.write_text('{"peft_type": "LORA", "r": 2, "use_dora": true}')
    with pytest.raises(GPTFTError, match="missing key lora_alpha; missing key target_modules; use_dora"):
        load_adapter(GPT(tiny_config), tmp_path / "a")
    config.unlink()
    with pytest.raises(GPTFTError, match=f"{ADAPTER_CONFIG}: file not found"):
        load_adapter(GPT(tiny_config), tmp_path / "a")


def test_adapter_mismatch(tiny_config, tmp_path):
    cfg = LoRAConfig(rank=2, alpha=2, targets=["attn.c_attn"])
    model = GPT(tiny_config)
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "a", cfg)
    wider = GPT(GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_layers=2, n_heads=4))
    with pytest.raises(GPTFTError, match=f"{ADAPTER_WEIGHTS}: adapter does not match.*has shape"):
        load_adapter(wider, tmp_path / "a")
    other = GPT(tiny_config)
    apply_lora(other, LoRAConfig(rank=2, alpha=2, targets=["mlp.c_fc"]))
    with pytest.raises(GPTFTError, match="missing h.0.mlp.c_fc.lora_A.*unexpected h.0.attn.c_attn"):
        load_adapter(other, tmp_path / "a")
    ranked = GPT(tiny_config)
    apply_lora(ranked, LoRAConfig(rank=4, alpha=2, targets=["attn.c_attn"]))
    with pytest.raises(GPTFTError, match="differ from rank 2"):
        load_adapter(ranked, tmp_path / "a")


def test_merged_export_parity(tiny_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = GPT(tiny_config).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    perturb(model)
    x = ids()
    with torch.no_grad():
        expected = model(x)
    merge_lora(model).save_pretrained(tmp_path / "merged")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(hf(x).logits, expected, atol=1e-5, rtol=0)


def test_dropout_only_in_train_mode():
    lora = LoRALinear.from_linear(nn.Linear(16, 8), rank=4, alpha=4, dropout=0.5)
    x = torch.randn(32, 16)
    base = nn.functional.linear(x, lora.weight, lora.bias)
    lora.train()
    assert torch.equal(lora(x), base)  # B = 0: dropout never touches the base path
    with torch.no_grad():
        lora.lora_B.normal_()
    assert not torch.equal(lora(x), lora(x))
    lora.eval()
    assert torch.equal(lora(x), lora(x))
    assert_close(lora(x), lora.merged()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets, fraction", [(ALL, 0.01896), (["attn.c_attn", "attn.c_proj"], 0.00711)])
def test_trainable_fraction_gpt2_small(targets, fraction):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(GPTConfig.from_name("gpt2-small"))
    total = model.num_parameters()
    apply_lora(model, LoRAConfig(rank=16, alpha=16, targets=targets))
    trainable = model.num_parameters(trainable_only=True)
    per_layer = {"attn.c_attn": 768 + 2304, "attn.c_proj": 768 + 768, "mlp.c_fc": 768 + 3072,
                 "mlp.c_proj": 3072 + 768}
    assert trainable == 12 * 16 * sum(per_layer[t] for t in targets)
    assert trainable == sum(v.numel() for v in lora_state_dict(model).values())
    assert trainable / total == pytest.approx(fraction, abs=1e-5)
    assert trainable < 0.05 * total
