"""The SQLite store: job life cycle, event order, reuse lookup, and what a restart finds."""

from __future__ import annotations

import json
from pathlib import Path

from service.api.storage import (
    COMPLETED,
    FAILED,
    INTERRUPTED_REASON,
    QUEUED,
    RUNNING,
    Store,
)

OPTIONS = {"ttt": False, "ngram": "off", "max_seconds": 600.0}


def _store_with_artifact(path: Path) -> Store:
    store = Store(path)
    store.put_artifact("a" * 64, 123, path.parent / "a.pgolf", {"tokenizer": {"sha256": "t", "vocab_size": 1024}})
    return store


def test_job_life_cycle_and_events(tmp_path: Path) -> None:
    store = _store_with_artifact(tmp_path / "db.sqlite3")
    first = store.create_job("a" * 64, OPTIONS)
    second = store.create_job("a" * 64, {**OPTIONS, "ttt": True})
    assert (store.queue_position(first), store.queue_position(second)) == (1, 2)

    claimed = store.claim_next_queued()
    assert claimed is not None and claimed.id == first.id and claimed.status == RUNNING
    assert store.queue_position(store.get_job(second.id)) == 1  # type: ignore[arg-type]
    assert store.append_event(first.id, {"type": "start"}) == 0
    assert store.append_event(first.id, {"type": "chunk", "index": 0}) == 1
    done = store.finish_job(first.id, status=COMPLETED, terminal_event={"type": "end", "val_bpb": 1.25})
    assert done.status == COMPLETED and done.result == {"type": "end", "val_bpb": 1.25}

    events = store.events_after(first.id, -1)
    assert [(e.seq, e.type) for e in events] == [(0, "start"), (1, "chunk"), (2, "end")]
    assert json.loads(events[1].body) == {"type": "chunk", "index": 0}
    assert [e.seq for e in store.events_after(first.id, 1)] == [2]
    assert store.last_event_of_type(first.id, "chunk") == {"type": "chunk", "index": 0}
    assert store.count_by_status() == {COMPLETED: 1, QUEUED: 1}


def test_reuse_only_finished_or_active_jobs_with_equal_options(tmp_path: Path) -> None:
    store = _store_with_artifact(tmp_path / "db.sqlite3")
    failed = store.create_job("a" * 64, OPTIONS)
    store.finish_job(failed.id, status=FAILED, reason="boom", terminal_event={"type": "error"})
    assert store.find_reusable_job("a" * 64, OPTIONS) is None

    good = store.create_job("a" * 64, OPTIONS)
    store.finish_job(good.id, status=COMPLETED, terminal_event={"type": "end"})
    reordered = {"max_seconds": 600.0, "ngram": "off", "ttt": False}  # key order must not matter
    assert store.find_reusable_job("a" * 64, reordered).id == good.id  # type: ignore[union-attr]
    assert store.find_reusable_job("a" * 64, {**OPTIONS, "ngram": "exact"}) is None


def test_restart_keeps_history_and_fails_interrupted_jobs(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = _store_with_artifact(path)
    finished = store.create_job("a" * 64, OPTIONS)
    store.finish_job(finished.id, status=COMPLETED, terminal_event={"type": "end", "val_bpb": 1.0})
    running = store.create_job("a" * 64, OPTIONS)
    store.claim_next_queued()
    store.append_event(running.id, {"type": "start"})
    queued = store.create_job("a" * 64, OPTIONS)
    store.close()

    reopened = Store(path)
    assert sorted(reopened.mark_interrupted()) == sorted([running.id, queued.id])
    for job_id in (running.id, queued.id):
        job = reopened.get_job(job_id)
        assert job is not None and job.status == FAILED and job.reason == INTERRUPTED_REASON
        assert reopened.events_after(job_id, -1)[-1].type == "error"  # followers see an end to the stream
    assert reopened.get_job(finished.id).result == {"type": "end", "val_bpb": 1.0}  # type: ignore[union-attr]
    assert reopened.get_artifact("a" * 64).size_bytes == 123  # type: ignore[union-attr]
    assert reopened.mark_interrupted() == []
