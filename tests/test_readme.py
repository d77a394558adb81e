"""README.md stays true: its configuration reference is generated from the config dataclasses
(gptft/config.py and each task's config module), and its offline quick start runs as written.

Regenerate after changing a config field: ``python tests/test_readme.py`` rewrites the tables in
README.md (from the first section's heading to the last table's last row).
"""

import ast
import dataclasses
import inspect
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from gptft import config as C
from gptft.data.config import ClassificationData, InstructionData, PreferenceData
from gptft.tasks.preference.config import DPOConfig
from gptft.validation import type_name as engine_type_name

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [("model", C.ModelConfig, "every task"), ("data", ClassificationData, "classification"),
            ("data", InstructionData, "instruction"), ("data", PreferenceData, "preference"),
            ("dpo", DPOConfig, "preference"), ("train", C.TrainConfig, "every task"),
            ("lora", C.LoRAConfig, "with model.trainable=lora"), ("tracking", C.TrackingConfig, "every task"),
            ("generate", C.GenerateConfig, "instruction, preference")]


def field_docs() -> dict[tuple[str, str], str]:
    """The attribute docstrings of the config dataclasses."""
    docs = {}
    sources = {inspect.getsourcefile(cls) for _, cls, _ in SECTIONS}
    for node in (n for source in sorted(sources) for n in ast.parse(Path(source).read_text()).body):
        if isinstance(node, ast.ClassDef):
            for st, nxt in zip(node.body, node.body[1:]):
                if isinstance(st, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                        and isinstance(nxt.value, ast.Constant):
                    docs[(node.name, st.target.id)] = " ".join(nxt.value.value.split())
    return docs


def _doc(docs: dict, cls: type, name: str) -> str:
    """A field's docstring, from the class that declares it (a base class's shared field)."""
    return next((docs[(c.__name__, name)] for c in cls.__mro__ if (c.__name__, name) in docs), "")


def type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(default(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return " or ".join(type_name(a) for a in args if a is not type(None)) + " or null"
    return engine_type_name(tp)


def default(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def reference() -> str:
    docs, out = field_docs(), []
    for section, cls, scope in SECTIONS:
        out += [f"**`{section}`** ({scope})", "", "| key | type | default | meaning |",
                "| --- | --- | --- | --- |"]
        hints, obj = typing.get_type_hints(cls), cls()
        out += [f"| `{section}.{f.name}` | {type_name(hints[f.name])} | `{default(getattr(obj, f.name))}` "
                f"| {_doc(docs, cls, f.name)} |" for f in dataclasses.fields(cls)]
        out.append("")
    return "\n".join(out)


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    assert reference() in readme, "README.md's config reference is stale: run python tests/test_readme.py"


def test_readme_names_the_test_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = [line.split(" ||")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 -m pytest")]
    assert ci == ['python3 -m pytest -q -m "not slow" -n 2',
                  "python3 -m pytest -q -m slow -n 2 --dist loadscope"]
    assert all(command in readme for command in ci)


def test_readme_documents_every_command_and_flag():
    from gptft.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert f"gptft {name}" in readme, name
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in readme, f"gptft {name} {flag}"


def rewrite_readme() -> None:
    """Replace README.md's reference (first section heading .. last table row) with a fresh one."""
    readme = (ROOT / "README.md").read_text()
    first, last = SECTIONS[0], SECTIONS[-1]
    start = readme.index(f"**`{first[0]}`** ({first[2]})")
    rows = readme.index(f"**`{last[0]}`** ({last[2]})", start)
    end = rows
    for line in readme[rows:].splitlines(keepends=True):
        if end > rows and not line.startswith(("|", "\n")) and line.strip():
            break
        end += len(line)
    body = readme[start:end].rstrip("\n") + "\n"
    (ROOT / "README.md").write_text(readme[:start] + reference() + readme[start + len(body):])


def quick_start() -> str:
    """The first bash block of the README's "Offline quick start" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Offline quick start"):]
    section = section[: section.index("\n## ", 1)]
    return re.search(r"```bash\n(.*?)```", section, re.S)[1]


@pytest.mark.slow
def test_readme_quick_start_runs_offline(tmp_path):
    """The quick start, line for line, in a fresh folder laid out as the README says (the clone's
    configs and packaged data; no ``../shared``), offline, with the installed ``gptft`` command."""
    clone = tmp_path / "gptft"
    shutil.copytree(ROOT / "configs", clone / "configs")
    (clone / "gptft" / "assets").mkdir(parents=True)  # the quick start reads one packaged file
    shutil.copytree(ROOT / "gptft" / "assets" / "data", clone / "gptft" / "assets" / "data")
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "WANDB_MODE")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), GPTFT_CACHE_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    if shutil.which("gptft", path=env["PATH"]) is None:
        pytest.skip("the gptft command is not installed (pip install -e .)")
    block = quick_start()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "run folder: runs/spam-tiny (" in out and "run folder: runs/instruct-tiny (" in out
    assert re.search(r"^spam\t0\.\d{4}\tURGENT! Your mobile number has won a \$2000", out, re.M)  # as written
    assert re.search(r"^ham\t0\.\d{4}\tSorry, I will call you later\.", out, re.M)
    assert "sample.tsv: 300 examples" in out and "accuracy  " in out
    assert (clone / "runs" / "spam-tiny" / "accuracy.png").is_file()
    assert (clone / "runs" / "instruct-tiny" / "responses.json").is_file()


if __name__ == "__main__":
    rewrite_readme()
