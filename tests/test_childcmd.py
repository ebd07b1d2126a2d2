"""kpr.childcmd: the one `python -P -m <module>` the agent's children (the files worker, the
compile child) start with."""

from __future__ import annotations

import subprocess
import sys

from kpr import childcmd
from kpr.bpf import progcache
from kpr.sources import files_worker


def test_the_files_worker_and_the_compile_child_start_with_the_one_command():
    assert files_worker.command() == childcmd.python_module("kpr.sources.files_worker")
    child = progcache.CompileChild()
    try:
        assert child.proc.args == childcmd.python_module("kpr.bpf.compile_child")
    finally:
        child.close()
    assert not hasattr(progcache, "child_command")


def test_the_command_is_the_agents_interpreter_without_its_working_directory(tmp_path):
    """-P: a module in the agent's working directory is not what the child imports; the
    interpreter is the agent's own."""
    (tmp_path / "kpr_cwd_probe.py").write_text("print('from the working directory')\n")
    cmd = childcmd.python_module("kpr_cwd_probe")
    assert cmd[0] == sys.executable
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0 and "No module named kpr_cwd_probe" in run.stderr, run
    assert "from the working directory" not in run.stdout


def test_the_files_workers_path_does_not_import_the_program_cache():
    code = ("import sys, kpr.sources.files_worker as w; w.command(); "
            "print('kpr.bpf.progcache' in sys.modules, 'kpr.bpf' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "False"], run
