"""docs/serving.md's examples, run as written against the live server: each curl command is
sent with httpx with the same method, headers and body (curl's own default content type for
``-d`` included), each Python block is executed with the OpenAI client pointed at the server.
And the doc lists every option the protocol knows, supported or refused."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from cacheblend.server.protocol import (
    IGNORED,
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
)
from tests.server.server_helpers import API_KEY

SERVING = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SERVING.read_text(), re.DOTALL)


def curl_commands() -> list[list[str]]:
    commands = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            if line.strip().startswith("curl "):
                commands.append(shlex.split(line.replace("$KEY", API_KEY), comments=True))
    return commands


def as_request(argv: list[str], base: str) -> tuple[str, str, dict, bytes | None]:
    """(method, url, headers, body) of a curl command line: -s, -X, -H, -d, a URL."""
    method, headers, body, url = None, {}, None, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-s":
            continue
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(args).encode()
        else:
            url = arg
    assert url is not None and url.startswith("localhost:8000/"), argv
    if body is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/x-www-form-urlencoded"  # what curl -d sends
    return method or ("POST" if body is not None else "GET"), base + url[len("localhost:8000"):], \
        headers, body


def test_curl_examples_run_as_written(live):
    import httpx

    commands = curl_commands()
    assert len(commands) >= 7
    uploaded = None
    with httpx.Client(timeout=120) as http:
        for argv in commands:
            method, url, headers, body = as_request(argv, live.url)
            response = http.request(method, url, headers=headers, content=body)
            assert response.status_code == 200, (argv, response.text)
            if url.endswith("/v1/documents") and method == "POST":
                uploaded = response.json()["data"]
            if url.endswith("/detokenize"):
                assert response.json() == {"prompt": "Hello world"}
            if url.endswith("/tokenize"):
                assert response.json()["tokens"] == [19556, 905]  # what the next one decodes
    assert [d["id"] for d in uploaded][1] == "lighthouse"


def test_python_examples_run_as_written(live, model_name, capsys):
    (source,) = [b for b in blocks("python") if "OpenAI(" in b]
    assert f'model="{model_name}"' in source
    with __import__("httpx").Client(timeout=120) as http:  # the upload example comes first
        http.post(f"{live.url}/v1/documents", headers={"Authorization": f"Bearer {API_KEY}"},
                  json={"documents": [{"id": "lighthouse", "text": "The Greywater Lighthouse "
                                       "was designed by the engineer Miriam Osk in 1798."}]})
    source = source.replace("http://127.0.0.1:8000", live.url)
    exec(compile(source, str(SERVING), "exec"), {"KEY": API_KEY})  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].isdigit() and "'method'" in printed[-1]


def test_every_option_is_documented():
    text = SERVING.read_text()
    fields = {*ChatCompletionRequest.model_fields, *CompletionRequest.model_fields}
    for name in sorted(fields | set(UNSUPPORTED) | set(IGNORED)):
        assert re.search(rf"`{name}[`.: ]", text), name
