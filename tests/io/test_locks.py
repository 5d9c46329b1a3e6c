"""One writer per output folder: a second holder is refused at once, a dead holder's lock is free."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meduet.io.locks import OutputLockedError, output_lock

HOLD = """
import sys, time
from pathlib import Path
from meduet.io.locks import output_lock
with output_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_with_the_holder_named_and_a_killed_holder_frees_the_lock(tmp_path: Path):
    locks, folder = tmp_path / "locks", tmp_path / "data" / "harmonized"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(locks), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=rf"{folder}: another run is writing here .*\"pid\": {holder.pid}"):
            with output_lock(locks, folder):
                pass
        with output_lock(locks, tmp_path / "data" / "latents"):  # another folder is another lock
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the OS drops a dead process's lock
        try:
            with output_lock(locks, folder):
                break
        except OutputLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with output_lock(locks, folder):  # released on leaving the block, also in this process
        pass


def test_the_refusal_names_the_owner_the_holder_gave(tmp_path: Path):
    locks, folder = tmp_path / "locks", tmp_path / "project"
    with output_lock(locks, folder, owner="Prefect flow run 'calm-otter' (1234)"):
        # flock locks belong to an open file, so a second open in this process is refused too
        with pytest.raises(OutputLockedError, match=r"\"owner\": \"Prefect flow run 'calm-otter' \(1234\)\""):
            with output_lock(locks, folder):
                pass
