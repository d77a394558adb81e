"""gptft.cli: ``run`` ends the process with ``main``'s status through ``exit_now``, which skips
only the interpreter's teardown: threads, atexit handlers and buffered output still finish."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120)


def test_exit_now_finishes_what_a_normal_exit_finishes(tmp_path):
    r = _python(f"""
        import atexit, sys, threading, time
        from gptft.cli import exit_now

        atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))
        def late():
            time.sleep(0.3)
            open({str(tmp_path / 'thread')!r}, 'w').write('done')
        threading.Thread(target=late).start()
        sys.stdout.write('x' * 100_000)  # still in the pipe's buffer
        sys.stderr.write('no newline')
        exit_now(3)
        """)
    assert r.returncode == 3
    assert r.stdout == "x" * 100_000 and r.stderr == "no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"


def test_exit_now_skips_the_teardown_of_modules(tmp_path):
    """What it saves: objects still alive are not finalised one by one at exit."""
    code = f"""
        import sys
        from gptft.cli import exit_now

        class Noted:
            def __del__(self, open=open):  # builtins may be gone by then: bound now
                open({str(tmp_path / 'finalised')!r}, 'w').write('yes')
        kept = Noted()
        if sys.argv[1] == 'fast':
            exit_now(0)
        """
    assert _python(code, "normal").returncode == 0
    assert (tmp_path / "finalised").exists()  # a normal exit finalises it
    (tmp_path / "finalised").unlink()
    assert _python(code, "fast").returncode == 0
    assert not (tmp_path / "finalised").exists()


@pytest.mark.slow
def test_the_entry_points_exit_with_mains_status(tmp_path):
    missing = tmp_path / "missing.yaml"
    for argv in (["launch/finetune.py", "--config", str(missing)],
                 ["-m", "gptft", "finetune", "--config", str(missing)]):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, (argv, r.stderr)
        assert str(missing) in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "gptft"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "finetune" in r.stdout
