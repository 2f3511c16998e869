"""`cacheblend ingest --server URL`: documents uploaded to a running server (its background
lane precomputes them), progress shown, failures one line and a non-zero exit."""

from __future__ import annotations

import httpx
import pytest

from cacheblend.cli import main
from tests.server.server_helpers import API_KEY, HEADERS

pytestmark = pytest.mark.slow


def test_ingest_through_the_server(live, tmp_path, capsys):
    paths = []
    for index in range(3):
        path = tmp_path / f"note {index}.txt"
        path.write_text(f"Note {index}: the lighthouse keeper logged storm {index} at dawn.")
        paths.append(str(path))
    assert main(["ingest", "--server", live.url, "--api-key", API_KEY, *paths]) == 0
    out = capsys.readouterr().out
    assert out.count('"already_stored": false') == 3
    with httpx.Client(base_url=live.url, headers=HEADERS, timeout=60) as client:
        stored = client.post("/v1/documents", json={"documents": [
            {"id": "note-1.txt", "text": "Note 1: the lighthouse keeper logged storm 1 at dawn."}
        ]}).json()["data"][0]
    assert stored["cached"]  # the server precomputed and stored it under the same key
    assert main(["ingest", "--server", live.url, "--api-key", API_KEY, *paths]) == 0
    assert capsys.readouterr().out.count('"already_stored": true') == 3


def test_ingest_through_a_server_that_refuses_is_one_line(live, tmp_path, capsys):
    path = tmp_path / "a.txt"
    path.write_text("Some text.")
    assert main(["ingest", "--server", live.url, "--api-key", "wrong", str(path)]) == 2
    err = capsys.readouterr().err  # the progress bar, then one line
    assert err.splitlines()[-1].startswith("error: ") and "401" in err
    assert "Traceback" not in err
    assert main(["ingest", "--server", "http://127.0.0.1:9", str(path)]) == 2
    assert "cannot reach" in capsys.readouterr().err
