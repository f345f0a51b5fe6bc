"""Security: the page serves only generations/, golden/ and cache/; a network bind needs a login that guards every
route; no password reaches a log; `loop import` writes only inside the workspace.

The path tests plant secrets the page must never hand out (a file outside the workspace, a canary next to
loop.db, one in the config, one in a checkpoint, a row in loop.db) and links in the served folders that point
at them. Hypothesis drives the app in-process through a small ASGI caller that builds the request the way
uvicorn does (percent-decoded path, raw bytes kept), since HTTP clients would normalise `..` away; a real
server then gets a handful of raw requests byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loop.bench.rate import add_images
from loop.cli import entry
from loop.errors import LoopError
from loop.rate.handlers import SERVED, golden_path, thumb_path
from loop.rate.page import BackgroundServer, build_app, close_app, serve
from loop.workspace import Workspace

SECRET = b"TOP-SECRET-outside-the-workspace-7f3a"
CANARY = b"CANARY-next-to-loop.db-91c2"
CONFIG_CANARY = b"CANARY-in-the-config-55e1"
CKPT_CANARY = b"CANARY-in-a-checkpoint-0d4b"
DB_CANARY = b"CANARY-row-in-loop.db-a17e"
NEVER = (SECRET, CANARY, CONFIG_CANARY, CKPT_CANARY, DB_CANARY, b"SQLite format 3")


# -- the planted workspace ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A workspace with two images (one UR, in golden/), secrets all around, and links that point at them."""
    top = tmp_path_factory.mktemp("sec")
    outside = top / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    ws = Workspace.init(top / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        ids = add_images(ws, store, 2)
        rows = [store.image(i) for i in ids]
    gold = golden_path(ws, rows[0]["sha256"], rows[0]["path"])
    gold.write_bytes((ws.root / rows[0]["path"]).read_bytes())
    (ws.root / "canary.txt").write_bytes(CANARY)
    with open(ws.root / "configs" / "loop.yaml", "ab") as f:
        f.write(b"# " + CONFIG_CANARY + b"\n")
    ck = ws.checkpoint(1)
    ck.mkdir(parents=True)
    (ck / "adapter_model.safetensors").write_bytes(CKPT_CANARY * 4)
    db = sqlite3.connect(ws.db_path)
    db.execute("CREATE TABLE canary (v TEXT)")
    db.execute("INSERT INTO canary VALUES (?)", (DB_CANARY.decode(),))
    db.commit()
    db.close()
    gen = ws.root / "generations" / "unit_000"
    links = {  # in served folders, pointing out of them
        gen / "leak.png": outside / "secret.txt",
        gen / "dblink.png": ws.db_path,
        gen / "rel.png": Path("../../loop.db"),
        gen / "outdir": outside,
        ws.root / "golden" / "cfg.png": ws.root / "configs" / "loop.yaml",
        ws.root / "golden" / "canary.png": ws.root / "canary.txt",
        ws.root / "cache" / "ckdir": ws.root / "checkpoints",
        ws.root / "cache" / "loopy": ws.root / "cache" / "loopy",  # a link to itself (ELOOP)
    }
    links[thumb_path(ws, rows[1]["sha256"])] = outside / "secret.txt"  # a "thumbnail" that leads out
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    _, app = build_app(ws, warm=10)
    thumbs = [thumb_path(ws, r["sha256"]).relative_to(ws.root / "cache" / "thumbs").as_posix() for r in rows]
    server = BackgroundServer(app)
    yield {"ws": ws, "outside": outside, "app": app, "url": server.url, "rows": rows, "gold": gold, "thumbs": thumbs}
    server.stop()
    close_app(app)


def served_bodies(ws: Workspace) -> set[bytes]:
    """The bytes of every regular file that really lies in generations/, golden/ or cache/."""
    out = set()
    for name in SERVED:
        base = (ws.root / name).resolve()
        for p in base.rglob("*"):
            try:
                if p.is_file() and p.resolve().is_relative_to(base):
                    out.add(p.read_bytes())
            except (OSError, RuntimeError):
                pass
    return out


def asgi_call(app, raw_target: bytes, method: str = "GET", headers=(), body: bytes = b""):
    """Call the ASGI app with the request target as bytes, the scope built as uvicorn builds it (the path
    %-decoded, nothing normalised); returns (status, response headers, body). An exception is a 500."""
    raw_path, _, query = raw_target.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    status, got, chunks, asked = [0], {}, [], []

    async def main():
        done = asyncio.Event()

        async def receive():  # the body once, then the client hangs up when the response is complete
            if not asked:
                asked.append(1)
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                got.update((k.decode().lower(), v.decode("latin-1")) for k, v in msg.get("headers", []))
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    done.set()

        await app(scope, receive, send)

    try:
        asyncio.run(main())
    except Exception as e:  # what uvicorn logs; the client has had a 500 (or nothing)
        return 500, {}, repr(e).encode()
    return status[0], got, b"".join(chunks)


def asgi_request(app, raw_target: bytes, method: str = "GET", headers=()) -> tuple[int, bytes]:
    status, _, body = asgi_call(app, raw_target, method, headers)
    return status, body


def asgi_websocket(app, path: str, headers=()) -> dict:
    """Open a websocket to `path`; the first message the app sends back (an accept or a close)."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "subprotocols": [],
        "state": {},
    }
    sent = []

    async def main():
        async def receive():
            if not sent:
                return {"type": "websocket.connect"}
            return {"type": "websocket.disconnect", "code": 1000}

        async def send(msg):
            sent.append(msg)

        await app(scope, receive, send)

    asyncio.run(main())
    return sent[0]


def raw_http(url: str, request: bytes, timeout: float = 20) -> tuple[int, bytes]:
    """Send bytes as they are to the server at `url`; (status, body). Status 0: the server closed without one."""
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- 1. file serving: a property over request paths ----------------------------------------------------------
PREFIXES = [
    "/loop/files/",
    "/loop/files/generations/",
    "/loop/thumb/",
    "/file=",
    "/gradio_api/file=",
    "/gradio_api/file/",
    "/file/",
    "/gradio_api/proxy=",
    "/static/",
    "/assets/",
    "/svelte/",
    "/loop/static/",
    "/",
]
DOTS = [
    "..",
    ".",
    "...",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "%25252e%25252e",
    "%c0%ae%c0%ae",
    "%e2%80%a4%e2%80%a4",
    "\uff0e\uff0e",
    "..;",
    ".. ",
    "..%00",
    "%00",
    "..\\",
    "\\..",
    "~",
    "%",
    "%zz",
]
NAMES = [
    "generations",
    "golden",
    "cache",
    "checkpoints",
    "configs",
    "generations2",
    "loop.db",
    "loop.db-wal",
    "loop.yaml",
    "prompts.txt",
    "canary.txt",
    "secret.txt",
    "outside",
    "unit_000",
    "unit_001",
    "adapter_model.safetensors",
    "thumbs",
    "leak.png",
    "dblink.png",
    "rel.png",
    "outdir",
    "cfg.png",
    "canary.png",
    "ckdir",
    "loopy",
    "{IMG}",
    "{GOLD}",
    "{WS}",
    "{OUT}",
    "etc",
    "passwd",
    "1",
    "2",
    "01",
    "-1",
    "99999999999999999999999",
    "\u00b2",
    "\u0661",
    "\u00fc",
    "%c3%bc",
    "A" * 300,
]
SEPS = ["/", "//", "/./", "\\", "%2f", "%2F", "%5c", "%252f", "%00/"]
REAL = [  # files that exist: the first three are served, the rest must never be
    "{GEN}/{IMG}",
    "golden/{GOLD}",
    "cache/thumbs/{THUMB}",
    "cache/thumbs/{THUMB1}",
    "{GEN}/leak.png",
    "{GEN}/dblink.png",
    "{GEN}/rel.png",
    "{GEN}/outdir/secret.txt",
    "golden/cfg.png",
    "golden/canary.png",
    "cache/ckdir/unit_001/adapter_model.safetensors",
    "loop.db",
    "loop.db-wal",
    "canary.txt",
    "configs/loop.yaml",
    "checkpoints/unit_001/adapter_model.safetensors",
    "{WS}/loop.db",
    "/{WS}/canary.txt",
    "{OUT}/secret.txt",
    "/{OUT}/secret.txt",
]
atom = st.one_of(st.sampled_from(DOTS), st.sampled_from(NAMES), st.text(max_size=6))
random_paths = st.builds(
    lambda lead, parts: lead + "".join(s + a for s, a in parts)[1:],
    st.sampled_from(["", "{WS}/", "/{WS}/", "{OUT}/", "%2f{WS}/", "{GEN}/"]),
    st.lists(st.tuples(st.sampled_from(SEPS), atom), min_size=1, max_size=7),
)


@st.composite
def near_misses(draw):
    """A real path, bent: detours through '..', separators swapped or encoded, characters %-encoded."""
    parts = draw(st.one_of(st.sampled_from(REAL[:3]), st.sampled_from(REAL))).split("/")
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        k = draw(st.integers(0, len(parts)))
        parts.insert(k, draw(st.sampled_from(["..", "x/..", "%2e%2e", ".", "generations/..", "golden/../.."])))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # %-encode a character, once or twice
        k = draw(st.integers(0, len(parts) - 1))
        if parts[k] and not parts[k].startswith("{"):  # placeholders are filled in later
            i = draw(st.integers(0, len(parts[k]) - 1))
            enc = "%" + format(ord(parts[k][i]), "02X")
            parts[k] = parts[k][:i] + draw(st.sampled_from([enc, enc.replace("%", "%25")])) + parts[k][i + 1 :]
    seps = ["/"] * (len(parts) - 1)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        if seps:
            seps[draw(st.integers(0, len(seps) - 1))] = draw(st.sampled_from(SEPS))
    return parts[0] + "".join(s + p for s, p in zip(seps, parts[1:]))


paths = st.one_of(
    st.builds(
        lambda prefix, rest, query: prefix + rest + query,
        st.sampled_from(PREFIXES),
        st.one_of(random_paths, near_misses()),
        st.sampled_from(["", "", "?path=../loop.db", "?t=1"]),
    ),
    st.builds(lambda rest: "/loop/files/" + rest, near_misses()),
)


def to_target(template: str, p: dict) -> bytes:
    """Fill the placeholders; anything a client cannot send as it is (non-ASCII, controls, space) is %-encoded."""
    ws = p["ws"].root
    text = (
        template.replace("{WS}", ws.as_posix().lstrip("/"))
        .replace("{OUT}", p["outside"].as_posix().lstrip("/"))
        .replace("{GEN}", "generations/unit_000")
        .replace("{IMG}", Path(p["rows"][0]["path"]).name)
        .replace("{GOLD}", p["gold"].name)
        .replace("{THUMB}", p["thumbs"][0])
        .replace("{THUMB1}", p["thumbs"][1])
    )
    return "".join(c if 32 < ord(c) < 127 and c != "#" else quote(c, safe="") for c in text).encode("ascii")


def check_response(p: dict, target: bytes, status: int, body: bytes) -> None:
    if not target.startswith(b"/loop/"):  # Gradio's own routes may fail on odd input, if they fail closed
        assert status != 200 or not any(s in body for s in NEVER), f"{target!r} served a secret"
        return
    assert status in (200, 403, 404), f"{target!r} -> {status}: {body[:200]!r}"
    if status != 200:
        return
    for secret in NEVER:
        assert secret not in body, f"{target!r} served {secret!r}"
    if target.startswith(b"/loop/files/") and body and body not in p.get("bodies", ()):  # (HEAD: no body)
        p["bodies"] = served_bodies(p["ws"])  # first time, or a thumbnail made since
        assert body in p["bodies"], f"{target!r} served a file that is not in generations/, golden/ or cache/"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=paths, method=st.sampled_from(["GET", "GET", "HEAD"]))
def test_files_are_served_only_from_the_served_folders(planted, template, method):
    target = to_target(template, planted)
    status, body = asgi_request(planted["app"], target, method)
    event(f"{target.split(b'/')[1][:12].decode()} {status}")  # --hypothesis-show-statistics
    check_response(planted, target, status, body)


def test_the_harness_reaches_served_files_and_thumbnails(planted):
    """The property above is only worth something if a good path gets 200 through the same caller."""
    p = planted
    rel = p["rows"][0]["path"]
    status, body = asgi_request(p["app"], f"/loop/files/{rel}".encode())
    assert status == 200 and body == (p["ws"].root / rel).read_bytes()
    status, body = asgi_request(p["app"], f"/loop/files/golden/{p['gold'].name}".encode())
    assert status == 200 and body == p["gold"].read_bytes()
    status, body = asgi_request(p["app"], f"/loop/thumb/{p['rows'][0]['id']}".encode())
    assert status == 200 and body[8:12] == b"WEBP"
    status, body = asgi_request(p["app"], f"/loop/thumb/{p['rows'][1]['id']}".encode())
    assert status == 403 and SECRET not in body  # its cached thumbnail is a link out of cache/


def test_odd_numbers_are_400s_not_500s(planted):
    """Ids and filters beyond SQLite's 64-bit integers, or digits that are not ASCII, are refused cleanly."""
    app, json_ct = planted["app"], [(b"content-type", b"application/json")]
    for target in (b"/loop/thumb/99999999999999999999999", b"/loop/thumb/%C2%B2", b"/loop/api/image/%D9%A1"):
        assert asgi_request(app, target)[0] == 404, target
    for target in (b"/loop/api/images?round=99999999999999999999999", b"/loop/api/changes?after_event=-9" + b"9" * 30):
        assert asgi_request(app, target)[0] == 400, target
    for image_id in (b"99999999999999999999999", b"true"):
        body = b'{"rater": "eve", "ratings": [{"image_id": %s, "tier": "UR"}]}' % image_id
        assert asgi_call(app, b"/loop/api/rate", "POST", json_ct, body)[0] == 400, image_id
    for body in (
        b'{"tab": "t", "image_id": 1.5}',
        b'{"tab": "t", "image_id": true}',
        b'{"image_id": 1}',
        b'{"tab": "%s", "image_id": 1}' % (b"x" * 200),
    ):
        assert asgi_call(app, b"/loop/api/claim", "POST", json_ct, body)[0] == 400, body
    assert asgi_request(app, b"/loop/api/changes?tab=" + b"y" * 100)[0] == 400


def raw_request(target: bytes, method: bytes = b"GET", headers: bytes = b"") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"Connection: close\r\n\r\n"


RAW_TARGETS = [
    b"/loop/files/../loop.db",
    b"/loop/files/../../outside/secret.txt",
    b"/loop/files/generations/../../loop.db",
    b"/loop/files/generations/unit_000/../../../outside/secret.txt",
    b"/loop/files/./canary.txt",
    b"/loop/files/%2e%2e/canary.txt",
    b"/loop/files/generations%2f..%2f..%2fcanary.txt",
    b"/loop/files/%252e%252e/loop.db",
    b"/loop/files/..%5cloop.db",
    b"/loop/files/generations\\..\\..\\loop.db",
    b"/loop/files/generations/unit_000/a\x00.png",  # a raw NUL
    b"/loop/files/generations/unit_000/%00",
    b"/loop/files/generations/unit_000/\xc3\xbc.png",  # raw UTF-8
    b"/loop/files/generations/unit_000/leak.png",
    b"/loop/files/generations/unit_000/dblink.png",
    b"/loop/files/generations/unit_000/rel.png",
    b"/loop/files/generations/unit_000/outdir/secret.txt",
    b"/loop/files/golden/cfg.png",
    b"/loop/files/cache/ckdir/unit_001/adapter_model.safetensors",
    b"/loop/files/cache/loopy",
    b"/loop/files//{WS}/loop.db",
    b"/loop/files/{WS}/canary.txt",
    b"/loop/thumb/../../loop.db",
    b"/loop/thumb/{ID1}",
    b"/loop/thumb/1/../../../loop.db",
    b"/../loop.db",
    b"../loop.db",
    b"loop.db",
    b"*",
    b"http://127.0.0.1/loop/files/../loop.db",
    b"http://127.0.0.1/../../{WS}/loop.db",
    b"/gradio_api/file=../loop.db",
    b"/gradio_api/file=/{WS}/loop.db",
    b"/gradio_api/file=/{WS}/canary.txt",
    b"/gradio_api/file=/{OUT}/secret.txt",
    b"/gradio_api/file=/{WS}/generations/unit_000/leak.png",
    b"/gradio_api/file/{WS}/configs/loop.yaml",
    b"/file=/{WS}/loop.db",
    b"/gradio_api/file=%2F{WS}%2Fcanary.txt",
    b"/static/../../../../{WS}/canary.txt",
    b"/assets/..%2f..%2f..%2f..%2f{WS}/canary.txt",
]


def test_raw_requests_to_a_real_server_never_get_a_secret(planted):
    """Byte-for-byte request targets, as a hostile client sends them, to uvicorn on 127.0.0.1."""
    p = planted
    ws_b, out_b = p["ws"].root.as_posix().lstrip("/").encode(), p["outside"].as_posix().lstrip("/").encode()
    for raw in RAW_TARGETS:
        target = raw.replace(b"{WS}", ws_b).replace(b"{OUT}", out_b).replace(b"{ID1}", b"%d" % p["rows"][1]["id"])
        for method in (b"GET", b"HEAD"):
            status, body = raw_http(p["url"], raw_request(target, method))
            assert status in (400, 403, 404, 405), f"{target!r} -> {status}"
            for secret in NEVER:
                assert secret not in body, f"{target!r} served {secret!r}"
    rel = p["rows"][0]["path"].encode()
    status, body = raw_http(p["url"], raw_request(b"/loop/files/" + rel))  # and the server still serves
    assert status == 200 and body == (p["ws"].root / rel.decode()).read_bytes()


# -- 2. a network bind needs a login; the login guards every route -------------------------------------------
@pytest.fixture
def no_serving(monkeypatch):
    """serve() up to the point of serving: what it would build and run is recorded instead."""
    import uvicorn

    import loop.rate.page as page

    calls = []
    monkeypatch.setattr(page, "build_app", lambda ws, cfg=None, auth=None: calls.append(("build", auth)) or (0, "APP"))
    monkeypatch.setattr(page, "close_app", lambda app: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: calls.append(("run", host)))
    return calls


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "[::]", "", "192.168.1.5", "10.0.0.7", "fe80::1", "2001:db8::1", "example.com"]
)
def test_serve_refuses_a_network_bind_without_auth(tmp_path, no_serving, host):
    with pytest.raises(LoopError) as e:
        serve(Workspace(tmp_path), host=host, port=0, auth=None)
    msg = str(e.value)
    assert "\n" not in msg and "--auth user:password" in msg and "--auth-file FILE" in msg and host in msg
    assert no_serving == []  # refused before building or binding anything


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2", "::1", "[::1]"])
def test_serve_allows_loopback_without_auth(tmp_path, no_serving, host):
    if ":" in host and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    logs = []
    serve(Workspace(tmp_path), host=host, port=0, auth=None, log=logs.append)
    assert no_serving == [("build", None), ("run", host.strip("[]"))]
    assert "this machine only" in logs[0]


def test_serve_on_every_interface_with_auth(tmp_path, no_serving):
    logs = []
    serve(Workspace(tmp_path), host="0.0.0.0", port=0, auth=[("ann", "pw")], log=logs.append)
    assert no_serving == [("build", [("ann", "pw")]), ("run", "0.0.0.0")]
    assert "every interface, login required" in logs[0]


@pytest.mark.parametrize("args", [["--host", "::"], ["--host", "[::]"], ["--host", ""], ["--host", "fe80::1"]])
def test_cli_refuses_a_network_bind_without_auth(ws, capsys, args):
    assert entry(["rate", *args, "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--auth user:password or --auth-file FILE" in err and err.count("\n") == 1


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


USERS = [("ann", "s3cret"), ("bob", "p\u00e4ssw\u00f6rd")]
BAD_LOGINS = [
    None,
    basic("ann", "wrong"),
    basic("bob", "s3cret"),  # another user's password
    basic("ann", ""),
    basic("", "s3cret"),
    basic("ann", "s3cret "),
    basic("ANN", "s3cret"),
    basic("ann", "s3cret:more"),
    basic("ann", "s3cre"),
    b"Basic " + base64.b64encode(b"ann:s3cret")[:-2],
    b"Basic " + base64.b64encode(b"ann\xff:s3cret"),
    b"Basic",
    b"Basic !!!",
    b"Basic YW5uOnMzY3JldA==garbage",
    b"Bearer s3cret",
    b"Digest username=ann",
    b"s3cret",
]
GUARDED = [  # (method, path): every kind of route the app has; {id}, {rel} filled in per workspace
    ("GET", "/"),
    ("HEAD", "/"),
    ("GET", "/?round=0"),
    ("GET", "/config"),
    ("GET", "/theme.css"),
    ("GET", "/favicon.ico"),
    ("GET", "/manifest.json"),
    ("GET", "/robots.txt"),
    ("GET", "/static/img/logo.svg"),
    ("GET", "/assets/index.js"),
    ("GET", "/svelte/svelte.js"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/openapi.json"),
    ("GET", "/gradio_api/app_id"),
    ("GET", "/gradio_api/startup-events"),
    ("GET", "/gradio_api/queue/data?session_hash=abc"),
    ("GET", "/gradio_api/queue/status"),
    ("GET", "/gradio_api/heartbeat/abc"),
    ("GET", "/gradio_api/file={abs}"),
    ("GET", "/gradio_api/proxy=https://example.com/x"),
    ("GET", "/gradio_api/upload_progress?upload_id=x"),
    ("GET", "/gradio_api/dev/reload"),
    ("GET", "/gradio_api/vibe-code"),
    ("GET", "/monitoring"),
    ("GET", "/login"),
    ("GET", "/logout"),
    ("POST", "/login"),
    ("POST", "/gradio_api/queue/join"),
    ("POST", "/gradio_api/upload"),
    ("POST", "/gradio_api/run/predict"),
    ("POST", "/gradio_api/api/predict"),
    ("POST", "/gradio_api/call/predict"),
    ("POST", "/gradio_api/component_server"),
    ("POST", "/gradio_api/cancel"),
    ("POST", "/gradio_api/reset"),
    ("OPTIONS", "/loop/api/meta"),
    ("GET", "/loop/api/meta"),
    ("GET", "/loop/api/images?round=0"),
    ("GET", "/loop/api/changes?after_event=0&after_image=0"),
    ("GET", "/loop/api/counters"),
    ("GET", "/loop/api/image/{id}"),
    ("GET", "/loop/api/ab/pair"),
    ("GET", "/loop/api/ab/ranking"),
    ("GET", "/loop/api/ab/units"),
    ("POST", "/loop/api/rate"),
    ("POST", "/loop/api/undo"),
    ("POST", "/loop/api/claim"),
    ("POST", "/loop/api/finish"),
    ("POST", "/loop/api/ab/vote"),
    ("POST", "/loop/api/ab/undo"),
    ("GET", "/loop/thumb/{id}"),
    ("GET", "/loop/ab/image/sometoken/left"),
    ("GET", "/loop/files/{rel}"),
    ("GET", "/loop/files/../loop.db"),
    ("GET", "/no/such/route"),
]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("auth") / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        (i,) = add_images(ws, store, 1)
        rel = store.image(i)["path"]
    _, app = build_app(ws, auth=USERS, warm=0)
    fill = {"{id}": str(i), "{rel}": rel, "{abs}": str(ws.root / rel)}
    yield {"ws": ws, "app": app, "id": i, "rel": rel, "fill": fill}
    close_app(app)


def _target(path: str, fill: dict) -> bytes:
    for k, v in fill.items():
        path = path.replace(k, v)
    return path.encode()


def test_every_route_answers_401_without_a_good_login(guarded):
    json_ct = (b"content-type", b"application/json")
    for method, path in GUARDED:
        target = _target(path, guarded["fill"])
        for login in BAD_LOGINS:
            headers = [json_ct] + ([(b"authorization", login)] if login is not None else [])
            status, got, body = asgi_call(guarded["app"], target, method, headers, b'{"rater": "x"}')
            assert status == 401, f"{method} {path} with {login!r} -> {status}"
            assert got["www-authenticate"].startswith("Basic realm=") and body == b"login required\n"
    for login in BAD_LOGINS[:4]:  # websockets too: closed before the app sees them
        headers = [(b"authorization", login)] if login is not None else []
        assert asgi_websocket(guarded["app"], "/gradio_api/queue/join", headers) == {
            "type": "websocket.close",
            "code": 1008,
        }


def test_a_good_login_opens_every_route(guarded):
    g = guarded
    for user, password in USERS:
        ok = [(b"authorization", basic(user, password))]
        expect = {
            "/": 200,
            "/config": 200,
            "/theme.css": 200,
            "/gradio_api/info": 200,
            "/loop/api/meta": 200,
            "/loop/api/images?round=0": 200,
            "/loop/api/image/{id}": 200,
            "/loop/thumb/{id}": 200,
            "/loop/api/ab/units": 200,
            "/loop/ab/image/sometoken/left": 404,  # a pair this server never served
            "/loop/files/{rel}": 200,
            "/loop/files/../loop.db": 403,  # the login opens the routes, not the workspace
            "/gradio_api/file={abs}": 403,
            "/no/such/route": 404,
        }
        for path, want in expect.items():
            status, body = asgi_request(g["app"], _target(path, g["fill"]), headers=ok)
            assert status == want, f"{user}: {path} -> {status}"
        lower = [(b"authorization", b"basic " + base64.b64encode(f"{user}:{password}".encode()))]
        assert asgi_request(g["app"], b"/loop/api/meta", headers=lower)[0] == 200  # the scheme is case-blind
        body = b'{"rater": "%s", "ratings": [{"image_id": %d, "tier": "SR"}]}' % (user.encode(), g["id"])
        status, _, out = asgi_call(
            g["app"], b"/loop/api/rate", "POST", ok + [(b"content-type", b"application/json")], body
        )
        assert status == 200 and b'"SR"' in out
        msg = asgi_websocket(g["app"], "/gradio_api/no-socket-here", ok)
        assert msg.get("code") != 1008  # past the login: the app itself answers (it has no websocket routes)


# -- 3. no password in any log -------------------------------------------------------------------------------
PW, FILE_PW, WRONG_PW = "s3cretPW-4e1f", "fileSecret-99a0", "wrongPW-c3d2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_real_cli_never_logs_a_password(tmp_path):
    """`loop rate --listen --auth ... --auth-file ...` in a subprocess: good, bad and odd logins, then Ctrl+C."""
    ws = Workspace.init(tmp_path / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        (i,) = add_images(ws, store, 1)
        rel = store.image(i)["path"].encode()
    users = tmp_path / "raters.txt"
    users.write_text(f"# raters\nbob:{FILE_PW}\n", encoding="utf-8")
    port = _free_port()
    cmd = [sys.executable, "-m", "loop", "rate", "--listen", "--auth", f"ann:{PW}", "--auth-file", str(users)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "-w", str(ws.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, "the server stopped: " + proc.communicate()[1].decode()[-2000:]
            try:
                assert raw_http(url, raw_request(b"/"))[0] == 401
                break
            except OSError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.3)
        good = [b"Authorization: " + basic("ann", PW) + b"\r\n", b"Authorization: " + basic("bob", FILE_PW) + b"\r\n"]
        bad = [
            b"Authorization: " + basic("ann", WRONG_PW) + b"\r\n",
            b"Authorization: " + basic(PW, PW) + b"\r\n",
            b"Authorization: Basic " + PW.encode() + b"\r\n",  # not base64: the raw password
            b"Authorization: " + PW.encode() + b"\r\n",
        ]
        for path in (b"/", b"/loop/api/meta", b"/loop/files/" + rel, b"/loop/thumb/%d" % i):
            for h in bad:
                assert raw_http(url, raw_request(path, headers=h))[0] == 401
            for h in good:
                assert raw_http(url, raw_request(path, headers=h))[0] == 200, path
        for path, want in ((b"/loop/files/../loop.db", 403), (b"/loop/api/image/999", 404), (b"/nope", 404)):
            assert raw_http(url, raw_request(path, headers=good[0]))[0] == want
        post = raw_request(
            b"/loop/api/rate", b"POST", good[0] + b"Content-Type: application/json\r\nContent-Length: 5\r\n"
        )
        assert raw_http(url, post + b"{bad}")[0] == 400
        assert (
            raw_http(url, b"GET /\x00 HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic("ann", PW) + b"\r\n\r\n")[0]
            == 400
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    logs = out + err
    assert b"rating page: http://" in out and b"login required" in out  # the logs were captured
    for secret in (PW, FILE_PW, WRONG_PW):
        for form in (secret, base64.b64encode(f"ann:{secret}".encode()).decode(), f"bob:{secret}"):
            assert form.encode() not in logs, f"{form!r} is in the server's output:\n{logs.decode()[-3000:]}"
    assert b"authorization" not in logs.lower()


@pytest.mark.parametrize(
    "line",
    [PW, f":{PW}", f"{PW}:", f"   {PW}   ", f"ann {PW}", f"ann\t{PW}"],
    ids=["bare", "nouser", "nopw", "sp", "space", "tab"],
)
def test_bad_login_lines_are_refused_without_repeating_them(ws, tmp_path, capsys, line):
    f = tmp_path / "raters.txt"
    f.write_text(f"ann:fine\n{line}\n", encoding="utf-8")
    for args in (["--auth", line], ["--auth-file", str(f)]):
        assert entry(["rate", "--listen", *args, "-w", str(ws.root)]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and "user:password" in err
        assert PW not in out + err
    with pytest.raises(LoopError) as e:  # --debug shows the traceback: no password there either
        entry(["--debug", "rate", "--listen", "--auth", line, "-w", str(ws.root)])
    assert PW not in "".join(traceback.format_exception(e.value))


# -- 4. `loop import` writes only inside the workspace -------------------------------------------------------
def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, seed * 90 % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _snapshot(top: Path, skip: Path) -> dict:
    """Every path under `top` but `skip`: a link's target, a file's bytes, or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        if d == skip or skip in d.parents:
            continue
        for name in dirnames + filenames:
            p = d / name
            if p == skip:
                continue
            out[p] = os.readlink(p) if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes())
    return out


def _workspace_files(ws: Workspace) -> set[str]:
    return {p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*") if p.is_file()}


def test_import_writes_only_into_golden(tmp_path, monkeypatch):
    """Hostile names (`..evil.png`, backslashes, a leading dash), links out of the folder, a dangling link, a
    caption naming a path, a relative source folder and a --source label with separators: new files appear
    only in golden/, named by their sha256, and nothing outside the workspace changes."""
    ws = Workspace.init(tmp_path / "ws")
    src = tmp_path / "in" / "deep"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pic.png").write_bytes(_png(1))
    (tmp_path / "elsewhere" / "dir").mkdir()
    (tmp_path / "elsewhere" / "dir" / "other.png").write_bytes(_png(2))
    (src / "..evil.png").write_bytes(_png(3))
    (src / "..evil.txt").write_text("../../../etc/passwd\n")
    (src / "..\\..\\evil2.png").write_bytes(_png(4))
    (src / "sub" / "-rf.png").write_bytes(_png(5))
    (src / "link.png").symlink_to(tmp_path / "elsewhere" / "pic.png")
    (src / "linkdir").symlink_to(tmp_path / "elsewhere" / "dir")
    (src / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (src / "not-an-image.png").write_bytes(b"../../evil")
    before_out, before_ws = _snapshot(tmp_path, ws.root), _workspace_files(ws)
    monkeypatch.chdir(ws.root)
    label = "../../evil/x\\y"
    assert entry(["import", "../in/deep", "--source", label, "--tier", "UR", "-w", "."]) == 0
    assert _snapshot(tmp_path, ws.root) == before_out  # nothing outside the workspace was written or removed
    new = {n for n in _workspace_files(ws) - before_ws if not n.startswith("loop.db")}
    with ws.store() as store:
        rows = store.db.execute("SELECT path, source FROM images").fetchall()
    named = {f"golden/{hashlib.sha256(_png(k)).hexdigest()[:16]}.png": k for k in (1, 2, 3, 4, 5)}
    assert new == {r["path"] for r in rows} and new <= set(named) and {1, 3, 4, 5} <= {named[n] for n in new}
    assert {r["source"] for r in rows} == {label}  # the label is only ever a label
    assert not list(tmp_path.rglob("evil")) and not (ws.root / "evil").exists()


def test_import_refuses_a_golden_that_leads_out_of_the_workspace(tmp_path, capsys):
    ws = Workspace.init(tmp_path / "ws")
    out = tmp_path / "out"
    out.mkdir()
    data = _png(7)
    (ws.root / "golden").rmdir()
    (ws.root / "golden").symlink_to(out, target_is_directory=True)
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(data)
    before = _snapshot(out, ws.root)
    assert entry(["import", str(src), "-w", str(ws.root)]) == 2
    assert "outside the workspace" in capsys.readouterr().err
    assert _snapshot(out, ws.root) == before
    with ws.store() as store:
        assert store.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0


def test_import_replaces_a_link_out_of_golden_instead_of_writing_through_it(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    out = tmp_path / "out"
    out.mkdir()
    data = _png(7)
    (out / "victim.png").write_bytes(b"keep me")
    planted = ws.root / "golden" / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
    planted.symlink_to(out / "victim.png")
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(data)
    assert entry(["import", str(src), "-w", str(ws.root)]) == 0
    assert (out / "victim.png").read_bytes() == b"keep me"
    assert not planted.is_symlink() and planted.read_bytes() == data


def test_import_does_not_write_through_a_link_planted_in_golden(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    data = _png(8)
    config = ws.root / "configs" / "loop.yaml"
    kept = config.read_bytes()
    (ws.root / "golden" / f"{hashlib.sha256(data).hexdigest()[:16]}.png").symlink_to(config)
    (tmp_path / "a.png").write_bytes(data)
    link = ws.root / "golden" / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
    entry(["import", str(tmp_path / "a.png"), "-w", str(ws.root)])
    assert config.read_bytes() == kept
    with ws.store() as store:
        rows = [r[0] for r in store.db.execute("SELECT path FROM images")]
    assert rows == [] or (rows == [ws.rel(link.parent) + "/" + link.name] and link.read_bytes() == data)


# -- 4. whom a rating is by, and who may send one --------------------------------------------------------------
JSON_CT = (b"content-type", b"application/json")


def _who_rated(ws, image_id: int) -> list[tuple]:
    with ws.store() as store:
        return [
            (r["rater"], r["tier"])
            for r in store.db.execute("SELECT rater, tier FROM ratings WHERE image_id = ? ORDER BY id", (image_id,))
        ]


def test_with_a_login_ratings_are_by_the_logged_in_user_whatever_the_body_says(guarded):
    g, ann, bob = guarded, [(b"authorization", basic(*USERS[0]))], [(b"authorization", basic(*USERS[1]))]
    before = len(_who_rated(g["ws"], g["id"]))
    body = b'{"rater": "dave", "ratings": [{"image_id": %d, "tier": "UR"}]}' % g["id"]
    assert asgi_call(g["app"], b"/loop/api/rate", "POST", ann + [JSON_CT], body)[0] == 200
    assert _who_rated(g["ws"], g["id"])[before:] == [("ann", "UR")]  # not dave
    # bob cannot undo ann's rating by naming her: his undo is his own (he has none)
    assert asgi_call(g["app"], b"/loop/api/undo", "POST", bob + [JSON_CT], b'{"rater": "ann"}')[0] == 200
    with g["ws"].store() as store:
        row = store.db.execute("SELECT rater, tier FROM current_tiers WHERE image_id = ?", (g["id"],)).fetchone()
        undone = store.db.execute("SELECT rater FROM ratings WHERE undoes IS NOT NULL").fetchall()
    assert tuple(row) == ("ann", "UR") and all(r["rater"] != "ann" for r in undone)
    status, _, out = asgi_call(g["app"], b"/loop/api/meta", "GET", ann)
    assert status == 200 and b'"login":"ann"' in out.replace(b": ", b":")
    # a claim shows the login too, not the name in the body
    with g["ws"].store() as store:
        (fresh,) = add_images(g["ws"], store, 1, seed=5)  # unrated: a rated image is nobody's to claim
    claim = b'{"tab": "t-ann", "image_id": %d, "rater": "dave"}' % fresh
    assert asgi_call(g["app"], b"/loop/api/claim", "POST", ann + [JSON_CT], claim)[0] == 200
    status, _, out = asgi_call(g["app"], b"/loop/api/images?tab=t-bob", "GET", bob)
    assert status == 200 and json.loads(out)["claims"] == [[fresh, "ann"]]
    asgi_call(g["app"], b"/loop/api/claim", "POST", ann + [JSON_CT], b'{"tab": "t-ann", "image_id": null}')


def test_rater_names_are_plain_text_on_the_progress_tab(tmp_path):
    from loop.rate.handlers import RateHandlers
    from loop.rate.page import progress_markdown

    ws = Workspace.init(tmp_path / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        (i,) = add_images(ws, store, 1)
    h = RateHandlers(ws, ws.store())
    evil = "<a href=//evil.example>login</a>"
    h.rate([(i, "SR")], evil)
    md = progress_markdown(h)
    h.store.close()
    assert "<a" not in md and "&lt;a href=//evil\\.example&gt;login&lt;/a&gt;" in md


@pytest.mark.parametrize(
    "method, path, headers, want",
    [
        ("GET", b"/loop/api/meta", [(b"host", b"127.0.0.1:7860")], 200),
        ("GET", b"/loop/api/meta", [(b"host", b"localhost:7860")], 200),
        ("GET", b"/loop/api/meta", [(b"host", b"[::1]:7860")], 200),
        # DNS rebinding: a page on attacker.example whose name now points at 127.0.0.1
        ("GET", b"/loop/api/meta", [(b"host", b"attacker.example:7860")], 403),
        ("GET", b"/", [(b"host", b"attacker.example")], 403),
        # another local web app (another port) posting, or asking first
        ("POST", b"/loop/api/finish", [(b"host", b"127.0.0.1:7860"), (b"origin", b"http://localhost:3000")], 403),
        ("OPTIONS", b"/loop/api/rate", [(b"host", b"127.0.0.1:7860"), (b"origin", b"http://127.0.0.1:9999")], 403),
        # the page itself
        ("POST", b"/loop/api/undo", [(b"host", b"127.0.0.1:7860"), (b"origin", b"http://127.0.0.1:7860")], 200),
    ],
)
def test_without_a_login_only_this_machine_and_the_page_itself_are_answered(planted, method, path, headers, want):
    body = b'{"rater": "nobody"}'
    status, got, _ = asgi_call(planted["app"], path, method, headers + [JSON_CT], body)
    assert status == want, (method, path, headers, status)
    assert "access-control-allow-origin" not in got


def test_a_port_left_in_time_wait_can_be_served_again_and_a_live_one_cannot():
    from loop.rate.page import check_port

    # a server that closes a connection first leaves it in TIME_WAIT on its port for about a minute: what a page
    # leaves behind after Ctrl+C. The restart on that port must work (the open page retries that address).
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's (asyncio's) listening socket has
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    port = lst.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = lst.accept()
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    time.sleep(0.1)
    client.close()
    lst.close()
    check_port("127.0.0.1", port)
    # another program listening there: one clear line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(LoopError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*choose another with --port"):
            check_port("127.0.0.1", busy.getsockname()[1])
