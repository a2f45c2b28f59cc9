"""Slide claims: O_EXCL creation, release in finally, stale-lock recovery, one winner in a race."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gsd_wsi.stages.claim import LOCK_NAME, SlideBusy, claim_slide, read_status, this_host, write_stage_status


def _write_lock(slide_dir: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    slide_dir.mkdir(parents=True, exist_ok=True)
    (slide_dir / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "created": time.time() - age_s,
                                                   "token": "someone-else"}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_is_released_even_when_the_work_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), claim_slide(tmp_path / "a") as owner:
        assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pid"] == owner.pid == os.getpid()
        raise RuntimeError("the slide failed")
    assert not (tmp_path / "a" / LOCK_NAME).exists()


def test_a_live_claim_is_respected(tmp_path: Path) -> None:
    _write_lock(tmp_path / "a", this_host(), os.getpid())  # this very process: alive
    with pytest.raises(SlideBusy, match="being processed by pid"), claim_slide(tmp_path / "a"):
        pass
    assert (tmp_path / "a" / LOCK_NAME).exists()  # not ours: left alone


def test_a_dead_process_lock_on_this_host_is_recovered(tmp_path: Path) -> None:
    _write_lock(tmp_path / "a", this_host(), _dead_pid())
    with claim_slide(tmp_path / "a") as owner:
        assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["token"] == owner.token
    assert not (tmp_path / "a" / LOCK_NAME).exists()


def test_another_hosts_lock_is_recovered_only_when_old(tmp_path: Path) -> None:
    _write_lock(tmp_path / "a", "some-other-node", 12345, age_s=60)
    with pytest.raises(SlideBusy), claim_slide(tmp_path / "a", stale_s=3600):
        pass
    _write_lock(tmp_path / "b", "some-other-node", 12345, age_s=7200)
    with claim_slide(tmp_path / "b", stale_s=3600):
        pass


def test_an_unreadable_lock_counts_by_its_age(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LOCK_NAME).write_text("")  # a crash between create and write
    with pytest.raises(SlideBusy), claim_slide(tmp_path / "a", stale_s=3600):
        pass
    old = time.time() - 7200
    os.utime(tmp_path / "a" / LOCK_NAME, (old, old))
    with claim_slide(tmp_path / "a", stale_s=3600):
        pass


def test_exactly_one_of_many_racing_claimers_wins(tmp_path: Path) -> None:
    for round_no in range(10):
        slide_dir = tmp_path / f"s{round_no}"
        _write_lock(slide_dir, this_host(), _dead_pid())  # all of them race to recover it too
        barrier, winners, inside = threading.Barrier(6), [], threading.Event()

        def claimer() -> None:
            barrier.wait()
            try:
                with claim_slide(slide_dir):
                    winners.append(threading.get_ident())
                    inside.wait(0.2)  # hold it while the others try
            except SlideBusy:
                pass

        threads = [threading.Thread(target=claimer) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1, f"round {round_no}: {len(winners)} claimers won"


def test_status_keeps_each_stage(tmp_path: Path) -> None:
    write_stage_status(tmp_path, "a", "/x/a.svs", "tile", {"status": "done", "attempts": 1})
    write_stage_status(tmp_path, "a", "/x/a.svs", "segment", {"status": "failed", "attempts": 2})
    state = read_status(tmp_path)
    assert state["stages"]["tile"]["status"] == "done" and state["stages"]["segment"]["attempts"] == 2
    (tmp_path / "status.json").write_text("{ half written")
    assert read_status(tmp_path) == {"stages": {}}
