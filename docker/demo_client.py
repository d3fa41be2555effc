"""Demo client of the compose `demo` profile: upload an artifact to the service and keep its evaluation report.

Does what `curl -N -H "Authorization: Bearer $PGOLF_API_TOKEN" -F artifact=@model.pgolf
http://127.0.0.1:8000/evaluate > report.ndjson` does (the images carry no curl) with the project's own client,
`service.demo.upload_and_stream`: the NDJSON event stream is
copied line by line to the report file while a short summary of each event goes to stdout. Exits 0 only when
the stream ends with an `end` event, so the verifier that runs next always gets a finished evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
from pathlib import Path

from service.demo import upload_and_stream


def summary(event: dict) -> str:
    fields = {key: value for key, value in event.items() if isinstance(value, (int, float, str, bool))}
    return json.dumps(fields)[:300]


def upload(url: str, artifact: Path, report: Path, token: str) -> int:
    last_type = None
    report.parent.mkdir(parents=True, exist_ok=True)
    print(f"demo-client: uploading {artifact} to {url}/evaluate, streaming to {report}", flush=True)
    try:
        with report.open("w") as out:
            for event in upload_and_stream(url, artifact, token=token):
                out.write(json.dumps(event) + "\n")
                out.flush()
                last_type = event.get("type")
                print(f"demo-client: {summary(event)}", flush=True)
    except urllib.error.HTTPError as error:
        print(f"demo-client: POST /evaluate answered {error.code}: {error.read(4096)!r}", file=sys.stderr)
        return 1
    except (OSError, json.JSONDecodeError) as error:
        print(f"demo-client: the evaluation stream broke: {error}", file=sys.stderr)
        return 1
    if last_type != "end":
        print(f"demo-client: the evaluation finished with {last_type!r}, not 'end'", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="where the NDJSON events are written")
    args = parser.parse_args()
    token = os.environ.get("PGOLF_API_TOKEN")
    if not token:
        print("demo-client: set PGOLF_API_TOKEN to the service's token", file=sys.stderr)
        return 2
    return upload(args.url, args.artifact, args.report, token)


if __name__ == "__main__":
    sys.exit(main())
