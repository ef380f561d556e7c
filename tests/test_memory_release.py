"""After a run, the pages the C allocator kept are handed back (train/memory.return_freed_memory).

By hand in Forge (SDXL, stop 31) the process kept 10.6 GB of anonymous memory after a run and 7.7 GB
after glibc's malloc_trim. Here the same shape at a small size: a worker thread (as a run is) frees
most of 250 MB it touched, with a few blocks kept spread over its arena, so glibc cannot shrink it."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from lora_train.train import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or memory.rss_mb() is None, reason="glibc and /proc")


def _free_in_a_thread(kept: list) -> None:
    def work():
        blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB each
        kept.extend(blocks[::50])
    t = threading.Thread(target=work)
    t.start()
    t.join()


def test_the_freed_pages_go_back_to_the_system():
    kept: list = []
    _free_in_a_thread(kept)
    held = memory.rss_mb()  # the freed pages are still the process's here: the call below returns them
    if not memory.return_freed_memory():
        pytest.skip("no glibc malloc_trim")
    assert memory.rss_mb() < held - 100


def test_a_run_ends_by_returning_what_it_freed(tmp_path, monkeypatch):
    """The run manager's worker calls it once per run, after the run's objects are gone."""
    from conftest import make_dataset, small_run_config

    from lora_train.app.runs import RunManager, RunRequest
    from lora_train.host.standalone import StandaloneHost

    calls = []
    monkeypatch.setattr(memory, "return_freed_memory", lambda: calls.append(1) or True)
    host = StandaloneHost("builtin:tiny", tmp_path / "Lora", tmp_path / "runs")
    manager = RunManager(host)
    config = small_run_config(make_dataset(tmp_path / "data"), "trim", epochs=1, output_dir=str(tmp_path / "out"))
    manager.submit(RunRequest(config=config), start=True)
    assert manager.wait(300)
    assert manager.latest().phase == "finished" and calls == [1]
