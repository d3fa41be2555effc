"""Demo client of the compose `demo` profile: upload an artifact to the service and keep its evaluation report.

Does what `curl -N -F artifact=@model.pgolf http://127.0.0.1:8000/evaluate > report.ndjson` does, with the
standard library only (the images carry no curl): one multipart POST, then the NDJSON event stream copied line
by line to the report file while a short summary of each event goes to stdout. Exits 0 only when the stream ends
with an `end` event, so the verifier that runs next always gets a finished evaluation.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

READ_TIMEOUT_SECONDS = 1800.0  # between two events; the service's own eval limit is far below this


def multipart_body(field: str, path: Path) -> tuple[bytes, str]:
    """The artifact as a multipart/form-data body (it is at most 16 MB, so it is built in memory)."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + path.read_bytes() + tail, f"multipart/form-data; boundary={boundary}"


def summary(event: dict) -> str:
    fields = {key: value for key, value in event.items() if isinstance(value, (int, float, str, bool))}
    return json.dumps(fields)[:300]


def upload(url: str, artifact: Path, report: Path) -> int:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                            timeout=READ_TIMEOUT_SECONDS)
    body, content_type = multipart_body("artifact", artifact)
    connection.request("POST", f"{parts.path.rstrip('/')}/evaluate", body=body,
                       headers={"Content-Type": content_type, "Accept": "application/x-ndjson"})
    response = connection.getresponse()
    if response.status != 200:
        print(f"demo-client: POST /evaluate answered {response.status}: {response.read(4096)!r}", file=sys.stderr)
        return 1
    print(f"demo-client: evaluation {response.getheader('X-Evaluation-Id')} streaming to {report}", flush=True)
    last_type = None
    report.parent.mkdir(parents=True, exist_ok=True)
    with report.open("wb") as out:
        for line in response:  # one JSON event per line, flushed by the service as it happens
            if not line.strip():
                continue
            out.write(line)
            out.flush()
            event = json.loads(line)
            last_type = event.get("type")
            print(f"demo-client: {summary(event)}", flush=True)
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
    return upload(args.url, args.artifact, args.report)


if __name__ == "__main__":
    sys.exit(main())
