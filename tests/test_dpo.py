"""Preference tuning (DPO): the loss and reward metrics against TRL's own implementation, the
per-response log-probabilities against a plain ``transformers`` forward, the data and batching,
a run started from a gptft instruction run folder, the reference without a second model,
kill-and-resume bit for bit and 1-vs-2-process equality."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    assert_only_known_run_files,
    cpu_launch_env,
    free_port,
    launcher,
    run_results,
    shared_path,
)
from safetensors.torch import load_file
from torch.testing import assert_close

from gptft.cli import main
from gptft.config import load_job
from gptft.data.collate import preference_collate
from gptft.data.preference import PreferenceDataset, load_preference_data
from gptft.errors import GPTFTError
from gptft.model import GPT, IGNORE_INDEX, GPTConfig
from gptft.prompts import format_prompt
from gptft.runs import save_model
from gptft.tasks.base import build_gpt
from gptft.tasks.preference.config import DPOConfig, PreferenceData
from gptft.tasks.preference.task import PreferenceTask, dpo_losses, preference_metrics, response_logps
from gptft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPE = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_layers=2, n_heads=2)
N_PAIRS = 40  # split 85/5/10 in file order: 34 train, 2 validation, 4 test
# Each run: batches of 4 pairs (8 sequences), evaluations mid-epoch, every step logged.
RUN = ["train.batch_size=4", "train.eval_every=3", "train.log_every=1", "train.lr=1e-3",
       "data.max_length=96", "generate.max_new_tokens=3", "generate.batch_size=4",
       "model.drop_rate=0.0", "train.schedule=constant", "train.warmup_steps=0", "train.epochs=1"]
METRICS = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
           "logp_chosen", "logp_rejected")


def _pairs(n: int = N_PAIRS) -> list[dict]:
    """The first `n` pairs of the book's preference data whose two responses differ."""
    records = json.loads(shared_path("data", "instruction-data-with-preference.json").read_text())
    return [r for r in records if r["chosen"] != r["rejected"]][:n]


def _start_run(folder: Path, drop_rate: float = 0.0) -> Path:
    """A finished instruction run folder holding a random tiny GPT: the model DPO starts from."""
    torch.manual_seed(7)
    folder.mkdir(parents=True, exist_ok=True)
    config = GPTConfig(**{**SHAPE.to_dict(), "drop_rate": drop_rate})
    save_model(folder, GPT(config), {"task": "instruction", "model": config.to_dict(),
                                     "tokenizer": "gpt2", "prompt_style": "alpaca"})
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(_pairs()))
    return path


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    return _start_run(tmp_path_factory.mktemp("start") / "instruct")


def _args(start: Path, data: Path, out: Path, *more: str) -> list[str]:
    return ["finetune", "--config", str(CONFIGS / "dpo-tiny.yaml"), f"model.checkpoint={start}",
            f"data.path={data}", *RUN, f"output_dir={out}", *more]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _step_losses(run: Path) -> list[float]:
    return [r["train/loss"] for r in _log(run) if "train/lr" in r]


# ---- the loss and the metrics: TRL's own implementation -------------------------------------------

def _trl(logps: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor, cfg: DPOConfig,
         loss_type: str) -> dict[str, float]:
    """TRL's ``DPOTrainer._compute_loss`` on the given summed log-probabilities (B, 2) (chosen,
    rejected), its reference ones and the responses' token counts, run unbound on a stand-in
    trainer and model: its loss and the reward and log-probability metrics it logs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T = len(logps), int(tokens.max()) + 4
    counts = torch.cat([tokens[:, 0], tokens[:, 1]])  # rows: [chosen; rejected], as TRL batches them
    completion_mask = (torch.arange(T) >= T - counts[:, None]).long()  # the prompt first
    per_token = torch.zeros(2 * B, T - 1, dtype=logps.dtype)
    per_token[:, -1] = torch.cat([logps[:, 0], logps[:, 1]])  # a row's sum: the given value
    zeros = torch.zeros(2 * B, T - 1)

    def model(**kwargs):  # what TRL reads of a forward's outputs
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    identity = lambda x: x  # one process: gathering returns the tensor itself
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    names = {"reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected",
             "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies",
             "logp_chosen": "logps/chosen", "logp_rejected": "logps/rejected"}
    return {"loss": loss.item(), **{ours: logged[theirs] for ours, theirs in names.items()}}


def _ours(logps, ref, tokens, cfg: DPOConfig) -> dict[str, float]:
    losses, rewards = dpo_losses(logps, ref, tokens, cfg)
    return preference_metrics({"loss": losses, "reward_chosen": rewards[:, 0],
                               "reward_rejected": rewards[:, 1], "logp_chosen": logps[:, 0],
                               "logp_rejected": logps[:, 1]})


def _fixed_batch(B: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of B pairs (float64: the formulas, not rounding, are compared),
    the reference's, and token counts; some pairs the model already prefers the wrong way."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(5, 60, (B, 2), generator=g)
    ref = -tokens * (1.5 + torch.rand(B, 2, generator=g, dtype=torch.float64))
    logps = ref + 8 * torch.randn(B, 2, generator=g, dtype=torch.float64)
    return logps, ref, tokens


@pytest.mark.slow  # importing TRL takes seconds
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_metrics_equal_trl(loss_type, beta):
    logps, ref, tokens = _fixed_batch()
    cfg = DPOConfig(beta=beta, loss_type=loss_type)
    trl, ours = _trl(logps, ref, tokens, cfg, loss_type), _ours(logps, ref, tokens, cfg)
    assert 0 < ours["reward_accuracy"] < 1  # both kinds of pair are in the batch
    for name in METRICS:
        assert ours[name] == pytest.approx(trl[name], abs=1e-6), name


@pytest.mark.slow
def test_conservative_dpo_equals_trl():
    """Label smoothing ε: -(1 - ε) log σ(βΔ) - ε log σ(-βΔ) (conservative DPO). TRL 1.x computes
    this form in its ``aot`` loss, on the pairs sorted by their log-ratios; where the model's and
    the reference's log-ratios sort the pairs alike (as here), that is conservative DPO itself."""
    logps, ref, tokens = _fixed_batch()
    ref[:, 0] = ref[:, 1] + 0.3 * (logps[:, 0] - logps[:, 1]) - 1.0  # the same order of pairs
    assert torch.equal((logps[:, 0] - logps[:, 1]).argsort(), (ref[:, 0] - ref[:, 1]).argsort())
    cfg = DPOConfig(beta=0.1, label_smoothing=0.2)
    trl, ours = _trl(logps, ref, tokens, cfg, "aot"), _ours(logps, ref, tokens, cfg)
    for name in METRICS:
        assert ours[name] == pytest.approx(trl[name], abs=1e-6), name
    plain = _ours(logps, ref, tokens, DPOConfig(beta=0.1))
    assert plain["loss"] != pytest.approx(ours["loss"], abs=1e-3)  # the smoothing does something


def test_loss_of_one_pair_by_hand():
    """The published formulas on one pair (the quick check; TRL's own code: the tests above)."""
    logps = torch.tensor([[-20.0, -30.0]], dtype=torch.float64)  # chosen, rejected
    ref = torch.tensor([[-22.0, -27.0]], dtype=torch.float64)  # log-ratios 2 and -3
    tokens = torch.tensor([[4, 5]])
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))
    cases = [(DPOConfig(beta=0.1), -log_sigmoid(0.1 * 5)),
             (DPOConfig(beta=0.1, label_smoothing=0.25), -0.75 * log_sigmoid(0.5) - 0.25 * log_sigmoid(-0.5)),
             (DPOConfig(beta=0.1, loss_type="ipo"), (2 / 4 - (-3) / 5 - 1 / (2 * 0.1)) ** 2)]
    for cfg, want in cases:
        losses, rewards = dpo_losses(logps, ref, tokens, cfg)
        assert losses.item() == pytest.approx(want, abs=1e-12), cfg
        assert_close(rewards, torch.tensor([[0.2, -0.3]], dtype=torch.float64))  # β x log-ratios


def test_dpo_config_checks():
    assert DPOConfig().problems() == []
    assert DPOConfig(beta=0).problems() == ["beta: must be > 0 (got 0)"]
    assert DPOConfig(label_smoothing=0.5).problems() == ["label_smoothing: must be in [0.0, 0.5) (got 0.5)"]
    assert "only with loss_type=sigmoid" in DPOConfig(loss_type="ipo", label_smoothing=0.1).problems()[0]


# ---- log-probabilities: a plain transformers forward ---------------------------------------------

def test_response_logps_equal_a_transformers_forward(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT(SHAPE).eval()
    ours.save_pretrained(tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tok = Tokenizer()
    dataset = PreferenceDataset(_pairs(6), tok, "alpaca", max_length=SHAPE.context_length)
    batch = preference_collate([dataset[i] for i in range(6)], tok.eot_id, SHAPE.context_length)
    with torch.no_grad():
        got = response_logps(ours, batch)  # (6, 2)
        ids, labels = batch["input_ids"].flatten(0, 1), batch["labels"].flatten(0, 1)
        logp = torch.log_softmax(hf(ids).logits.float(), -1)  # right padding: no mask needed
        mask = labels != IGNORE_INDEX
        picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        want = (picked * mask).sum(-1).view(6, 2)
    assert got.dtype == torch.float32
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_pair_shares_a_row_and_only_responses_are_scored():
    tok = Tokenizer()
    record = {"instruction": "Name a color.", "input": "", "chosen": "Blue, thank you.", "rejected": "Blue."}
    short = {"instruction": "Say hi.", "chosen": "Hello there!", "rejected": "What?"}
    dataset = PreferenceDataset([record, short], tok, "alpaca", max_length=64)
    dataset.reference = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    batch = preference_collate([dataset[0], dataset[1]], tok.eot_id, max_length=64)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[:2] == (2, 2)
    assert_close(batch["reference"], dataset.reference)
    for row, r in enumerate((record, short)):
        for col, key in enumerate(("chosen", "rejected")):
            labels = batch["labels"][row, col]
            scored = labels[labels != IGNORE_INDEX].tolist()
            assert scored == tok.encode(r[key]) + [tok.eot_id]  # the response and end-of-text only
            prompt = tok.encode(format_prompt(r, "alpaca"))
            assert batch["input_ids"][row, col, : len(prompt)].tolist() == prompt


# ---- data ----------------------------------------------------------------------------------------

def test_the_books_preference_file_splits_in_file_order():
    path = shared_path("data", "instruction-data-with-preference.json")
    records = json.loads(path.read_text())
    with pytest.raises(GPTFTError) as e:  # six pairs have chosen == rejected
        load_preference_data(PreferenceData(path=str(path)))
    assert str(e.value).startswith(f"{path}: 6 invalid record(s)")
    assert all(f"record {i}: 'chosen' and 'rejected' are the same text" in str(e.value)
               for i in (122, 226, 400, 566, 628, 676))
    splits = load_preference_data(PreferenceData(path=str(path), drop_identical=True))
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [935 - 6, 55, 110]
    assert splits.test == records[935:1045] and splits.val == records[1045:]  # the book's order


def test_jsonl_pairs_without_input_or_output(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "chosen": "Gladly: 1, 2.",
                                        "rejected": "No."}) + "\n" for i in range(20)))
    splits = load_preference_data(PreferenceData(path=str(path)))
    assert len(splits.train) == 17 and splits.train[0]["input"] == ""
    assert splits.train[0]["output"] == "Gladly: 1, 2."  # what gptft judge compares with


def test_book_settings():
    job = load_job(CONFIGS / "dpo.yaml")
    assert (job.task, job.model.name, job.model.checkpoint, job.model.trainable) == (
        "preference", "gpt2-medium", "runs/instruct", "all")
    assert (job.dpo.beta, job.dpo.loss_type, job.dpo.precompute_reference) == (0.1, "sigmoid", True)
    assert (job.train.lr, job.train.weight_decay, job.train.batch_size, job.train.epochs) == (
        5e-6, 0.01, 8, 1)
    assert (job.data.prompt_style, job.data.split, job.data.shuffle) == ("alpaca", [0.85, 0.05, 0.10], False)


# ---- model.checkpoint: a gptft run folder --------------------------------------------------------

def test_a_run_folder_is_a_checkpoint(tmp_path):
    run = _start_run(tmp_path / "run", drop_rate=0.1)
    overrides = [f"model.checkpoint={run}", "model.pad_vocab_multiple=64", "model.drop_rate=0.0"]
    cfg = load_job(CONFIGS / "dpo-tiny.yaml", overrides).model
    model = build_gpt(cfg, 50257)
    saved = load_file(run / "model.safetensors")
    assert model.training and model.config.n_layers == 2 and model.config.drop_rate == 0.0
    assert model.wte.weight.shape == (50304, 32) and not model.wte.weight[50257:].any()
    for name, value in saved.items():
        assert torch.equal(model.state_dict()[name][: len(value)], value), name
    assert model.lm_head.weight is model.wte.weight


def test_a_classification_run_is_not_a_checkpoint(tmp_path, data, capsys):
    from gptft.classifier import GPTClassifier

    run = tmp_path / "spam"
    run.mkdir()
    save_model(run, GPTClassifier(GPT(SHAPE), 2), {"task": "classification", "model": SHAPE.to_dict(),
                                                   "labels": ["ham", "spam"], "tokenizer": "gpt2"})
    assert main(["finetune", "--config", str(CONFIGS / "dpo-tiny.yaml"), f"model.checkpoint={run}",
                 f"data.path={data}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run}: this is a classification run, not an instruction or " in err[0]


# ---- a run -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, start, data) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "run"
    assert main(_args(start, data, out, "train.epochs=2")) == 0
    return out


@pytest.mark.slow
def test_run_folder(dpo_run, tmp_path, capsys):
    files = {p.name for p in dpo_run.iterdir()}
    assert {"config.yaml", "gptft.json", "model.safetensors", "metrics.json", "log.jsonl",
            "responses.json", "loss.png", "reward_margin.png", "reward_accuracy.png"} <= files
    assert not list(dpo_run.rglob("*.bin")) and not list(dpo_run.rglob("*.pt"))  # safetensors only
    metrics = json.loads((dpo_run / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        for name in METRICS:
            assert isinstance(metrics[f"{split}_{name}"], float), (split, name)
    assert metrics["steps"] == 16  # 34 pairs in batches of 4: 8 steps an epoch
    evaluations = [r for r in _log(dpo_run) if "val/reward_margin" in r]
    assert len(evaluations) >= 5 and all(f"val/{k}" in r for r in evaluations for k in METRICS)
    assert any("val/sample_response" in r for r in _log(dpo_run))
    # The training pairs are told apart: DPO's loss starts at log 2 (policy = reference) and falls;
    # the kept model prefers the chosen responses. (Not checked on the 2 validation pairs: from a
    # random model, how 2 held-out pairs move in 16 steps depends on the initialisation.)
    losses = _step_losses(dpo_run)
    assert abs(losses[0] - math.log(2)) < 1e-3 and sum(losses[8:]) / 8 < 0.9 * math.log(2), losses
    assert metrics["train_reward_margin"] > 0 and metrics["train_reward_accuracy"] > 0.75, metrics
    responses = json.loads((dpo_run / "responses.json").read_text())
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in responses] == _pairs()[34:38]
    assert json.loads((dpo_run / "gptft.json").read_text())["task"] == "preference"
    capsys.readouterr()
    assert main(["export", str(dpo_run), str(tmp_path / "hf")]) == 0  # an lm run: exported as GPT-2
    assert {"config.json", "model.safetensors", "prompt_style.json", "vocab.json"} <= \
        {p.name for p in (tmp_path / "hf").iterdir()}


# ---- the reference without a second model ----------------------------------------------------------

def _gpt_models() -> int:
    gc.collect()
    return sum(isinstance(o, GPT) for o in gc.get_objects())


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_precomputed_and_live_reference_train_alike(start, data, tmp_path, monkeypatch, trainable):
    """Precomputed reference log-probabilities, and the reference scored as it goes (a frozen
    copy; with LoRA, the model with its adapters disabled): the same run, while only the frozen
    copy holds a second model during training."""
    seen, real_loss = [], PreferenceTask.loss

    def spy(self, model, batch):  # GPT models alive at the first step
        if not getattr(self, "counted", False):
            self.counted = True
            seen.append(_gpt_models())
        return real_loss(self, model, batch)

    monkeypatch.setattr(PreferenceTask, "loss", spy)
    more = ["train.max_steps=6", f"model.trainable={trainable}", "lora.rank=4", "train.lr=1e-2"]
    pre, live = tmp_path / "precomputed", tmp_path / "live"
    before = _gpt_models()
    assert main(_args(start, data, pre, *more)) == 0
    assert main(_args(start, data, live, *more, "dpo.precompute_reference=false")) == 0
    assert [n - before for n in seen] == [1, 1 if trainable == "lora" else 2]
    assert _step_losses(pre) == pytest.approx(_step_losses(live), abs=1e-5)
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (pre, live))
    for key in (f"{s}_{m}" for s in ("train", "val", "test") for m in METRICS):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert a["train_reward_margin"] > 0.01 and a["train_reward_accuracy"] > 0.5  # it trained


# ---- kill and resume ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tmp_path, data):
    """Dropout on, 2 epochs of 8 steps, a checkpoint every 3 steps: resumed mid-epoch from step 3
    into another folder (the reference log-probabilities are computed again there), the weights,
    metrics, responses and log equal the uninterrupted run's bit for bit."""
    start = _start_run(tmp_path / "start", drop_rate=0.1)
    args = lambda out, *more: _args(start, data, out, "train.epochs=2", "model.drop_rate=0.1",
                                    "train.checkpoint_every=3", "train.keep_last=100", *more)
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert main(args(ref)) == 0
    checkpoint = ref / "checkpoints" / "step-00000003"
    assert main(args(resumed, f"train.resume={checkpoint}")) == 0
    wa, wb = load_file(ref / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("metrics.json", "responses.json"):
        assert run_results(resumed, name) == run_results(ref, name), name
    logged = json.loads((checkpoint / "trainer_state.json").read_text())["progress"]["log_lines"]
    assert _log(resumed) == _log(ref)[logged:]  # the lines after the checkpoint, the same


# ---- one process and two ---------------------------------------------------------------------------

def _launch(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.Popen(launcher("--num_processes", "2", "--main_process_port", str(free_port()))
                                + args, cwd=ROOT, env=cpu_launch_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    assert code == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_with_double_batch(start, data, tmp_path):
    """34 training pairs: 4 steps of 2 x 2 x 2 pairs (2 left over), gradient accumulation; 1
    process with batch 4 against 2 processes with batch 2."""
    common = ["train.epochs=1", "train.grad_accum_steps=2", "train.eval_every=2", "train.device=cpu",
              "train.checkpoint_epochs=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(start, data, one, *common, "train.batch_size=4")) == 0
    assert_only_known_run_files(one)
    _launch(_args(start, data, two, *common, "train.batch_size=2")[1:], tmp_path / "two.log")
    steps = [(r["step"], r["examples_seen"]) for r in _log(one) if "train/lr" in r]
    assert steps == [(i, 8 * i) for i in range(1, 5)]  # examples are pairs
    assert steps == [(r["step"], r["examples_seen"]) for r in _log(two) if "train/lr" in r]
    assert _step_losses(one) == pytest.approx(_step_losses(two), abs=1e-5)
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in wa:
        assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    for key in (f"{s}_{m}" for s in ("train", "val", "test") for m in METRICS):
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    r1, r2 = (json.loads((run / "responses.json").read_text()) for run in (one, two))
    assert r1 == r2 and len(r1) == 4


# ---- memory ------------------------------------------------------------------------------------------

PEAK = """
import sys
from gptft import trainer
from gptft.cli import main
fit = trainer.Trainer.fit
def measured(self):  # the peak during training (not start-up, the final evaluation, generation)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident size (VmHWM) to the current one
    fit(self)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("peak_kib", int(hwm.split()[1]), flush=True)
trainer.Trainer.fit = measured
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_precomputed_reference_saves_a_model_of_memory(data, tmp_path):
    """Peak resident memory during the same short training (width 768, 2 blocks: 52.9M parameters,
    211 MB; the peak reset when training starts, so start-up cannot set it) with the reference
    precomputed and with a frozen copy: one model apart (docs/dpo.md)."""
    shape = ["model.weights=random", "model.checkpoint=null", "model.n_layers=2", "model.emb_dim=768",
             "model.n_heads=12", "model.context_length=128"]
    model_bytes = 4 * GPT(GPTConfig(vocab_size=50257, context_length=128, emb_dim=768, n_layers=2,
                                    n_heads=12)).num_parameters()
    procs = {}
    for precompute in ("true", "false"):  # both at once: each process's peak is its own
        # Small evaluation batches: scoring the reference must not be what sets the peak.
        args = ["finetune", "--config", str(CONFIGS / "dpo-tiny.yaml"), *shape, f"data.path={data}",
                *RUN, "train.max_steps=2", "train.eval_every=0", "train.eval_batch_size=4",
                f"dpo.precompute_reference={precompute}", f"output_dir={tmp_path / precompute}"]
        # Every block of 64 KiB or more its own mapping, returned when freed (and gptft.cpu's
        # tuning off): the peak then follows the live tensors, not what the allocator keeps.
        env = {**cpu_launch_env(), "GPTFT_CPU_ALLOCATOR": "default", "MALLOC_MMAP_THRESHOLD_": "65536"}
        procs[precompute] = subprocess.Popen([sys.executable, "-c", PEAK, *args], cwd=ROOT, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    try:
        for precompute, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
            peaks[precompute] = 1024 * int(stdout.split("peak_kib")[-1].split()[0])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    saved = peaks["false"] - peaks["true"]
    assert 0.7 * model_bytes < saved < 1.3 * model_bytes, (peaks, model_bytes)
