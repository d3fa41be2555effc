"""The service with the real evaluation engine: real artifacts in, refusals with the reader's own errors, and a
real evaluation streamed chunk by chunk (a short preview of the validation data, so it runs on CPU in seconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    AUTH,
    FAST_ENGINE_ARGS,
    ServiceData,
    ServiceProcess,
    files_under,
    hostile_artifacts,
    service_data,
    stream_events,
    tiny_artifact,
    upload,
    write_tiny_artifact,
)


@pytest.fixture(scope="module")
def engine_service(service_data: ServiceData, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                   ) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("engine-service")
    with ServiceProcess(root / "storage", service_data, PGOLF_EVAL_ARGS=FAST_ENGINE_ARGS) as process:
        yield process


def test_hostile_artifacts_are_refused_with_the_readers_errors(
    engine_service: ServiceProcess, tiny_artifact: Path, service_data: ServiceData, tmp_path: Path  # noqa: F811
) -> None:
    files = hostile_artifacts(tiny_artifact, tmp_path)
    files["foreign_tokenizer"] = write_tiny_artifact(tmp_path / "foreign.pgolf", service_data.tokenizer,
                                                     tokenizer_sha256="0" * 64)
    expected_codes = {"garbage": "bad_magic", "pickle": "bad_magic", "bomb": "decompression_bomb",
                      "tampered": "hash_mismatch", "foreign_tokenizer": "tokenizer_mismatch"}
    messages = {}
    with httpx.Client(base_url=engine_service.url, timeout=120, headers=AUTH) as client:
        for name, path in files.items():
            response = upload(client, path)
            assert response.status_code == 422, (name, response.text)
            assert response.json()["code"] == expected_codes[name], name
            messages[name] = response.json()["message"]
        assert client.get("/evaluations").json() == []  # nothing was queued
    assert len(set(messages.values())) == len(messages)  # each refusal says what is wrong with that file
    assert "\\x80" in messages["pickle"]  # the reader names what it found instead of the magic
    assert "0" * 64 in messages["foreign_tokenizer"]
    storage = engine_service.storage_dir
    assert files_under(storage / "uploads") == [] and files_under(storage / "artifacts") == []


def test_a_real_artifact_is_evaluated_and_streamed_chunk_by_chunk(
    engine_service: ServiceProcess, tiny_artifact: Path  # noqa: F811
) -> None:
    with httpx.Client(base_url=engine_service.url, timeout=300, headers=AUTH) as client, \
            tiny_artifact.open("rb") as handle:
        events = list(stream_events(client, "POST", "/evaluate", files={"artifact": ("tiny.pgolf", handle)}))
        types = [event["type"] for event in events]
        assert types[:2] == ["queued", "start"] and types[-1] == "end", types
        chunks = [event for event in events if event["type"] == "chunk"]
        assert len(chunks) >= 2
        assert [chunk["index"] for chunk in chunks] == list(range(len(chunks)))
        end = events[-1]
        assert end["targets_scored"] == sum(chunk["targets"] for chunk in chunks)
        assert end["val_bpb"] == pytest.approx(chunks[-1]["running_bpb"])
        assert end["compliance"]["compliant"] is True

        job_id = events[0]["job_id"]
        job = client.get(f"/evaluations/{job_id}").json()
        assert job["status"] == "completed" and job["result"] == end
        assert list(stream_events(client, "GET", f"/evaluations/{job_id}/events")) == events
        assert files_under(engine_service.storage_dir / "artifacts")[0].read_bytes() == tiny_artifact.read_bytes()
