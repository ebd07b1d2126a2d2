"""One agent per pin path (kpr.bpf.pinlock): the exclusive flock on the pin directory, tried
by two processes. The second is refused with the path and the holder's pid; the holder's
repeated holds are one; the lock goes with the holder's process however it ends. An agent's
pin path that cannot be a directory is a clean error; its stop releases the hold however it
ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kpr.bpf import pinlock
from kpr.testing.agent import PIN_HOLDER, AgentConfig, kpr_cleanup, kpr_cli, pin_holder, start_agent


def test_a_second_process_is_refused_with_the_path_and_the_holder_s_pid(tmp_path):
    pins = tmp_path / "pins"
    pins.mkdir()
    other = pin_holder(pins)
    try:
        with pytest.raises(pinlock.PinPathBusy) as e:
            pinlock.hold(pins)
        assert f"bpf.pinPath {pins} is in use by another kpr agent (pid {other.pid})" in str(e.value)
        assert e.value.pids == [other.pid] and not pinlock.held(pins)
        # through a link to it: the same directory, the same refusal
        (tmp_path / "link").symlink_to(pins)
        with pytest.raises(pinlock.PinPathBusy, match=f"pid {other.pid}"):
            pinlock.hold(tmp_path / "link")
    finally:
        other.kill()  # however the holder ends, its lock goes with it
        other.wait()
    try:
        assert pinlock.hold(pins) and pinlock.held(pins)
        assert pinlock.hold(pins) and pinlock.hold(tmp_path / "link"), "this process's holds are one"
        again = subprocess.run([sys.executable, "-c", PIN_HOLDER, str(pins)], input="", capture_output=True, text=True)
        assert again.returncode != 0 and f"pid {os.getpid()}" in again.stderr, again.stderr
    finally:
        pinlock.release()
    assert not pinlock.held(pins)
    other = pin_holder(pins)  # released: another process may hold it
    other.send_signal(signal.SIGTERM)
    other.wait()


def test_a_missing_directory_is_not_held_and_a_new_one_is_locked_again(tmp_path):
    pins = tmp_path / "pins"
    assert pinlock.hold(pins) is False and not pinlock.held(pins)
    pins.mkdir()
    try:
        assert pinlock.hold(pins)
        pins.rmdir()  # kpr cleanup removes it; the agent's next pin makes it again
        pins.mkdir()
        assert not pinlock.held(pins), "the lock was the removed directory's"
        assert pinlock.hold(pins) and pinlock.held(pins)
        other = subprocess.run([sys.executable, "-c", PIN_HOLDER, str(pins)], input="", capture_output=True, text=True)
        assert other.returncode != 0 and "in use by another kpr agent" in other.stderr
    finally:
        pinlock.release()


def test_holder_pids_reads_proc_locks(tmp_path):
    pins = tmp_path / "pins"
    pins.mkdir()
    st = os.stat(pins)
    assert pinlock.holder_pids(st) == []
    locks = tmp_path / "locks"
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    locks.write_text(f"1: FLOCK  ADVISORY  WRITE 4242 {dev} 0 EOF\n2: POSIX  ADVISORY  WRITE 7 {dev} 0 EOF\n"
                     f"3: FLOCK  ADVISORY  WRITE 99 00:01:{st.st_ino} 0 EOF\n"
                     f"4: FLOCK  ADVISORY  WRITE 0 {dev} 0 EOF\n")  # (a holder in another pid namespace)
    assert pinlock.holder_pids(st, str(locks)) == [4242]
    locks.write_text(f"1: FLOCK  ADVISORY  WRITE 0 {dev} 0 EOF\n")
    assert pinlock.holder_pids(st, str(locks)) == []
    assert "(pid unknown)" in str(pinlock.PinPathBusy(tmp_path, []))
    assert pinlock.holder_pids(st, str(tmp_path / "none")) == []


@pytest.mark.parametrize("kind", ["file", "loop", "file_above"])
def test_a_pin_path_that_cannot_be_a_directory_is_a_clean_error(tmp_path, kind):
    """A bpf.pinPath that is a regular file, a loop of links or under a file ends `kpr run`
    with a message naming the path and the reason, before anything starts (before, the
    OSError of the lock's open escaped setup as a traceback)."""
    if kind == "file":
        pins = tmp_path / "pins"
        pins.write_text("")
        why = "Not a directory"
    elif kind == "loop":
        pins = tmp_path / "pins"
        pins.symlink_to(tmp_path / "pins")
        why = "Too many levels of symbolic links"
    else:
        (tmp_path / "f").write_text("")
        pins = tmp_path / "f" / "pins"
        why = "Not a directory"
    res = kpr_cli("run", "--config", str(AgentConfig(tmp_path / "work", pins).write()), timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    said = f"kpr: bpf.pinPath {pins}: {why} (it must be a directory on a bpffs, or not exist yet)"
    assert said in res.stderr, res.stderr[-3000:]


def test_a_stop_that_fails_on_the_way_releases_the_pin_path(tmp_path):
    """The hold goes at the end of the agent's stop whatever happened on the way (it was
    released at the end of the stop's try: a stop that raised kept every later agent out
    for the rest of the process)."""
    pins = tmp_path / "pins"
    pins.mkdir()
    agent = start_agent(AgentConfig(tmp_path / "work", pins))
    source_stop = agent.source.stop

    def broken_stop() -> None:
        source_stop()
        raise RuntimeError("the source's stop broke")

    agent.source.stop = broken_stop
    assert pinlock.held(pins)
    with pytest.raises(RuntimeError, match="the source's stop broke"):
        agent.shutdown()
    assert not pinlock.held(pins)
    other = pin_holder(pins)  # another agent may start there
    other.kill()
    other.wait()



@pytest.mark.parametrize("kind", ["missing", "file", "loop", "file_above"])
def test_kpr_cleanup_of_a_pin_path_that_is_no_directory_locks_nothing(tmp_path, kind):
    """`kpr cleanup` on a pin path that is not a directory: nothing there an agent could hold,
    nothing to lock; cleanup says what it finds, as before its lock. A missing one, a loop of
    links or one under a file has nothing to remove; a regular file is refused with a message
    (a ValueError traceback before)."""
    pins = tmp_path / "pins"
    if kind == "file":
        pins.write_text("")
    elif kind == "loop":
        pins.symlink_to(pins)
    elif kind == "file_above":
        (tmp_path / "f").write_text("")
        pins = tmp_path / "f" / "pins"
    res = kpr_cleanup(pins, tmp_path)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    if kind == "file":
        assert res.returncode == 2 and res.stderr == f"kpr cleanup: refusing to clean {pins}: not inside a bpffs\n", res.stderr
    else:
        assert res.returncode == 0 and res.stdout == f"nothing to remove under {pins}\n", res.stdout + res.stderr
