"""The rating page: a Gradio Blocks app (Rate and Progress tabs) plus the small JSON routes its grid uses.

    loop rate [-w DIR] [--port 7860]                    http://127.0.0.1:7860, this machine only
    loop rate --listen --auth user:password             every interface, behind HTTP basic auth

The Rate tab is a gr.HTML whose script (static/rate.js) draws a virtualised grid and rates with one key per
decision. It does not go through Gradio events, which cost a round trip and a re-render each: it calls the
routes under /loop/api/ (handlers.py), so a tile shows its tier at once and the rating is durable in SQLite a
few milliseconds later. Files come only from generations/, golden/ and cache/ (/loop/files/, /loop/thumb/);
Gradio's own file route is blocked for the whole workspace. With auth, one basic-auth check guards every
route: the page, Gradio's API, the JSON routes and the files.
"""

from __future__ import annotations

import base64
import binascii
import html
import ipaddress
import os
import secrets
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a local tool

import gradio as gr  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from loop.config import TIERS, LoopConfig  # noqa: E402
from loop.errors import LoopError  # noqa: E402
from loop.rate.ab import ABVotes, ranking_html  # noqa: E402
from loop.rate.handlers import BadRequest, Claims, Forbidden, NotFound, RateHandlers  # noqa: E402
from loop.store import PHASES  # noqa: E402
from loop.workspace import Workspace  # noqa: E402

STATIC = Path(__file__).parent / "static"
DEFAULT_PORT = 7860
NO_STORE = {"Cache-Control": "no-store"}
AUTH_USER = "loop_auth_user"
IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}


# -- auth --------------------------------------------------------------------------------------------------
def parse_auth(auth: str | None = None, auth_file: Path | None = None) -> list[tuple[str, str]]:
    """Users from `--auth user:password` and/or an auth file (one user:password per line, '#' comments)."""
    lines = []
    if auth is not None:
        lines.append(("--auth", auth))
    if auth_file is not None:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except OSError as e:
            raise LoopError(f"cannot read the auth file {auth_file}: {e.strerror}") from None
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append((f"{auth_file}:{n}", line.strip()))
        if not any(src != "--auth" for src, _ in lines):
            raise LoopError(f"the auth file {auth_file} has no user:password line")
    users = []
    for src, item in lines:
        user, sep, password = item.partition(":")
        if not sep or not user or not password:  # the message never repeats the value: it may be a password
            why = "there is no ':'" if not sep else "the user or the password is empty"
            raise LoopError(f"{src}: give user:password, both non-empty ({why})")
        users.append((user, password))
    return users


class BasicAuth:
    """ASGI middleware: every HTTP request and websocket needs one of the users' basic-auth credentials."""

    def __init__(self, app, users: list[tuple[str, str]], realm: str = "loop rate"):
        self.app = app
        self.users = [(u.encode(), p.encode()) for u, p in users]
        self.realm = realm

    def allowed(self, header: bytes | None) -> bool:
        return self.user(header) is not None

    def user(self, header: bytes | None) -> str | None:
        """The logged-in user's name, or None."""
        if not header or not header[:6].lower() == b"basic ":
            return None
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        found = None
        for u, p in self.users:  # compare with every user, in constant time
            if secrets.compare_digest(user, u) & secrets.compare_digest(password, p):
                found = u
        return found.decode() if found is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        user = self.user(dict(scope.get("headers") or []).get(b"authorization"))
        if user is not None:
            # with a login, a rating is the logged-in user's: the routes take the rater from here, not the body
            scope.setdefault("state", {})[AUTH_USER] = user
            return await self.app(scope, receive, send)
        challenge = (b"www-authenticate", f'Basic realm="{self.realm}", charset="UTF-8"'.encode())
        await _refuse(scope, send, 401, b"login required\n", [challenge])


async def _refuse(scope, send, status: int, body: bytes, headers=()) -> None:
    """Answer a refused request before the app sees it: a websocket is closed (policy violation), a request gets
    `status` with a plain-text body."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [*headers, (b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LocalOnly:
    """ASGI middleware for a page served without a login (loopback only):

    - the Host header must name this machine (localhost or a loopback address), so a web page whose domain is
      re-pointed at 127.0.0.1 (DNS rebinding) cannot read or post to it;
    - a request that carries an Origin must come from the page itself, so another local web app (say on
      localhost:3000) cannot post ratings or finish a round: Gradio's CORS middleware would let localhost origins
      in, and this answers before it, with no CORS headers.
    """

    def __init__(self, app):
        self.app = app

    @staticmethod
    def _hostname(host: str) -> str:
        host = host.strip().lower()
        if host.startswith("["):
            return host[: host.find("]") + 1]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1")
        why = None
        if host and not is_loopback(self._hostname(host)):
            why = "this page answers only to 127.0.0.1 or localhost"
        elif origin and origin.split("://", 1)[-1].lower() != host.lower():
            why = "requests from another site or port are refused"
        if why is None:
            return await self.app(scope, receive, send)
        await _refuse(scope, send, 403, why.encode() + b"\n")


def request_rater(request: Request, body: dict):
    """Who a rating, undo or vote is by: the logged-in user when the page has a login, else the name the page
    sends (a label on a page only this machine can reach)."""
    return request.scope.get("state", {}).get(AUTH_USER) or body.get("rater")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- the app -----------------------------------------------------------------------------------------------
def _opt_int(request: Request, name: str, current=None) -> int | None:
    raw = request.query_params.get(name, "")
    if raw in ("", "all"):
        return None
    if raw == "current" and current is not None:
        return current()
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw[:40]!r}") from None
    if abs(value) >= 2**63:  # SQLite's integers are 64-bit: a bigger one is a 400, not a 500
        raise BadRequest(f"{name} is out of range, got {raw[:40]!r}")
    return value


def _image_id(raw: str) -> int:
    # ASCII digits only ('²' and '١' are isdigit() too), and small enough for SQLite's 64-bit integers
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise NotFound(f"no image with id {raw[:40]!r}")
    return int(raw)


def _filters(request: Request, h: RateHandlers) -> dict:
    """round (a number, `all`, or `current`), unit, tier, unrated (1), q (prompt text)."""
    q = request.query_params
    tier = q.get("tier") or None
    return {
        "round": _opt_int(request, "round", h.current_round),
        "unit": _opt_int(request, "unit"),
        "tier": tier,
        "unrated": q.get("unrated", "") in ("1", "true"),
        "q": q.get("q", "")[:200],
        "tab": Claims.check_tab(q["tab"]) if q.get("tab") else None,
    }


async def _json_body(request: Request) -> dict:
    """The JSON object of a POST. Requiring application/json also stops cross-site form posts (no preflight)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise BadRequest("send the body as application/json")
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _ratings(body: dict) -> list[tuple[int, str, str | None]]:
    items = body.get("ratings")
    if items is None and "image_id" in body:
        items = [body]
    if not isinstance(items, list):
        raise BadRequest("give ratings: [{image_id, tier, key (optional)}, ...]")
    out = []
    for it in items:
        i = it.get("image_id") if isinstance(it, dict) else None
        if not isinstance(i, int) or isinstance(i, bool) or abs(i) >= 2**63:  # true is an int to Python
            raise BadRequest(f"each rating needs an integer image_id and a tier, got {it!r}"[:200])
        out.append((it["image_id"], it.get("tier"), it.get("key")))
    return out


def add_routes(app: FastAPI, h: RateHandlers) -> None:
    """The grid's JSON routes and the file routes, all under /loop/."""

    @app.exception_handler(BadRequest)
    async def _bad(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=400, headers=NO_STORE)

    @app.exception_handler(NotFound)
    async def _missing(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=404, headers=NO_STORE)

    @app.exception_handler(Forbidden)
    async def _forbidden(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=403, headers=NO_STORE)

    def ok(data) -> JSONResponse:
        return JSONResponse(data, headers=NO_STORE)

    @app.get("/loop/api/meta")
    def meta(request: Request):
        # login: the logged-in user (with --auth), whom every rating from this browser is by
        return ok({**h.meta(), "login": request.scope.get("state", {}).get(AUTH_USER)})

    @app.get("/loop/api/images")
    def images(request: Request):
        # order: "" (default), likely_ur or uncertain (the taste model's, loop/rate/taste.py)
        return ok(h.images(**_filters(request, h), order=request.query_params.get("order", "")))

    @app.get("/loop/api/predictions")
    def predictions(request: Request):
        return ok(h.predictions(**_filters(request, h)))

    @app.get("/loop/api/taste")
    def taste():
        # what the taste model learnt from and how well (TasteModel.summary), or why there is none yet
        return ok(h.taste.snapshot().status() if h.taste is not None else {"ready": False, "model": None})

    @app.get("/loop/api/changes")
    def changes(request: Request):
        after_event = _opt_int(request, "after_event") or 0
        after_image = _opt_int(request, "after_image") or 0
        return ok(h.changes(after_event, after_image, **_filters(request, h)))

    @app.get("/loop/api/counters")
    def counters(request: Request):
        f = _filters(request, h)
        return ok(h.counters(round=f["round"], unit=f["unit"]))

    @app.get("/loop/api/image/{image_id}")
    def detail(image_id: str):
        return ok(h.detail(_image_id(image_id)))

    @app.post("/loop/api/rate")
    async def rate(request: Request):
        body = await _json_body(request)
        return ok(await run_in_threadpool(h.rate, _ratings(body), request_rater(request, body)))

    @app.post("/loop/api/claim")
    async def claim(request: Request):
        # the focus of one page: {tab, image_id (null releases), rater}; see handlers.Claims
        body = await _json_body(request)
        return ok(h.claim(body.get("tab"), body.get("image_id"), request_rater(request, body) or ""))

    @app.post("/loop/api/undo")
    async def undo(request: Request):
        body = await _json_body(request)
        # tab: the page going back to the image it undoes (see RateHandlers.undo)
        return ok(await run_in_threadpool(h.undo, request_rater(request, body), body.get("key"), body.get("tab")))

    @app.post("/loop/api/finish")
    async def finish(request: Request):
        body = await _json_body(request)
        return ok(await run_in_threadpool(h.finish, body.get("round")))

    ab = app.state.ab = ABVotes(h.store, h.lock, path_of=h.image_file)

    @app.get("/loop/api/ab/pair")
    def ab_pair(request: Request):
        q = request.query_params
        try:
            a, b = (int(q[k]) if q.get(k) else None for k in ("a", "b"))
        except ValueError:
            raise BadRequest("a and b must be unit numbers") from None
        return ok(ab.pair(a, b))

    @app.post("/loop/api/ab/undo")
    async def ab_undo(request: Request):
        body = await _json_body(request)
        return ok(ab.undo(request_rater(request, body) or "anonymous"))

    @app.get("/loop/api/ab/units")
    def ab_units():
        return ok({"units": ab.units()})

    @app.get("/loop/ab/image/{token}/{side}")
    def ab_image(token: str, side: str):
        # the bytes only: no Last-Modified or ETag (they would date the image, and so its unit); never cached
        return Response(ab.image(token, side), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/loop/api/ab/vote")
    async def ab_vote(request: Request):
        body = await _json_body(request)
        return ok(ab.vote({**body, "rater": request_rater(request, body) or "anonymous"}))

    @app.get("/loop/api/ab/ranking")
    def ab_ranking():
        r = ab.ranking()
        return ok({**r, "html": ranking_html(r)})

    @app.get("/loop/thumb/{image_id}")
    async def thumb(image_id: str, request: Request):
        i = _image_id(image_id)
        # ?w= names the workspace (workspace_token): with it the URL can be cached for good; another workspace's
        # (a page left open while another workspace took the port) gets a 404, never this one's picture
        w = request.query_params.get("w")
        if w is not None and w != h.token:
            raise NotFound("this page was opened on another workspace (or before loop.db was replaced): reload it")
        data = h.cached_thumb(i) or await run_in_threadpool(h.thumb_bytes, i)  # memory first: no thread hop
        headers = IMMUTABLE if w is not None else {**IMMUTABLE, "Cache-Control": "private, no-cache"}
        return Response(data, media_type="image/webp", headers=headers)

    @app.get("/loop/files/{rel:path}")
    def files(rel: str):
        path = h.file(rel)
        return FileResponse(path, headers={**IMMUTABLE, "Cache-Control": "private, max-age=3600"})


def _md(text: str) -> str:
    """A rater's name as plain text inside Markdown: HTML escaped, Markdown's punctuation backslashed (a name is
    whatever somebody typed, and the Progress tab renders it for everyone)."""
    text = html.escape(str(text), quote=True)
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|~>" else c for c in text)


def progress_markdown(h: RateHandlers) -> str:
    """The Progress tab: the current round's counters, pace, raters, phases, and every round at a glance."""
    from loop.status import next_step

    n = h.current_round()
    c = h.counters(round=n)
    with h.lock:
        phases = h.store.phases(n)
        step = next_step(h.store)
        rounds = h.db.execute(
            "SELECT i.round, COALESCE(t.tier, '') AS tier, COUNT(*) FROM images i "
            "LEFT JOIN current_tiers t ON t.image_id = i.id GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    total = c["total"] or 1
    lines = [
        f"### Round {n}: {c['rated']:,} / {c['total']:,} rated",
        "",
        "| tier | images | share of the round |",
        "|---|---:|---:|",
        *(f"| {t} | {c['tiers'][t]:,} | {c['tiers'][t] / total:.1%} |" for t in TIERS),
        f"| unrated | {c['total'] - c['rated']:,} | {(c['total'] - c['rated']) / total:.1%} |",
        "",
        f"**Pace:** {c['pace']} images/min over the last 5 minutes"
        + (
            " (" + ", ".join(f"{_md(k)} {v}" for k, v in c["pace_by_rater"].items()) + ")"
            if c["pace_by_rater"]
            else ""
        ),
        "",
        "**Raters** (who gave the current tiers): "
        + (", ".join(f"{_md(k)} {v:,}" for k, v in c["raters"].items()) or "nobody yet"),
        "",
        "**Phases:** " + " · ".join(f"{p} {phases[p]['status'] if p in phases else 'to do'}" for p in PHASES),
        "",
        f"**Next:** {step}",
        "",
        *taste_markdown(h),
        "### Every round",
        "",
        "| round | images | rated | " + " | ".join(TIERS) + " |",
        "|---:|---:|---:|" + "---:|" * len(TIERS),
    ]
    per: dict = {}
    for r, tier, k in rounds:
        per.setdefault(r, {})[tier] = k
    for r, counts in per.items():
        images = sum(counts.values())
        lines.append(
            f"| {'imported' if r is None else r} | {images:,} | {images - counts.get('', 0):,} | "
            + " | ".join(f"{counts.get(t, 0):,}" for t in TIERS)
            + " |"
        )
    lines += ["", f"<sub>updated {time.strftime('%H:%M:%S')}</sub>"]
    return "\n".join(lines)


def taste_markdown(h: RateHandlers) -> list[str]:
    """The Progress tab's taste-model section: what it learnt from (ratings, raters, tiers), how well (held-out
    pairwise agreement) and when; or why it cannot order the page yet."""
    lines = ["### Taste model", ""]
    if h.taste is None:
        return lines + ["not running on this page", ""]
    snap = h.taste.snapshot()
    m = snap.model
    if not snap.ready:
        lines.append(snap.note())
        if m is not None and m.ratings:
            tiers = ", ".join(f"{t} {k:,}" for t, k in m.tiers.items())
            lines += ["", f"**Rated so far:** {m.ratings:,} ({tiers})"]
        return lines + [""]
    if m.agreement is None:
        agree = "no held-out agreement yet: no two images of one prompt in different tiers"
    else:
        agree = (f"{m.agreement:.0%} over {m.pairs:,} held-out pairs (two images of one prompt in different tiers, "
                 "each scored by a model fitted without it; 50% is chance)")  # fmt: skip
    predicted = f"{len(snap.preds):,} unrated images predicted" + (" so far" if snap.predicting else "")
    return lines + [
        f"**Learnt from:** {m.ratings:,} ratings",
        "",
        "**Raters:** " + ", ".join(f"{_md(k)} {v:,}" for k, v in sorted(m.raters.items(), key=lambda x: -x[1])),
        "",
        "**Tiers:** " + " · ".join(f"{t} {m.tiers.get(t, 0):,}" for t in TIERS),
        "",
        f"**Pairwise agreement:** {agree}",
        "",
        f"**Fitted:** {time.strftime('%H:%M:%S', time.localtime(m.fitted_at))} (in {m.fit_s:.2f} s); {predicted}",
        "",
    ]


def build_blocks(h: RateHandlers, cfg: LoopConfig | None = None) -> gr.Blocks:
    """Tabs: Rate (the grid, drawn by static/rate.js), Progress (counters, every round, what comes next), Compare
    (the probe grid and per-unit statistics) and A/B (blind votes, static/ab.js)."""
    script = (STATIC / "rate.js").read_text(encoding="utf-8")
    with gr.Blocks(title="loop · rate", fill_width=True, analytics_enabled=False) as blocks:
        with gr.Tabs():
            with gr.Tab("Rate", id="rate"):
                gr.HTML(
                    "",
                    js_on_load=script + "\nLoopRate.mount(element);\n",  # inline: one request less on first load
                    apply_default_css=False,
                    elem_id="loop-rate",
                )
            with gr.Tab("Progress", id="progress") as progress_tab:
                progress = gr.Markdown("")
                refresh = gr.Button("Refresh", size="sm")
            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "**Units side by side.** Every unit draws the same probe prompts at the same seeds (rows: "
                    "units; columns: probes), with each unit's tiers, UR rate, diversity (Vendi score), seed "
                    "diversity (how much one prompt's images differ from seed to seed), near-duplicates and novel "
                    "hits."
                )
                run_compare = gr.Button("Render the probe grid", size="sm", elem_id="loop-compare-run")
                compare_view = gr.HTML("", elem_id="loop-compare-view")
                compare_table = gr.Markdown("", elem_id="loop-compare-table")
            # its own tab: next to the probe grid (labelled by unit) a voter would learn each unit's look
            with gr.Tab("A/B", id="ab"):
                gr.Markdown(
                    "**Blind A/B.** Two units' images of the same prompt and seed, made with the same settings; "
                    "which is better?"
                )
                gr.HTML(
                    "",
                    js_on_load=(STATIC / "ab.js").read_text(encoding="utf-8") + "\nLoopAB.mount(element);\n",
                    apply_default_css=False,
                    elem_id="loop-ab",
                )
        # Filled when the tab opens, not on a timer: the Rate tab's own counters are live, and a Gradio event
        # every few seconds would compete with the ratings for the server. (No listener on the Rate tab: its
        # select fires on every page load and would delay the first grid.)
        show = lambda: progress_markdown(h)  # noqa: E731
        progress_tab.select(show, None, progress, show_progress="hidden", queue=False)
        refresh.click(show, None, progress, show_progress="hidden", queue=False)
        run_compare.click(lambda: compare_html(h, cfg), None, [compare_view, compare_table], show_progress="minimal")
    return blocks


def compare_html(h: RateHandlers, cfg: LoopConfig | None) -> tuple[str, str]:
    """Render the probe grid of every unit (loop.compare) and show it with its plot and per-unit table."""
    from loop.compare import compare, format_table
    from loop.config import load_config

    cfg = cfg or load_config(h.ws.root)
    units = [r["unit"] for r in h.store.units()] or [0]
    try:
        with h.ws.store() as store:  # its own connection: rendering takes a while and must not hold the page's
            r = compare(h.ws, store, cfg, units, log=lambda m: None)
    except LoopError as e:
        return f"<p class='loop-error'>{e}</p>", ""
    stamp = int(time.time())
    grid, plot = h.ws.rel(Path(r["grid"])), h.ws.rel(Path(r["plot"]))
    html = (
        f"<div class='loop-compare'><img alt='probe grid' src='/loop/files/{grid}?t={stamp}' "
        f"style='image-rendering:pixelated;max-width:100%'>"
        f"<img alt='UR rate and diversity per unit' src='/loop/files/{plot}?t={stamp}' style='max-width:100%'></div>"
    )
    return html, "```\n" + format_table(r) + "\n```"


def build_app(
    ws: Workspace,
    cfg: LoopConfig | None = None,
    auth: list[tuple[str, str]] | None = None,
    warm: int = 120,
    taste: bool = True,
):
    """The Blocks and the FastAPI app serving it with the grid's routes; returns (blocks, app).

    The current round's first `warm` thumbnails are made first (once; they stay in cache/), so the first
    screen a person opens is ready. `app.state.handlers` holds the RateHandlers (and through it the Store);
    `taste`: start the workspace's TasteService (handlers.taste). Call `close_app(app)` when done: it stops the
    service's thread too.
    """
    h = RateHandlers(ws, ws.store())
    if warm:
        h.warm_thumbs(warm)
    if taste:  # fits in its own thread, with its own connection; requests only read its last snapshot
        from loop.rate.taste import TasteService

        h.taste = TasteService(ws, cfg.eval if cfg is not None else None).start()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.handlers = h
    add_routes(app, h)  # before the mount, so /loop/* is ours and the rest goes to Gradio
    blocks = build_blocks(h, cfg)
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        allowed_paths=[],
        blocked_paths=[str(ws.root)],  # Gradio's /file= route must not serve loop.db, configs/, checkpoints/...
        css=(STATIC / "rate.css").read_text(encoding="utf-8"),
    )
    if auth:
        app.add_middleware(BasicAuth, users=auth)
    else:
        app.add_middleware(LocalOnly)
    return blocks, app


def close_app(app: FastAPI) -> None:
    h = app.state.handlers
    if h.taste is not None:
        h.taste.stop(timeout=10)  # a daemon thread: one still inside a long fit dies with the process
    with h.lock:
        h.store.close()


class BackgroundServer:
    """The app served by uvicorn in a thread, on a free port by default (tests, benchmarks). `.url`, `.stop()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the page server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def check_port(host: str, port: int) -> None:
    """One clear line if another program listens on host:port, before loading anything. SO_REUSEADDR, as
    uvicorn's own socket has: without it the connections a page left behind (TIME_WAIT, about 60 s after a
    Ctrl+C or a kill) would refuse a restart on the same port, which is the address the open page retries."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))  # still refused next to a live listener
        except OSError as e:
            raise LoopError(f"cannot listen on {host}:{port} ({e.strerror}); choose another with --port") from None


def serve(
    ws: Workspace,
    cfg: LoopConfig | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    auth: list[tuple[str, str]] | None = None,
    log=print,
) -> None:
    """Serve the page until Ctrl+C. Anything but a loopback address needs auth."""
    import uvicorn

    if not is_loopback(host) and not auth:
        raise LoopError(
            f"serving on {host} exposes your ratings to the network; add --auth user:password or --auth-file FILE"
        )
    check_port(host, port)
    _, app = build_app(ws, cfg, auth)
    everywhere = host in ("0.0.0.0", "::")
    where = "every interface" if everywhere else ("this machine only" if is_loopback(host) else host)
    shown = "127.0.0.1" if everywhere else host
    log(f"rating page: http://{shown}:{port}/  ({where}{', login required' if auth else ''}; Ctrl+C stops)")
    try:
        uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning")
    finally:
        close_app(app)
