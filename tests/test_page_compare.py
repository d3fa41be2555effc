"""The page shows the honest-vs-claimed comparison of two jobs on one artifact, in real headless Chromium, with the
picture the service renders (matplotlib) and every engine mode selectable, the measured default preselected."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    AUTH,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    service_data,
    set_fake_behaviour,
    tiny_artifact,
    upload,
    wait_for_status,
)
from test_page import CHROMIUM, chromium

from service.engine.options import NGRAM_MODES, TTT_RECIPE_NAMES, EvalOptions

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="headless Chromium not installed (/usr/bin/chromium; apt-get install chromium)")


@pytest.fixture(scope="module")
def job_pair(service_data: ServiceData, tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
             ) -> Iterator[tuple[ServiceProcess, dict, dict]]:
    root = tmp_path_factory.mktemp("compare-service")
    script = root / "behaviour.json"
    set_fake_behaviour(script, chunks=4, chunk_seconds=0.05)
    with ServiceProcess(root / "storage", service_data, **fake_evaluator_env(script)) as process, \
            httpx.Client(base_url=process.url, timeout=240, headers=AUTH) as client:
        honest = upload(client, tiny_artifact, params={"wait": "false"}).json()["id"]
        claimed = upload(client, tiny_artifact, params={"wait": "false"}, data={"ngram": "hashed-940"}).json()["id"]
        yield (process, wait_for_status(client, honest, {"completed"}, timeout=240),
               wait_for_status(client, claimed, {"completed"}, timeout=240))


def test_page_shows_the_comparison_table_and_picture(job_pair: tuple[ServiceProcess, dict, dict],
                                                     tmp_path: Path) -> None:
    process, honest, claimed = job_pair
    assert honest["options"]["ngram"] == EvalOptions.ngram and honest["options"]["ttt"] is EvalOptions.ttt
    dom = chromium(f"{process.url}/?compare={honest['id']},{claimed['id']}", tmp_path / "profile",
                   "--dump-dom").stdout
    assert re.search(r'<div id="compare-result">', dom), dom[dom.find("compare-panel"):][:1500]
    row = re.search(r'<tr data-row="val_bpb"><th>val_bpb</th><td[^>]*>([^<]+)</td><td[^>]*>([^<]+)</td></tr>', dom)
    assert row is not None, dom[:4000]
    assert row.groups() == (f"{honest['result']['val_bpb']:.6f}", f"{claimed['result']['val_bpb']:.6f}")
    assert re.search(r'<tr data-row="compliant \(engine\)"><th>[^<]+</th><td>yes</td><td class="bad">no</td>', dom)
    plot = re.search(r'<img id="compare-plot"[^>]*>', dom)
    assert plot is not None
    assert f'data-source="/comparisons/plot.svg?a={honest["id"]}&amp;b={claimed["id"]}"' in plot.group(0)
    assert 'src="blob:' in plot.group(0)  # fetched with the page's token, shown from memory
    assert 'data-loaded="true"' in plot.group(0)  # the browser fetched and decoded the matplotlib SVG
    # Every engine mode is offered, the measured default preselected.
    ngram_choice = re.search(r'<select id="ngram"[^>]*>(.*?)</select>', dom, re.DOTALL)
    assert ngram_choice is not None
    assert re.findall(r'<option value="([^"]+)"', ngram_choice.group(1)) == list(NGRAM_MODES)
    assert re.search(rf'<option value="{EvalOptions.ngram}" selected="">', ngram_choice.group(1))
    recipe_choice = re.search(r'<select id="ttt-recipe"[^>]*>(.*?)</select>', dom, re.DOTALL)
    assert recipe_choice is not None
    assert re.findall(r'<option value="([^"]+)"', recipe_choice.group(1)) == list(TTT_RECIPE_NAMES)


def test_comparison_routes_serve_png_svg_and_refuse_unknown_jobs(job_pair: tuple[ServiceProcess, dict, dict]) -> None:
    process, honest, claimed = job_pair
    with httpx.Client(base_url=process.url, timeout=60) as client:
        query = {"a": honest["id"], "b": claimed["id"]}
        png = client.get("/comparisons/plot.png", params=query)
        assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        svg = client.get("/comparisons/plot.svg", params=query)
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert f"job {claimed['id']}" in html.unescape(svg.text)  # the legend names the jobs
        body = client.get("/comparisons", params=query).json()
        assert [side["compliant"] for side in body["sides"]] == [True, False]
        missing = client.get("/comparisons", params={"a": honest["id"], "b": "nope"})
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        schema = client.get("/openapi.json").json()
        form = schema["paths"]["/evaluate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["ngram"]["enum"] == list(NGRAM_MODES)
        assert form["properties"]["ngram"]["default"] == EvalOptions.ngram
        assert form["properties"]["ttt"]["default"] is EvalOptions.ttt
        assert "/comparisons/plot.{image_format}" in schema["paths"]
