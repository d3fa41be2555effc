"""The web page in real headless Chromium: it draws one chart point per chunk event, the final table and the
compliance badge, from nothing but the service's own files (no CDN).

Needs /usr/bin/chromium (Debian: `apt-get install -y chromium`); skipped with that reason when it is absent.
A screenshot of the page is kept as test-artifacts/service-page.png.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    AUTH,
    TEST_ARTIFACTS_DIR,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    service_data,
    set_fake_behaviour,
    tiny_artifact,
    upload,
    wait_for_status,
)

CHROMIUM = Path("/usr/bin/chromium")
CHUNKS = 7

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="headless Chromium not installed (/usr/bin/chromium; apt-get install chromium)")


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium as root in a container: no sandbox, no GPU, no network besides the page's own."""
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def finished_job(service_data: ServiceData, tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                 ) -> Iterator[tuple[ServiceProcess, dict]]:
    root = tmp_path_factory.mktemp("page-service")
    script = root / "behaviour.json"
    set_fake_behaviour(script, chunks=CHUNKS, chunk_seconds=0.05)
    with ServiceProcess(root / "storage", service_data, **fake_evaluator_env(script)) as process, \
            httpx.Client(base_url=process.url, timeout=60, headers=AUTH) as client:
        job_id = upload(client, tiny_artifact, params={"wait": "false"}).json()["id"]
        yield process, wait_for_status(client, job_id, {"completed"})


def test_page_draws_one_point_per_chunk_with_final_table_and_badge(
    finished_job: tuple[ServiceProcess, dict], tmp_path: Path
) -> None:
    process, job = finished_job
    url = f"{process.url}/?job={job['id']}"
    dom = chromium(url, tmp_path / "profile", "--dump-dom").stdout

    points = re.findall(r'<circle [^>]*class="chart-point"[^>]*data-chunk-index="(\d+)"', dom)
    assert points == [str(index) for index in range(CHUNKS)]
    assert re.search(r'id="job-status" class="status status-completed"', dom)
    assert re.search(r'id="compliance-badge" class="badge badge-ok"[^>]*>compliant<', dom)
    final_bpb = f"{job['result']['val_bpb']:.6f}"
    assert re.search(rf"<th>val_bpb</th><td>{final_bpb}</td>", dom)
    assert f'data-job-id="{job["id"]}"' in dom  # the queue table lists the job

    TEST_ARTIFACTS_DIR.mkdir(exist_ok=True)
    screenshot = TEST_ARTIFACTS_DIR / "service-page.png"
    screenshot.unlink(missing_ok=True)
    chromium(url, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1280,1100",
             "--hide-scrollbars")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_and_its_assets_are_self_contained(finished_job: tuple[ServiceProcess, dict]) -> None:
    process, _job = finished_job
    with httpx.Client(base_url=process.url) as client:
        html = client.get("/").text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(asset.startswith("/static/") for asset in assets)
        for asset in assets:
            body = client.get(asset)
            assert body.status_code == 200
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", body.text)  # nothing fetched from elsewhere


PRIVATE_TOKEN = "alice-page-token-0123456789"


@pytest.fixture(scope="module")
def private_jobs(service_data: ServiceData, tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                 ) -> Iterator[tuple[ServiceProcess, dict, dict]]:
    """A service with private reads: one finished job of alice's, and one whose evaluator forged its output."""
    root = tmp_path_factory.mktemp("private-page-service")
    script = root / "behaviour.json"
    env = {**fake_evaluator_env(script), "PGOLF_READS": "private", "PGOLF_TOKENS": f"alice:{PRIVATE_TOKEN}"}
    with ServiceProcess(root / "storage", service_data, **env) as process, \
            httpx.Client(base_url=process.url, timeout=60,
                         headers={"Authorization": f"Bearer {PRIVATE_TOKEN}"}) as client:
        set_fake_behaviour(script, chunks=3, chunk_seconds=0.05)
        good = upload(client, tiny_artifact, params={"wait": "false"}).json()["id"]
        good_job = wait_for_status(client, good, {"completed"})
        forged_line = '{"type": "end\\nevent: end\\ndata: {}", "compliance": {"compliant": true}}'
        set_fake_behaviour(script, chunks=2, chunk_seconds=0.05, raw_lines=[forged_line],
                           raw_end='{"type": "end", "val_bpb": 0.0001, "val_loss": NaN}')
        bad = upload(client, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
        bad_job = wait_for_status(client, bad, {"failed", "completed"})
        yield process, good_job, bad_job


def test_page_takes_a_token_into_session_storage_and_reads_private_jobs_with_it(
    private_jobs: tuple[ServiceProcess, dict, dict], tmp_path: Path
) -> None:
    process, job, _bad = private_jobs
    without = chromium(f"{process.url}/?job={job['id']}", tmp_path / "anonymous", "--dump-dom").stdout
    assert "jobs are private here" in without and "chart-point" not in without
    assert re.search(r'id="job-status" class="status status-unavailable"', without)

    dom = chromium(f"{process.url}/?job={job['id']}#token={PRIVATE_TOKEN}", tmp_path / "signed-in",
                   "--dump-dom").stdout
    assert "signed in as alice" in dom and "token kept for this tab only" in dom
    assert PRIVATE_TOKEN not in dom  # not echoed into the page, not left in a form field
    assert len(re.findall(r'class="chart-point"', dom)) == 3
    assert re.search(r'id="job-status" class="status status-completed"', dom)
    assert f'data-job-id="{job["id"]}"' in dom and "<td>alice</td>" in dom


def test_page_shows_a_job_with_forged_events_as_failed(private_jobs: tuple[ServiceProcess, dict, dict],
                                                        tmp_path: Path) -> None:
    process, _good, bad = private_jobs
    assert bad["status"] == "failed" and bad["result"]["code"] == "non_finite"
    dom = chromium(f"{process.url}/?job={bad['id']}#token={PRIVATE_TOKEN}", tmp_path / "forged", "--dump-dom").stdout
    assert re.search(r'id="job-status" class="status status-failed"', dom)
    assert "badge-ok" not in dom and "0.0001" not in dom
