"""What a language-model run will learn: its data rendered and tokenized exactly as training does,
and the checks that catch the silent bugs (``gptft data inspect``; training runs the same checks).

``prepare`` reads a job's data with its tokenizer and prompt style into the datasets training
uses; ``check`` looks at every example and reports, naming the file and record (line):

* errors (training refuses to start, ``gptft data inspect`` exits 2): no token of the training
  split is a target; no trained assistant turn ends in a target end-of-turn / EOS (the model would
  never learn to stop);
* warnings: an example with no target, an assistant turn whose end-of-turn is not a target,
  an example truncation shortened (earlier turns dropped, or its answer cut), the same example
  twice in a split or in two splits.

``report_text`` prints N examples with their trained tokens marked (colour on a terminal,
``[[...]]`` otherwise), the token-length histogram, the share of tokens in the loss and the
findings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from gptft.data.chat import ChatDataset, ChatFormat, preference_items, spans
from gptft.data.collate import _shifted
from gptft.data.conversations import instruction_messages
from gptft.data.instruction import InstructionSplits
from gptft.errors import GPTFTError
from gptft.model import IGNORE_INDEX

SPLITS = ("train", "val", "test")
MAX_LISTED = 20  # findings of one kind listed by record; the rest counted


@dataclass
class LMData:
    """A language-model job's data as training sees it.

    Attributes:
        fmt: the prompt style / chat template and tokenizer.
        splits: the records of each split (``gptft.data.conversations.Record`` s).
        datasets: the tokenized dataset of each split (``ChatDataset``, ``InstructionDataset``
            or, for preference jobs, pair items).
        kind: ``instruction`` or ``preference``.
        train_on: the chat targets (``data.train_on``); for a text style ``response`` (with
            ``mask_prompt``) or ``all``; for pairs ``responses``.
        mask_prompt: a text style's ``data.mask_prompt`` (pairs: always; chat: unused).
        max_length: examples hold at most ``max_length + 1`` tokens.
    """

    fmt: ChatFormat
    splits: InstructionSplits
    datasets: dict
    kind: str
    train_on: str
    mask_prompt: bool
    max_length: int


def prepare(job, tokenizer, max_length: int) -> LMData:
    """Read and tokenize the data of an instruction or preference `job` as its run does."""
    fmt, splits = read(job, tokenizer)
    return tokenize(job, fmt, splits, max_length)


def read(job, tokenizer) -> tuple[ChatFormat, InstructionSplits]:
    """The job's format (prompt style or chat template) and the records of each split."""
    from gptft.data.instruction import load_instruction_data
    from gptft.data.preference import load_preference_data

    fmt = ChatFormat(job.data.prompt_style, tokenizer)
    load = load_preference_data if _pairs(job) else load_instruction_data
    return fmt, load(job.data, chat=fmt.chat)


def tokenize(job, fmt: ChatFormat, splits, max_length: int) -> LMData:
    """The records of each split tokenized as training sees them (``LMData``)."""
    from gptft.data.instruction import InstructionDataset
    from gptft.data.preference import PreferenceDataset

    data, tokenizer = job.data, fmt.tokenizer
    if _pairs(job):
        if fmt.chat:
            datasets = {s: PairItems(preference_items(getattr(splits, s), fmt.encode, max_length))
                        for s in SPLITS}
        else:
            datasets = {s: PreferenceDataset(getattr(splits, s), tokenizer, fmt.style, max_length)
                        for s in SPLITS}
        return LMData(fmt, splits, datasets, "preference", "responses", True, max_length)
    if fmt.chat:
        train_on = data.train_on or "assistant"
        datasets = {s: ChatDataset(getattr(splits, s), fmt.encode, train_on, max_length) for s in SPLITS}
        return LMData(fmt, splits, datasets, "instruction", train_on, False, max_length)
    datasets = {s: InstructionDataset(getattr(splits, s), tokenizer, fmt.style, max_length) for s in SPLITS}
    return LMData(fmt, splits, datasets, "instruction", "response" if data.mask_prompt else "all",
                  data.mask_prompt, max_length)


def _pairs(job) -> bool:
    """Whether `job` trains on preference pairs (its data section is the preference task's)."""
    from gptft.data.config import PreferenceData

    return isinstance(job.data, PreferenceData)


class PairItems(list):
    """Preference pairs rendered with a chat template: a list of ``{"chosen", "rejected",
    "prompt_len"}`` items with the ``lengths`` the batching needs (as ``PreferenceDataset``)."""

    def __init__(self, items: list[dict]):
        super().__init__(items)
        self.lengths = [max(len(i["chosen"]), len(i["rejected"])) for i in items]
        self.reference = None

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return item if self.reference is None else {**item, "reference": self.reference[index]}


# ---- examples: ids, targets, answers --------------------------------------------------------------

@dataclass
class Example:
    """One sequence the loss sees, with what the checks need.

    Attributes:
        where: the file and record it came from (plus ``chosen`` / ``rejected`` for a pair).
        ids: its tokens after fitting to ``max_length + 1``.
        target: whether each token is a target of the loss (the first token never is).
        answers: the token positions of each answer the run trains on (for the end-of-turn check).
        full_length: its tokens before fitting.
        dropped: assistant turns dropped from its start to fit; ``cut``: cut inside its last answer.
        key: what makes two examples the same (their messages).
    """

    where: str
    ids: list[int]
    target: list[bool]
    answers: list[range]
    full_length: int
    dropped: int = 0
    cut: bool = False
    key: str = ""


def _targets(item: dict, mask_prompt: bool) -> list[bool]:
    """Which tokens of an item are targets, by the collate code training runs."""
    _, labels = _shifted(item, mask_prompt, None)
    return [False] + [t != IGNORE_INDEX for t in labels]


def _key(record: dict) -> str:
    messages = record.get("messages") or instruction_messages(record)
    extra = {k: record[k] for k in ("chosen", "rejected") if k in record}
    return json.dumps([messages, extra], sort_keys=True, ensure_ascii=False)


def examples(data: LMData, split: str) -> list[Example]:
    """Every sequence of `split` as the loss sees it."""
    records, dataset = getattr(data.splits, split), data.datasets[split]
    out = []
    for i, record in enumerate(records):
        where = getattr(record, "where", "") or f"{split} example {i}"
        if data.kind == "preference":
            item = dataset[i]
            for key in ("chosen", "rejected"):
                seq = {"input_ids": item[key], "prompt_len": item["prompt_len"]}
                ids = seq["input_ids"]
                out.append(Example(f"{where} ({key})", ids, _targets(seq, True),
                                   [range(item["prompt_len"], len(ids))], len(ids),
                                   cut=len(ids) == data.max_length + 1, key=_key(record) + key))
        elif data.fmt.chat:
            f = dataset.fitted[i]
            runs = spans(f.assistant_mask)
            if data.train_on == "last_assistant":
                runs = runs[-1:]
            out.append(Example(where, f.input_ids, _targets(dataset[i], False),
                               [range(a, b) for a, b in runs], f.length, f.dropped, f.cut, _key(record)))
        else:
            item = dataset[i]
            ids = item["input_ids"]
            full = dataset.full_lengths[i]
            out.append(Example(where, ids, _targets(item, data.mask_prompt),
                               [range(item["prompt_len"], len(ids))], full,
                               cut=full > len(ids), key=_key(record)))
    return out


def ends_in_target_eos(ex: Example, answer: range, fmt: ChatFormat) -> bool:
    """Whether an answer's end-of-turn / EOS token is a target: a stop id among its targets, or
    an end-of-turn text in their decoded text (GPT-2 spells ChatML's ``<|im_end|>`` in pieces)."""
    trained = [ex.ids[j] for j in answer if ex.target[j]]
    stops = set(fmt.tokenizer.stop_ids)
    if any(t in stops for t in trained):
        return True
    text = fmt.tokenizer.decode(trained) if trained else ""
    return any(end and end in text for end in fmt.end_texts())


# ---- checks ----------------------------------------------------------------------------------------

@dataclass
class Finding:
    level: str  # "error" | "warning"
    kind: str
    where: str
    message: str


@dataclass
class SplitStats:
    examples: int = 0
    tokens: int = 0
    targets: int = 0
    full_lengths: list[int] = field(default_factory=list)
    shortened: int = 0
    cut: int = 0
    answers: int = 0
    answers_with_eos: int = 0


@dataclass
class Report:
    data: LMData
    stats: dict[str, SplitStats]
    findings: list[Finding]
    samples: list[Example]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]


def check(data: LMData, samples: int = 0) -> Report:
    """Every check on every split (see the module's docstring); the first `samples` training
    examples are kept for display."""
    findings: list[Finding] = []
    stats: dict[str, SplitStats] = {}
    seen: dict[str, str] = {}  # example key -> where, of the training split
    kept: list[Example] = []
    for split in SPLITS:
        st = stats[split] = SplitStats()
        local: dict[str, str] = {}
        for ex in examples(data, split):
            if split == "train" and len(kept) < samples:
                kept.append(ex)
            _check_example(data, split, ex, st, findings)
            if ex.key in local:
                findings.append(Finding("warning", "duplicate", ex.where,
                                        f"the same example as {local[ex.key]} ({split})"))
            else:
                local[ex.key] = ex.where
            if split != "train" and ex.key in seen:
                findings.append(Finding("warning", "across splits", ex.where,
                                        f"in {split} and in train ({seen[ex.key]}): it leaks into the "
                                        "evaluation"))
        if split == "train":
            seen = local
    train = stats["train"]
    if train.examples and train.targets == 0:
        findings.append(Finding("error", "no targets", "train", "no token of the training split is a "
                                f"target (train_on {data.train_on}): there is nothing to learn"))
    elif train.answers and train.answers_with_eos == 0:
        findings.append(Finding("error", "EOS never a target", "train",
                                "no trained answer ends in a target end-of-turn / EOS token: the model "
                                "would never learn to stop (check the chat template's {% generation %} "
                                "block, data.train_on and the messages' weights)"))
    return Report(data, stats, findings, kept)


def _check_example(data: LMData, split: str, ex: Example, st: SplitStats, findings: list[Finding]) -> None:
    n_targets = sum(ex.target)
    st.examples += 1
    st.tokens += len(ex.ids)
    st.targets += n_targets
    st.full_lengths.append(ex.full_length)
    st.shortened += bool(ex.dropped or ex.cut)
    st.cut += ex.cut
    if ex.dropped:
        findings.append(Finding("warning", "truncated", ex.where,
                                f"{ex.dropped} earlier answer(s) dropped to fit max_length "
                                f"{data.max_length} ({ex.full_length} tokens)"))
    if ex.cut:
        findings.append(Finding("warning", "truncated", ex.where,
                                f"its answer is cut at max_length {data.max_length} ({ex.full_length} "
                                "tokens): the end of the answer and its EOS are lost"))
    if n_targets == 0:
        findings.append(Finding("warning", "no targets", ex.where, "no token of it is a target"))
        return
    for k, answer in enumerate(ex.answers):
        if ex.cut and k == len(ex.answers) - 1:
            continue  # reported as cut
        st.answers += 1
        if ends_in_target_eos(ex, answer, data.fmt):
            st.answers_with_eos += 1
        else:
            which = f"answer {k + 1} of {len(ex.answers)}" if len(ex.answers) > 1 else "its answer"
            findings.append(Finding("warning", "EOS masked", ex.where,
                                    f"{which} does not end in a target end-of-turn / EOS token "
                                    "(masked, weight 0, or not in the template's assistant block)"))


def check_or_raise(data: LMData, print_fn=print) -> Report:
    """The checks training runs at its start: errors raise one ``GPTFTError`` (before the run
    folder is touched); warnings and truncation are counted in one line each."""
    report = check(data)
    if report.errors:
        raise GPTFTError("the data cannot train this model: " + "; ".join(
            f"{e.message}" for e in report.errors) + " (gptft data inspect --config ... shows the "
            "examples)")
    shortened = {s: st for s, st in report.stats.items() if st.shortened}
    if shortened:
        print_fn("truncation to max_length " + str(data.max_length) + ": " + ", ".join(
            f"{s} {st.shortened} of {st.examples} example(s) lost an answer or part of one "
            f"({st.cut} cut inside it)" for s, st in shortened.items()))
    if report.warnings:
        kinds: dict[str, int] = {}
        for w in report.warnings:
            kinds[w.kind] = kinds.get(w.kind, 0) + 1
        print_fn(f"data: {len(report.warnings)} warning(s): "
                 + ", ".join(f"{n} {k}" for k, n in kinds.items())
                 + " (gptft data inspect --config ... lists them by record)")
    return report


# ---- the report as text ------------------------------------------------------------------------------

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


def marked(ex: Example, tokenizer, color: bool) -> str:
    """The example's text with its target tokens marked: green on a terminal, ``[[...]]`` else."""
    opened, closed = (GREEN, RESET) if color else ("[[", "]]")
    parts, run, state = [], [], False
    for token, is_target in zip(ex.ids, ex.target):
        if is_target != state and run:
            text = tokenizer.decode(run)
            parts.append(f"{opened}{text}{closed}" if state else text)
            run = []
        state = is_target
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        parts.append(f"{opened}{text}{closed}" if state else text)
    return "".join(parts)


def histogram(lengths: Sequence[int], limit: int, bins: int = 8, width: int = 40) -> list[str]:
    """Rows ``lo - hi | ####  count`` of the token lengths; the limit marks where truncation starts."""
    if not lengths:
        return []
    low, top = min(lengths), max(lengths)
    step = max(1, -(-(top - low + 1) // bins))
    counts = [0] * -(-(top - low + 1) // step)
    for n in lengths:
        counts[(n - low) // step] += 1
    most = max(counts)
    rows = []
    for b, c in enumerate(counts):
        lo, hi = low + b * step, low + (b + 1) * step - 1
        over = " (over max_length: truncated)" if hi > limit + 1 else ""
        rows.append(f"  {lo:>6} - {hi:<6} | {'#' * max(c * width // most, 1 if c else 0):<{width}} "
                    f"{c}{over}")
    return rows


def report_text(report: Report, color: bool = False) -> str:
    """The inspector's output (``gptft data inspect``)."""
    data, fmt = report.data, report.data.fmt
    template = f"chat template {fmt.style}" if fmt.chat else f"prompt style {fmt.style}"
    counts = ", ".join(f"{s} {report.stats[s].examples}" for s in SPLITS) + (
        " (sequences: each pair's chosen and rejected)" if data.kind == "preference" else "")
    lines = [f"{data.kind} data: {template}, tokenizer {fmt.tokenizer.name}, train on {data.train_on}, "
             f"max_length {data.max_length}", f"examples: {counts}", ""]
    for i, ex in enumerate(report.samples):
        lines += [f"--- example {i + 1} ({ex.where}; {len(ex.ids)} tokens, {sum(ex.target)} trained)",
                  marked(ex, fmt.tokenizer, color), ""]
    train = report.stats["train"]
    lines.append(f"token lengths of the training examples (before truncation; max_length {data.max_length}):")
    lines += histogram(train.full_lengths, data.max_length)
    share = train.targets / train.tokens if train.tokens else 0.0
    lines += ["", f"in the loss: {share:.1%} of the training tokens ({train.targets:,} of {train.tokens:,})"]
    for s in SPLITS:
        st = report.stats[s]
        if st.shortened:
            lines.append(f"truncation: {s}: {st.shortened} of {st.examples} example(s) lost an answer "
                         f"or part of one ({st.cut} cut inside an answer)")
    if not any(st.shortened for st in report.stats.values()):
        lines.append(f"truncation: none (every example fits max_length {data.max_length})")
    answers = sum(st.answers for st in report.stats.values())
    with_eos = sum(st.answers_with_eos for st in report.stats.values())
    lines.append(f"end of turn: {with_eos} of {answers} trained answer(s) end in a target EOS / "
                 "end-of-turn token" + ("" if with_eos == answers else " (see the warnings)"))
    dups = sum(f.kind == "duplicate" for f in report.findings)
    across = sum(f.kind == "across splits" for f in report.findings)
    lines.append(f"duplicates: {dups} within a split, {across} across splits")
    for level, found in (("warning", report.warnings), ("error", report.errors)):
        if not found:
            continue
        lines += ["", f"{level}s ({len(found)}):"]
        by_kind: dict[str, list[Finding]] = {}
        for f in found:
            by_kind.setdefault(f.kind, []).append(f)
        for kind, items in by_kind.items():
            lines += [f"  {kind}: {f.where}: {f.message}" for f in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"  {kind}: ... and {len(items) - MAX_LISTED} more")
    return "\n".join(lines)


def context_length(model) -> int:
    """The context length of a job's model (``ModelConfig``) without building it: the config's,
    a gptft run's or a Hugging Face folder's (``config.json``), else the preset's."""
    from pathlib import Path

    from gptft.io import read_json_object
    from gptft.model import GPTConfig

    if model.context_length:
        return model.context_length
    if model.weights == "pretrained" and model.checkpoint:
        folder = Path(model.checkpoint)
        if (folder / "gptft.json").is_file():
            return int(read_json_object(folder / "gptft.json")["model"]["context_length"])
        if (folder / "config.json").is_file():
            hf = read_json_object(folder / "config.json")
            value = hf.get("n_positions") or hf.get("max_position_embeddings")
            if isinstance(value, int):
                return value
    from gptft.models import PRESETS

    if model.name in PRESETS:  # a family preset (its hub repo's shape)
        return int(PRESETS[model.name]["hf"]["max_position_embeddings"])
    return GPTConfig.from_name(model.name).context_length
