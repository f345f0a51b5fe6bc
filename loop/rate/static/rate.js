// The rating grid of `loop rate`: a virtualised grid of thumbnails rated with one key per decision.
//
// Mounted by the Rate tab's gr.HTML (js_on_load calls LoopRate.mount(element)). It talks to the small JSON
// routes under loop/api/ instead of Gradio events: a keypress updates the tile at once (optimistic), and an
// ordered queue POSTs the ratings so they become durable in SQLite; a poll every 2 s brings other raters'
// ratings and new images from a running generator. Only the visible rows exist in the DOM, so 10,000 images
// in a round cost no more than 100.
(function () {
  "use strict";
  if (window.LoopRate) return;

  const TIERS = ["UR", "SSR", "SR", "R", "N"];
  // 1-5 on the number row, and the same five on the home row for a resting left hand.
  const KEYS = { "1": "UR", "2": "SSR", "3": "SR", "4": "R", "5": "N", a: "UR", s: "SSR", d: "SR", f: "R", g: "N" };
  const UNDO_KEYS = new Set(["z", "Backspace"]);
  const TILE = 136, GAP = 8, STEP = TILE + GAP, OVERSCAN = 2;
  const POLL_MS = 2000;
  // new predicted tiers (the taste model refits as ratings come) are fetched at most this often
  const PRED_MS = 5000;
  // Another rater's fresh ratings this many places from the focus mean they work the same stretch: move away.
  const NEAR = 30;
  const API = "loop/api/";
  // Unsent ratings are kept in localStorage under QUEUE + the page's tab (see saveQueue); a page gone this long
  // without a heartbeat (crashed, killed) has its queue adopted by another page of the same workspace.
  const QUEUE = "loop.queue.", QUEUE_STALE_MS = 15000;
  // A rating's or undo's key: the server stores an event once per key, so a resend is harmless.
  const newKey = () => Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0"))
    .join("");

  const qs = (o) => Object.entries(o).filter(([, v]) => v !== null && v !== undefined && v !== "" && v !== false)
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v === true ? 1 : v)}`).join("&");
  const encPath = (p) => p.split("/").map(encodeURIComponent).join("/");
  let wsToken = ""; // the workspace's token from the list (see workspace_token): cached thumbnails stay its own
  const thumbUrl = (id) => `loop/thumb/${id}` + (wsToken ? `?w=${encodeURIComponent(wsToken)}` : "");
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  async function call(method, url, body) {
    const opts = { method, headers: {}, credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(url, opts);
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
      const err = new Error(msg);
      err.status = r.status;
      throw err;
    }
    return r.json();
  }

  const SKELETON = `
<div class="lr">
  <div class="lr-bar">
    <label class="lr-who">Rater <input class="lr-rater" maxlength="40" placeholder="your name" autocomplete="off"></label>
    <label>Round <select class="lr-round"></select></label>
    <label>Unit <select class="lr-unit"></select></label>
    <label>Tier <select class="lr-tier"><option value="">any</option></select></label>
    <label class="lr-check"><input type="checkbox" class="lr-unrated"> unrated only</label>
    <label>Order <select class="lr-order"><option value="">unrated first</option>
      <option value="likely_ur">likely UR first</option><option value="uncertain">least certain first</option></select></label>
    <label class="lr-check" title="the taste model's guess on unrated tiles, faint and with a '?': never a rating">
      <input type="checkbox" class="lr-showpred"> predicted tiers</label>
    <input class="lr-q" type="search" placeholder="prompt contains…" autocomplete="off">
    <span class="lr-fill"></span>
    <button class="lr-finish" type="button">Finish rating</button>
  </div>
  <div class="lr-stats"><span class="lr-counters">loading…</span><span class="lr-status"></span></div>
  <div class="lr-taste" hidden></div>
  <div class="lr-legend"></div>
  <div class="lr-scroll"><div class="lr-canvas"></div><div class="lr-empty" hidden></div></div>
  <div class="lr-detail" hidden>
    <div class="lr-d-img"><img alt=""></div>
    <div class="lr-d-side">
      <div class="lr-d-head"><span class="lr-d-tier"></span><span class="lr-d-by"></span>
        <button class="lr-d-close" type="button" title="close (Esc)">Esc ✕</button></div>
      <button class="lr-excellent" type="button">Excellent! (UR)</button>
      <div class="lr-d-tiers"></div>
      <div class="lr-d-golden"></div>
      <dl class="lr-meta"></dl>
      <div class="lr-d-hist"></div>
      <div class="lr-d-nav"><button class="lr-d-prev" type="button">← previous</button>
        <span class="lr-d-pos"></span><button class="lr-d-next" type="button">next →</button></div>
    </div>
  </div>
</div>`;

  function mount(element) {
    performance.mark("loop-rate-mount");
    element.innerHTML = SKELETON;
    const root = element.querySelector(".lr");
    const $ = (sel) => root.querySelector(sel);
    const ui = {
      rater: $(".lr-rater"), round: $(".lr-round"), unit: $(".lr-unit"), tier: $(".lr-tier"),
      unrated: $(".lr-unrated"), q: $(".lr-q"), finish: $(".lr-finish"), counters: $(".lr-counters"),
      status: $(".lr-status"), legend: $(".lr-legend"), scroll: $(".lr-scroll"), canvas: $(".lr-canvas"),
      empty: $(".lr-empty"), detail: $(".lr-detail"), dImg: $(".lr-d-img img"), dTier: $(".lr-d-tier"),
      dBy: $(".lr-d-by"), dTiers: $(".lr-d-tiers"), dGolden: $(".lr-d-golden"), dMeta: $(".lr-meta"),
      dHist: $(".lr-d-hist"), dPos: $(".lr-d-pos"), order: $(".lr-order"), showPred: $(".lr-showpred"),
      taste: $(".lr-taste"),
    };

    const S = {
      rater: (localStorage.getItem("loop.rater") || "").trim(),
      ids: [], tier: new Map(), by: new Map(), golden: new Map(),
      pending: new Map(), mine: new Map(), // id -> ratings not yet durable, and the newest of them
      focus: 0, cols: 1, left: GAP, insertAt: 0, lastEvent: 0, lastImage: 0, gen: 0, meta: null,
      live: new Map(), // index -> tile element (only the visible rows)
      queue: [], busy: false, failures: 0, detail: false, detailToken: 0, detailData: null, timings: [],
      // auto: the page put the focus where it is (start, after a rating, a new image); false once the rater
      // moves it (arrows, click, detail view), so a key on an image someone else rated is then deliberate.
      // allDone: no unrated image is left in the list; the focus stays put until a new one comes.
      auto: true, allDone: false, ratedSinceLoad: 0, stickyUntil: 0, single: 0,
      // claims: the server gives each open page (tab: a token made here, so one rater's two pages are two) one
      // claim, on the image its focus is on; the page never puts its focus on an unrated image another page
      // claimed, so two raters never rate the same one by chance. claims: id -> rater of the other pages';
      // claimTarget: what this page asked for; claimed: what the server confirmed.
      tab: Math.random().toString(36).slice(2) + Date.now().toString(36),
      // claimRefused: an image this page's focus is on that another page holds (the poll claims it again
      // once it is free).
      claims: new Map(), claimTarget: undefined, claimed: null, claimGen: 0, claimRefused: null,
      // the images this page rated, newest last: an undo goes back to the newest at once, before the server
      // answers (a key pressed meanwhile must land on that image, not on the next one)
      myRatings: [],
      undoing: null, // the image the page went back to for an undo not yet answered
      // review: a tier filter lists rated images to look at again, so the focus is the rater's from the start
      // caughtUp: the status line holds a "nothing to rate" line (it goes once there is an image to rate)
      review: false, caughtUp: false,
      polling: false, pollTimer: 0,
      // the taste model's predicted tier of unrated images (id -> tier): a faint guess on the tile when
      // showPred is on, never a rating (never in S.tier, never sent, never counted). taste: its state from the
      // last list (ready, note, version, order applied); predAt: when predictions were last fetched
      pred: new Map(), showPred: localStorage.getItem("loop.predicted") === "1", taste: null, predAt: 0,
      gone: false, // the page is being left (pagehide): its stored queue is marked closed for the next page
    };

    // -- legend and tier buttons --------------------------------------------------------------------------
    const keysFor = (t) => Object.keys(KEYS).filter((k) => KEYS[k] === t).map((k) => k.toUpperCase());
    for (const t of TIERS) {
      const item = el("span", "lr-key");
      for (const [n, k] of keysFor(t).entries()) {
        if (n) item.append("/");
        item.append(el("kbd", "", k));
      }
      item.append(" ", el("b", `lr-chip lr-t-${t}`, t));
      ui.legend.append(item);
      ui.tier.append(new Option(t, t));
      const b = el("button", `lr-chip lr-t-${t}`, `${t} · ${keysFor(t).join("/")}`);
      b.type = "button";
      b.addEventListener("click", (e) => rateShown(t, false, e.timeStamp));
      ui.dTiers.append(b);
    }
    for (const [keys, what] of [[["Z", "⌫"], "undo"], [["←", "↑", "→", "↓"], "move"], [["Enter"], "details"],
      [["Esc"], "close"]]) {
      const item = el("span", "lr-key");
      keys.forEach((k, n) => { if (n && what !== "move") item.append("/"); item.append(el("kbd", "", k)); });
      item.append(" " + what);
      ui.legend.append(item);
    }

    // -- the virtual grid ---------------------------------------------------------------------------------
    function layout() {
      if (!ui.scroll.isConnected || root.offsetParent === null) return; // hidden tab: lay out when shown
      const top = ui.scroll.getBoundingClientRect().top + window.scrollY;
      ui.scroll.style.height = Math.max(320, window.innerHeight - top - 16) + "px";
      const cols = Math.max(1, Math.floor((ui.scroll.clientWidth - GAP) / STEP));
      const left = Math.max(GAP, Math.floor((ui.scroll.clientWidth - cols * STEP + GAP) / 2));
      const moved = cols !== S.cols || left !== S.left;
      if (moved) { S.cols = cols; S.left = left; clearTiles(); }
      ui.canvas.style.height = GAP + Math.ceil(S.ids.length / S.cols) * STEP + "px";
      if (moved && S.ids.length) reveal(S.focus); // a narrower window moves the focused tile: keep it in view
      else render();
    }

    // Scroll just enough for tile i to be in view, with the row below it when there is one (the images that
    // come next are seen before the focus gets there), and draw.
    function reveal(i) {
      const y = GAP + Math.floor(i / S.cols) * STEP, top = ui.scroll.scrollTop, h = ui.scroll.clientHeight;
      const below = Math.floor(i / S.cols) < Math.ceil(S.ids.length / S.cols) - 1 ? STEP : 0;
      if (y - GAP < top) ui.scroll.scrollTop = y - GAP;
      else if (y + STEP + below > top + h) ui.scroll.scrollTop = Math.min(y - GAP, y + STEP + below - h);
      render();
    }

    function clearTiles() {
      for (const t of S.live.values()) t.remove();
      S.live.clear();
    }

    function render() {
      const top = ui.scroll.scrollTop, h = ui.scroll.clientHeight || 600;
      const first = Math.max(0, Math.floor(top / STEP) - OVERSCAN) * S.cols;
      const last = Math.min(S.ids.length, (Math.ceil((top + h) / STEP) + OVERSCAN) * S.cols);
      for (const [i, t] of S.live) {
        if (i < first || i >= last || t._id !== S.ids[i]) { t.remove(); S.live.delete(i); }
      }
      for (let i = first; i < last; i++) if (!S.live.has(i)) S.live.set(i, makeTile(i));
      ui.empty.hidden = S.ids.length > 0;
    }

    function makeTile(i) {
      const id = S.ids[i];
      const t = el("div", "lr-tile");
      t._id = id;
      t.dataset.id = id;
      // the `translate` property, not `transform`: the focus's `scale` then grows the tile about its own centre
      // (after a transform: translate() it would scale the offset too, drawing the frame ever further off)
      t.style.translate = `${S.left + (i % S.cols) * STEP}px ${GAP + Math.floor(i / S.cols) * STEP}px`;
      const img = el("img");
      img.alt = "";
      img.draggable = false;
      img.decoding = "async";
      img.addEventListener("load", () => { if (img.naturalWidth < TILE) img.classList.add("lr-pixel"); });
      img.addEventListener("error", () => { // no broken-image icon: say so, and in the status line if it is the focus
        t.classList.add("lr-missing");
        if (S.ids[S.focus] === id) warnMissing(id);
      });
      img.src = thumbUrl(id);
      t.append(img, el("span", "lr-badge"), el("span", "lr-by"), el("span", "lr-missing-label", "file missing or unreadable"));
      t._pred = t.appendChild(el("span", "lr-pred"));
      paintTile(t, id);
      if (i === S.focus) t.classList.add("lr-focus");
      ui.canvas.append(t);
      return t;
    }

    function paintTile(t, id) {
      const tier = S.tier.get(id) || "";
      t.dataset.tier = tier;
      t.classList.toggle("lr-pending", (S.pending.get(id) || 0) > 0);
      const badge = t.children[1];
      badge.textContent = tier;
      badge.className = tier ? `lr-badge lr-chip lr-t-${tier}` : "lr-badge";
      const on = !tier && S.claims.get(id); // another rater's page has its focus here
      t.classList.toggle("lr-claimed", !!on);
      t.children[2].textContent = tier ? S.by.get(id) || "" : on || "";
      t.title = `#${id}` + (tier ? ` · ${tier} by ${S.by.get(id)}` : on ? ` · unrated, ${on} is on it` : " · unrated");
      const guess = !tier && S.showPred ? S.pred.get(id) || "" : "";
      t._pred.textContent = guess ? `${guess}?` : "";
      t._pred.className = guess ? `lr-pred lr-p-${guess}` : "lr-pred";
      if (guess) t.title += ` · the taste model guesses ${guess} (not a rating)`;
    }

    function setClaims(list) {
      S.claims = new Map(list);
      for (const t of S.live.values()) paintTile(t, t._id);
    }

    // Claim the image the focus is on (or release the claim when it is on a rated one, where nobody is sent).
    // If another page holds it (both got there within one round trip), or someone rated it since this page
    // last looked, a focus the page placed moves on.
    async function sendClaim() {
      // back on an image whose undo is on its way: the undo moves the claim here (see pump), and a claim now
      // would give it up (the image is rated until then), free for another page the moment the undo lands
      if (S.undoing !== null && S.ids[S.focus] === S.undoing) return;
      const id = S.ids.length && !rated(S.focus) ? S.ids[S.focus] : null;
      if (id === S.claimTarget) return;
      S.claimTarget = id;
      S.claimed = null;
      S.claimRefused = null;
      const gen = ++S.claimGen;
      let r;
      try {
        r = await call("POST", API + "claim", { tab: S.tab, image_id: id, rater: S.rater });
      } catch (e) {
        if (gen === S.claimGen) S.claimTarget = undefined; // the next poll claims again
        return;
      }
      if (gen !== S.claimGen) return; // the focus moved on meanwhile; that claim is the one that counts
      setClaims(r.claims);
      if (r.rated && !S.pending.get(id)) setTier(id, r.rated[0], r.rated[1]); // rated since the last poll
      const here = S.ids[S.focus] === id;
      if (r.ok) {
        S.claimed = id;
        if (here && S.auto && S.allDone) { // it was held by another page, which let it go: it is ours now
          S.allDone = false;
          routine(`on to #${id}, unrated`);
        }
        return;
      }
      if (!here) return;
      const who = r.by || (r.rated ? r.rated[1] : "another rater");
      if (r.rated) {
        if (S.auto) {
          S.claimTarget = undefined;
          const j = nextUnrated(S.focus);
          autoFocus(j);
          routine(j < 0 ? "" : `${who} rated #${id} just now: on to #${S.ids[j]}`);
        } else routine(`#${id} is ${r.rated[0]} by ${who}; a key overrides it`);
        return;
      }
      S.claimRefused = id; // the poll claims it once the other page lets it go
      if (!S.auto) {
        routine(`${who} has #${id} open too; a key rates it all the same`);
        return;
      }
      const j = nextUnrated(S.focus);
      if (j >= 0) {
        S.claimTarget = undefined;
        autoFocus(j);
        routine(`${who} is on #${id}: on to #${S.ids[j]}`);
      } else {
        autoFocus(-1); // nothing else is free: the focus stays, and a key does not rate their image
        routine("");
      }
    }

    function tileOf(id) {
      for (const t of S.live.values()) if (t._id === id) return t;
      return null;
    }

    function setTier(id, tier, rater) {
      S.tier.set(id, tier);
      S.by.set(id, rater);
      const t = tileOf(id);
      if (t) paintTile(t, id);
    }

    function setFocus(i, show = true) {
      if (!S.ids.length) {
        sendClaim(); // an empty list (filters): give back the claim on an image no longer shown
        return;
      }
      i = Math.max(0, Math.min(S.ids.length - 1, i));
      const old = S.live.get(S.focus);
      if (old) old.classList.remove("lr-focus");
      S.focus = i;
      if (show) reveal(i);
      const t = S.live.get(i);
      if (t) t.classList.add("lr-focus");
      if (t && t.classList.contains("lr-missing")) warnMissing(S.ids[i]);
      if (S.detail) loadDetail();
      sendClaim();
    }

    // The focus is on an image whose file cannot be shown: rating it blind is the rater's call, said once here.
    function warnMissing(id) {
      status(`#${id}: its file is missing or unreadable, so there is nothing to look at; a key still rates it`,
        true, 4000);
    }

    const rated = (i) => !!S.tier.get(S.ids[i]);
    // unrated, and no other page has its focus on it
    const free = (i) => !rated(i) && !S.claims.has(S.ids[i]);

    // The next image nobody has rated or has open: after `from` in list order, else the first one above it;
    // -1 if none. Rated images are never a target, so a key after the last unrated one cannot overwrite a
    // finished rating; claimed ones neither, so two raters' pages never land on the same image.
    function nextUnrated(from) {
      for (let i = from + 1; i < S.ids.length; i++) if (free(i)) return i;
      for (let i = 0; i <= Math.min(from, S.ids.length - 1); i++) if (free(i)) return i;
      return -1;
    }

    // Half way down the free images after `frontier`: where a rater goes to leave a stretch to another.
    function spreadFrom(frontier) {
      const rest = [];
      for (let i = frontier + 1; i < S.ids.length; i++) if (free(i)) rest.push(i);
      return rest.length ? rest[Math.floor(rest.length / 2)] : nextUnrated(frontier);
    }

    // The focus placed by the page (not by the rater): on `i`, or, with -1, stay and say everything is rated.
    function autoFocus(i) {
      S.auto = true;
      S.allDone = i < 0;
      if (i >= 0) setFocus(i);
      else {
        if (S.detail) paintDetailTier();
        sendClaim(); // the focus stays on a rated image: give its claim back
      }
    }

    // The focus moved by the rater: a key now rates this image even if someone else rated it.
    function goTo(i, show = true) {
      S.stickyUntil = 0; // a warning held about the image before is stale once the rater moves
      setFocus(i, show);
      S.auto = false;
      const id = S.ids[S.focus], tier = S.tier.get(id), by = S.by.get(id);
      if (tier && by !== S.rater && !S.pending.get(id)) routine(`#${id} is ${tier} by ${by}; a key overrides it`);
      else if (!tier && S.claims.has(id)) routine(`${S.claims.get(id)} has #${id} open too; a key rates it all the same`);
      else routine("");
    }

    ui.scroll.addEventListener("scroll", () => requestAnimationFrame(render), { passive: true });
    ui.canvas.addEventListener("click", (e) => {
      const t = e.target.closest(".lr-tile");
      if (t) for (const [i, x] of S.live) if (x === t) goTo(i, false);
    });
    ui.canvas.addEventListener("dblclick", (e) => { if (e.target.closest(".lr-tile")) openDetail(); });
    new ResizeObserver(() => layout()).observe(ui.scroll);
    window.addEventListener("resize", layout);

    // -- loading the list, polling for changes ------------------------------------------------------------
    function filters() {
      return {
        round: ui.round.value, unit: ui.unit.value, tier: ui.unrated.checked ? "" : ui.tier.value,
        unrated: ui.unrated.checked, q: ui.q.value.trim(), order: ui.order.value,
      };
    }

    async function load(prefetched) {
      const gen = ++S.gen;
      const f = filters();
      history.replaceState(null, "", "?" + qs(f) + location.hash);
      let r;
      try {
        r = await (prefetched || call("GET", API + "images?" + qs({ ...f, tab: S.tab })));
      } catch (e) {
        status(`could not load the images: ${e.message}`, true);
        return;
      }
      if (gen !== S.gen) return;
      S.ids = r.ids;
      S.tier.clear(); S.by.clear();
      r.ids.forEach((id, n) => { S.tier.set(id, r.tiers[n]); S.by.set(id, r.raters[n]); });
      for (const [id, [tier, rater]] of S.mine) if (S.pending.get(id)) { S.tier.set(id, tier); S.by.set(id, rater); }
      S.insertAt = r.unrated;
      S.lastEvent = r.last_event;
      S.lastImage = r.last_image;
      S.claims = new Map(r.claims || []);
      S.pred = new Map();
      (r.pred || []).forEach((t, n) => { if (t) S.pred.set(r.ids[n], t); });
      S.predAt = Date.now();
      paintTaste(r.taste);
      wsToken = r.w || "";
      S.focus = 0;
      S.ratedSinceLoad = 0;
      ui.scroll.scrollTop = 0;
      ui.empty.textContent = f.round !== "all" && !f.q && !f.tier && !f.unrated
        ? `No images in round ${f.round} yet. They appear here as \`loop generate\` or \`loop run --round\` makes them.`
        : "No images match these filters.";
      clearTiles();
      layout();
      const first = nextUnrated(-1);
      // A tier filter lists rated images, to look at again: the framed one is the rater's to re-rate, not a
      // focus the page left on a finished rating (where a key is one too many and rates nothing).
      S.review = !!f.tier;
      S.auto = !S.review;
      S.allDone = first < 0 && !S.review;
      setFocus(Math.max(0, first), false);
      // a message about the list before is stale now
      routine(S.review && S.ids.length ? `${f.tier} images: a key re-rates the one in the frame` : "");
      root.dataset.ready = "1";
      performance.mark("loop-rate-grid");
      const c = await refreshCounters();
      // Someone else is rating this round now: start half way down the unrated images, not on their next one
      // (a short list is not worth splitting: the polls keep two raters apart there).
      if (!c || gen !== S.gen || !S.auto || S.allDone || S.ratedSinceLoad) return;
      const others = Object.entries(c.pace_by_rater || {}).filter(([n, p]) => n !== S.rater && p > 0).map(([n]) => n);
      let unrated = 0;
      for (let i = S.focus + 1; i < S.ids.length && unrated <= NEAR; i++) if (!rated(i)) unrated++;
      const j = others.length && unrated > NEAR ? spreadFrom(S.focus) : -1;
      if (j < 0 || j === S.focus) return;
      setFocus(j);
      const are = others.length > 1 ? "are" : "is";
      routine(`${others.join(", ")} ${are} rating too: you start at #${S.ids[j]}, half way down the unrated images`);
    }

    // One calm line when the rater asked for a taste order (or the predicted tiers) and the model cannot give
    // them yet: why, as the server says (too few ratings, still fitting); the grid is then in the default order.
    function paintTaste(t) {
      if (t) S.taste = t;
      t = S.taste;
      let msg = "";
      if (t && !t.ready && (ui.order.value || S.showPred)) msg = t.note;
      else if (t && t.ready && ui.order.value && t.order !== ui.order.value) {
        msg = "the taste model is ready now: choose the order again to apply it";
      }
      ui.taste.textContent = msg;
      ui.taste.hidden = !msg;
      root.dataset.order = t && t.ready ? t.order || "" : ""; // the order the grid is in
    }

    // The predicted tiers again, after the model refitted or predicted new images (the order stays as it is
    // until the list is loaded again: tiles never move under the rater's eyes).
    async function refreshPredictions() {
      S.predAt = Date.now();
      const gen = S.gen;
      let r;
      try {
        r = await call("GET", API + "predictions?" + qs(filters()));
      } catch (e) { return; /* the next poll tries again */ }
      if (gen !== S.gen) return;
      S.pred = new Map(r.pred);
      paintTaste({ ...r.taste, order: S.taste ? S.taste.order : "" });
      for (const t of S.live.values()) paintTile(t, t._id);
      // the order asked for can apply now: at once if the rater has not started on this list
      if (r.taste.ready && ui.order.value && !S.taste.order && !S.ratedSinceLoad && S.auto && !S.detail) load();
    }

    async function refreshCounters() {
      try {
        const f = filters();
        const c = await call("GET", API + "counters?" + qs({ round: f.round, unit: f.unit }));
        renderCounters(c);
        return c;
      } catch (e) { /* the next poll tries again */ }
      return null;
    }

    // After a poll: follow what other raters did. `fresh` lists images that were unrated here and are now
    // rated by someone else ({i, rater}). Only a focus the page placed moves; never one the rater chose.
    function steer(fresh) {
      if (!S.auto || !S.ids.length) return;
      if (S.allDone) { // nothing was unrated: one that is again (someone's undo) takes the focus
        const j = nextUnrated(S.focus);
        if (j >= 0) { autoFocus(j); routine(`on to #${S.ids[j]}, unrated`); }
        return;
      }
      const id = S.ids[S.focus];
      // Only when someone else rated the image we are on or holds it: a focus on an image this page holds is
      // never moved (the person may be looking at it). If their fresh ratings are near, leave them this stretch
      // and go half way down the rest; else on to the next free image.
      const taken = rated(S.focus) && S.by.get(id) !== S.rater && !S.pending.get(id) || S.claims.has(id);
      if (!taken) return;
      const near = fresh.filter((x) => Math.abs(x.i - S.focus) <= NEAR);
      const j = near.length ? spreadFrom(Math.max(S.focus, ...near.map((x) => x.i))) : nextUnrated(S.focus);
      const names = near.length ? [...new Set(near.map((x) => x.rater))] : [S.by.get(id) || S.claims.get(id)];
      autoFocus(j);
      routine(j < 0 ? "" : `${names.join(", ")} ${names.length > 1 ? "are" : "is"} rating here too: on to #${S.ids[j]}`);
    }

    // One poll at a time: every POLL_MS, and at once when the page comes back into view (a claim lapses while
    // it is hidden, and someone else may hold its image now).
    async function poll() {
      clearTimeout(S.pollTimer);
      if (S.polling) return;
      S.polling = true;
      const gen = S.gen;
      try {
        if (!document.hidden && root.dataset.ready) {
          const r = await call("GET", API + "changes?" + qs({ after_event: S.lastEvent, after_image: S.lastImage,
            tab: S.tab, ...filters() }));
          if (gen === S.gen) {
            const fresh = [];
            for (const [id, tier, rater] of r.changed) {
              if (S.pending.get(id)) continue;
              if (tier && rater !== S.rater && !S.tier.get(id)) fresh.push(id);
              setTier(id, tier, rater);
            }
            if (S.failures === 0 && ui.status.classList.contains("lr-offline")) status("");
            setClaims(r.claims); // before new images are placed: they must not go to one another page holds
            if (r.new.length) addImages(r.new);
            S.lastEvent = r.last_event;
            S.lastImage = r.last_image;
            renderCounters(r.counters);
            if (S.taste && r.taste !== undefined && r.taste !== S.taste.version && (S.showPred || ui.order.value)
              && Date.now() - S.predAt > PRED_MS) refreshPredictions();
            // no claim yet (the server did not answer), ours lapsed (the page was hidden, the server
            // restarted), or the image another page held is free now: claim the focus again
            const lapsed = S.claimTarget === S.claimed && (r.mine ?? null) !== S.claimed;
            const freed = S.claimRefused !== null && S.ids[S.focus] === S.claimRefused && !S.claims.has(S.claimRefused);
            if (S.claimTarget === undefined || lapsed || freed) {
              S.claimTarget = undefined;
              sendClaim();
            }
            if (S.allDone) routine(""); // what is left, and whose page it is open on, may have changed
            if (fresh.length || S.allDone || S.auto && (rated(S.focus) || S.claims.has(S.ids[S.focus]))) {
              const at = new Map(S.ids.map((id, i) => [id, i]));
              steer(fresh.filter((id) => at.has(id)).map((id) => ({ i: at.get(id), rater: S.by.get(id) })));
            }
          }
        }
      } catch (e) {
        status("the server does not answer; your ratings are kept in this browser and sent when it is back", true);
        ui.status.classList.add("lr-offline");
      } finally {
        saveQueue(); // the heartbeat of this page's record
        adoptQueues(); // a crashed page's ratings
        S.polling = false;
        S.pollTimer = setTimeout(poll, POLL_MS);
      }
    }
    document.addEventListener("visibilitychange", () => { if (!document.hidden && root.dataset.ready) poll(); });

    function addImages(rows) {
      // new images join the end of the unrated block, so they come up next without moving what is on screen
      const at = Math.min(S.insertAt, S.ids.length);
      S.ids.splice(at, 0, ...rows.map((r) => r[0]));
      for (const [id, tier, rater] of rows) { S.tier.set(id, tier); S.by.set(id, rater); }
      S.insertAt = at + rows.length;
      if (S.focus >= at && S.ids.length > rows.length) S.focus += rows.length;
      clearTiles();
      layout();
      setFocus(S.focus, false);
      const what = `${rows.length} new image${rows.length > 1 ? "s" : ""}`;
      const j = S.allDone && S.auto ? nextUnrated(S.focus) : -1;
      if (j >= 0) {
        autoFocus(j); // everything was rated: the first new unrated image takes the focus
        routine(`${what}: on to #${S.ids[j]}`);
      } else routine(what);
    }

    function renderCounters(c) {
      if (!c) return;
      ui.counters.replaceChildren();
      ui.counters.append(el("b", "", c.rated.toLocaleString()), ` / ${c.total.toLocaleString()} rated`);
      for (const t of TIERS) ui.counters.append(" ", el("span", `lr-chip lr-t-${t}`, `${t} ${c.tiers[t]}`));
      ui.counters.append(el("span", "lr-pace", ` · ${c.pace} / min`));
      const who = Object.entries(c.raters).map(([n, k]) => `${n} ${k}`).join(", ");
      if (who) ui.counters.append(el("span", "lr-raters", ` · ${who}`));
      if (S.meta) {
        S.meta.rate_closed = c.rate_closed;
        if (c.current_round !== undefined && c.current_round !== S.meta.current_round) {
          S.meta.current_round = c.current_round; // a new unit: the button now closes the next round
          const r = String(c.current_round);
          if (![...ui.round.options].some((o) => o.value === r)) ui.round.append(new Option(`round ${r}`, r));
        }
        paintFinish();
      }
    }

    // -- rating, undo, and the ordered queue that makes them durable --------------------------------------
    function requireRater() {
      if (S.rater) return true;
      status("type your name in the Rater box first (it is remembered)", true);
      ui.rater.classList.add("lr-need");
      ui.rater.focus();
      return false;
    }

    function rateShown(tier, advance, since) {
      if (!requireRater() || !S.ids.length) return;
      const id = S.ids[S.focus];
      const was = S.tier.get(id) || "", wasBy = S.by.get(id) || "";
      const theirs = !!was && wasBy !== S.rater && !S.pending.get(id);
      if (was && S.auto && (theirs || S.allDone)) {
        // the page left the focus here because nothing is unrated: a key must not overwrite a finished rating,
        // another's or the rater's own (one key too many after the last image, or a rater faster than generation)
        const whose = theirs ? wasBy : "you";
        caughtUp((S.allDone ? "all rated; new images appear as they are made · " : "")
          + `#${id} is ${was} by ${whose}: to re-rate it, click it or move to it with the arrows`);
        return;
      }
      if (!was && S.auto && S.claims.has(id)) {
        // the page left the focus on an image another page holds (nothing else is free): theirs to rate
        caughtUp(`#${id} is open on ${S.claims.get(id)}'s page; new images appear as they are made · to rate it `
          + "anyway, click it or move to it with the arrows");
        return;
      }
      S.ratedSinceLoad++;
      S.pending.set(id, (S.pending.get(id) || 0) + 1);
      S.mine.set(id, [tier, S.rater]);
      setTier(id, tier, S.rater);
      // timings (input event -> tile painted -> server committed), read by `python -m loop.bench rate`
      const timing = { id, tier, input: since ?? performance.now(), painted: null, durable: null };
      requestAnimationFrame(() => setTimeout(() => { timing.painted = performance.now(); }));
      S.timings.push(timing);
      if (S.timings.length > 2000) S.timings.splice(0, 1000);
      S.queue.push({ kind: "rate", id, tier, rater: S.rater, key: newKey(), timing });
      S.myRatings.push(id);
      if (S.myRatings.length > 2000) S.myRatings.splice(0, 1000);
      pump();
      // a list to look at again (see load) goes on in its order, and stays on its last image
      if (advance && S.review) setFocus(S.focus + 1);
      else if (advance) autoFocus(nextUnrated(S.focus)); // the next unrated image, or stay if there is none
      else if (S.detail) paintDetailTier();
      if (theirs) status(`#${id}: ${tier} overrides ${was} by ${wasBy}`, false, 5000);
      else if (S.allDone) routine("");
    }

    function undo() {
      if (!requireRater()) return;
      const guess = S.myRatings.pop(); // the server decides (the rater's newest rating, from any page)
      S.queue.push({ kind: "undo", rater: S.rater, key: newKey(), guess });
      const i = guess === undefined ? -1 : S.ids.indexOf(guess);
      if (i >= 0) { // back on it now, to re-rate it
        S.undoing = guess;
        setFocus(i); S.auto = false; S.allDone = false;
      }
      pump();
    }

    // Put image `id`, which the filters leave out, into the list at the focus; returns its place.
    function bringIn(id) {
      const at = Math.min(S.focus, S.ids.length);
      S.ids.splice(at, 0, id);
      if (at <= S.insertAt) S.insertAt++;
      clearTiles();
      layout();
      return at;
    }

    async function pump() {
      saveQueue();
      if (S.busy || !S.queue.length) return;
      S.busy = true;
      const head = S.queue[0];
      let n = 1;
      const single = S.single > 0; // after a refused batch: one rating a time, to find the refused one
      if (head.kind === "rate" && !single) {
        while (n < S.queue.length && n < 500 && S.queue[n].kind === "rate" && S.queue[n].rater === head.rater) n++;
      }
      const batch = S.queue.slice(0, n);
      try {
        if (head.kind === "undo") {
          // still on the image it went back to: the server moves this page's claim there with the undo
          const back = head.guess !== undefined && S.ids[S.focus] === head.guess;
          const r = await call("POST", API + "undo", { rater: head.rater, key: head.key, tab: back ? S.tab : null });
          S.queue.splice(0, n);
          if (S.undoing === head.guess) S.undoing = null;
          if (r.image_id === null) status("nothing of yours to undo");
          else {
            if (!S.pending.get(r.image_id)) setTier(r.image_id, r.tier, r.rater); // (unless re-rated since)
            let i = S.ids.indexOf(r.image_id);
            // rated before the filters were set, which leave it out: shown all the same, an undo is never unseen
            const outside = i < 0;
            if (outside) i = bringIn(r.image_id);
            if (outside || r.image_id !== head.guess) { // not the one the page went back to: go there
              setFocus(i); S.auto = false; S.allDone = false;
            }
            if (r.claimed && S.ids[S.focus] === r.image_id) { // this page holds it: an answer to a claim sent
              S.claimGen++; // before is stale (should it have moved the claim off, the poll sees it and claims again)
              S.claimTarget = S.claimed = r.image_id;
              S.claimRefused = null;
            } else sendClaim(); // the focus's claim, now that the undo is in (see sendClaim)
            status(`undone: #${r.image_id} is now ${r.tier ? `${r.tier} by ${r.rater}` : "unrated"}`
              + (outside ? " (shown here, though the filters leave it out)" : ""));
            refreshHistory(r.image_id);
          }
          refreshCounters(); // now, not at the next poll
        } else {
          const r = await call("POST", API + "rate", {
            rater: head.rater, ratings: batch.map((o) => ({ image_id: o.id, tier: o.tier, key: o.key })),
          });
          S.queue.splice(0, n);
          const now = performance.now();
          for (const o of batch) o.timing.durable = now;
          for (const o of batch) S.pending.set(o.id, S.pending.get(o.id) - 1);
          for (const o of batch) {
            if (S.pending.get(o.id) > 0) continue;
            S.pending.delete(o.id);
            S.mine.delete(o.id);
            const st = r.images[o.id];
            if (!st) continue; // an id the server no longer has (named in r.missing): the others were stored
            setTier(o.id, st.tier, st.rater);
            S.golden.set(o.id, st.golden);
          }
          if (r.missing) status(`not saved: #${r.missing.join(", #")} (no such image any more)`, true, 8000);
          if (S.detail) paintDetailTier();
          if (S.detail && batch.some((o) => o.id === S.ids[S.focus])) refreshHistory(S.ids[S.focus]);
          routine(S.queue.length ? "saving…" : "saved");
        }
        if (single) S.single--;
        S.failures = 0;
      } catch (e) {
        if (e.status >= 400 && e.status < 500) refused(head, batch, e, single);
        else {
          S.failures++;
          status(`not saved yet (${e.message}); retrying…`, true);
          await sleep(Math.min(5000, 250 * 2 ** S.failures));
        }
      } finally {
        S.busy = false;
        saveQueue();
        if (S.queue.length) pump();
      }
    }

    // -- the queue outlives the page ------------------------------------------------------------------------
    // Until the server has answered, a rating lives only in S.queue. Each change of the queue (and each poll, as
    // a heartbeat) copies it into localStorage, one record per page, with the workspace's token; a page that
    // opens, and each poll, adopts the records of pages that are gone (closed or reloaded: marked at pagehide;
    // crashed: no heartbeat for QUEUE_STALE_MS) for this workspace and sends them. Each event carries its key, so
    // one sent twice (answered but unseen; adopted from a page that was only slow) is stored once.
    function saveQueue() {
      if (!wsToken) return;
      try {
        if (!S.queue.length) { localStorage.removeItem(QUEUE + S.tab); return; }
        const items = S.queue.map(({ kind, id, tier, rater, key, guess }) => ({ kind, id, tier, rater, key, guess }));
        const rec = { w: wsToken, beat: Date.now(), closed: S.gone, items };
        localStorage.setItem(QUEUE + S.tab, JSON.stringify(rec));
      } catch (e) { /* storage full or turned off: the queue still lives in this page */ }
    }

    function adoptQueues() {
      if (!wsToken) return;
      let items = [];
      try {
        const now = Date.now();
        for (let n = localStorage.length - 1; n >= 0; n--) {
          const k = localStorage.key(n);
          if (!k || !k.startsWith(QUEUE) || k === QUEUE + S.tab) continue;
          let rec = null;
          try { rec = JSON.parse(localStorage.getItem(k)); } catch (e) { /* not ours: left alone */ }
          // another workspace's ratings stay until it is served here again: their ids mean other images here
          if (!rec || rec.w !== wsToken || !Array.isArray(rec.items)) continue;
          if (!rec.closed && now - rec.beat < QUEUE_STALE_MS) continue; // a live page sends its own
          localStorage.removeItem(k);
          items = items.concat(rec.items.filter((o) => o && (o.kind === "undo" || o.kind === "rate") && o.key));
        }
      } catch (e) { return; }
      if (!items.length) return;
      for (const o of items) {
        if (o.kind !== "rate") continue;
        o.timing = {};
        S.pending.set(o.id, (S.pending.get(o.id) || 0) + 1);
        S.mine.set(o.id, [o.tier, o.rater]);
        setTier(o.id, o.tier, o.rater);
      }
      S.queue.push(...items);
      // the focus the page chose is rated now: on to an unrated one
      if (S.auto && S.ids.length && rated(S.focus)) autoFocus(nextUnrated(S.focus));
      const n = items.filter((o) => o.kind === "rate").length, u = items.length - n;
      status(`sending ${[n && `${n} rating${n > 1 ? "s" : ""}`, u && `${u} undo${u > 1 ? "s" : ""}`].filter(Boolean)
        .join(" and ")} a page closed before they were saved`, false, 6000);
      pump();
    }

    // The server refused a request (4xx). Drop only what it refused and send the rest again: the ratings it
    // names, or, when it names none, one rating at a time until the refused one is found.
    function refused(head, batch, e, single) {
      if (head.kind === "undo") {
        S.queue.splice(0, 1);
        if (S.undoing === head.guess) { S.undoing = null; sendClaim(); } // no undo comes to move the claim
        status(`undo not saved: ${e.message}`, true, 8000);
        return;
      }
      const named = new Set([...e.message.matchAll(/image (?:with id |#)?(\d+)/g)].map((m) => +m[1]));
      let drop = batch.filter((o) => named.has(o.id));
      if (!drop.length) {
        if (batch.length > 1 && !/rater/.test(e.message)) { S.single = batch.length; return; } // retry one by one
        drop = batch; // one rating alone, or the rater's name itself: none of them can be saved
      }
      S.queue.splice(0, batch.length, ...batch.filter((o) => !drop.includes(o)));
      if (single) S.single = Math.max(0, S.single - drop.length);
      for (const o of drop) {
        const left = (S.pending.get(o.id) || 1) - 1;
        if (left > 0) { S.pending.set(o.id, left); continue; }
        S.pending.delete(o.id);
        S.mine.delete(o.id);
        resync(o.id);
      }
      const what = drop.slice(0, 5).map((o) => `#${o.id} ${o.tier}`).join(", ") + (drop.length > 5 ? ", …" : "");
      status(`not saved: ${what} (${e.message})`, true, 15000);
    }

    // The database's tier of one image, after a rating of it was refused.
    async function resync(id) {
      let tier = "", rater = "";
      try {
        const d = await call("GET", API + `image/${id}`);
        tier = d.tier || "";
        rater = d.rater || "";
      } catch (e) { /* gone: show it unrated */ }
      if (!S.pending.get(id)) setTier(id, tier, rater);
      if (S.detail && S.ids[S.focus] === id) paintDetailTier();
    }

    window.addEventListener("beforeunload", (e) => {
      if (S.queue.length || S.busy) { e.preventDefault(); e.returnValue = ""; }
    });
    // gone (closed, reloaded): the next page adopts the queue at once; back from the browser's cache: ours again
    window.addEventListener("pagehide", () => { S.gone = true; saveQueue(); });
    window.addEventListener("pageshow", (e) => { if (e.persisted) { S.gone = false; saveQueue(); } });

    // A message in the status line; `holdMs` keeps it there against routine ones ("saved") that long.
    function status(msg, bad = false, holdMs = 0) {
      ui.status.textContent = msg;
      ui.status.classList.toggle("lr-bad", bad);
      ui.status.classList.remove("lr-offline");
      S.stickyUntil = holdMs ? performance.now() + holdMs : 0;
      S.caughtUp = false;
    }

    // A key that rated nothing because nothing here is left to rate. That is the normal state when raters
    // outpace the generator, so it reads calmly; held against routine lines until there is an image to rate.
    function caughtUp(msg) {
      status(msg, false, 6000);
      S.caughtUp = true;
    }

    // A routine message, unless a held one is showing (a held "nothing to rate" goes once there is one to
    // rate: new images came, or one was let go); while nothing is unrated, it says so too.
    function routine(msg) {
      if (performance.now() < S.stickyUntil && !(S.caughtUp && !S.allDone)) return;
      let done = "";
      if (S.allDone && S.ids.length) {
        const open = S.ids.filter((id) => !S.tier.get(id) && S.claims.has(id));
        done = open.length
          ? `the images left are open on ${[...new Set(open.map((id) => S.claims.get(id)))].join(", ")}'s page; `
            + "one comes here if they leave it"
          : "all rated; new images appear as they are made";
      }
      status([msg, done].filter(Boolean).join(" · "));
    }

    // -- the detail view ----------------------------------------------------------------------------------
    function openDetail() {
      if (!S.ids.length) return;
      S.auto = false; // looking at it: a key now rates what is shown, whoever rated it before
      S.detail = true;
      ui.detail.hidden = false;
      loadDetail();
    }

    function closeDetail() {
      S.detail = false;
      ui.detail.hidden = true;
      S.detailData = null;
    }

    async function loadDetail() {
      const id = S.ids[S.focus];
      const token = ++S.detailToken;
      ui.dImg.classList.remove("lr-pixel");
      ui.dImg.parentElement.classList.remove("lr-missing");
      ui.dImg.src = thumbUrl(id);
      ui.dPos.textContent = `${S.focus + 1} / ${S.ids.length}`;
      paintDetailTier();
      let d;
      try {
        d = await call("GET", API + `image/${id}`);
      } catch (e) {
        status(`could not load image #${id}: ${e.message}`, true);
        return;
      }
      if (token !== S.detailToken || !S.detail) return;
      S.detailData = d;
      S.golden.set(id, d.golden);
      if (!S.pending.get(id)) setTier(id, d.tier, d.rater);
      ui.dImg.src = "loop/files/" + encPath(d.path);
      const meta = [
        ["Prompt", d.prompt], ["Negative prompt", d.negative_prompt || "—"], ["Seed", d.seed], ["Steps", d.steps],
        ["CFG", d.cfg], ["Sampler", d.sampler], ["Size", d.width && d.height ? `${d.width} × ${d.height}` : null],
        ["Unit", d.unit], ["Round", d.round], ["Source", d.source], ["Model", d.model],
        ["Parent", d.parent ? `#${d.parent.id} ${d.parent.prompt}` : "— (made from the prompt alone)"],
        ["Lineage", d.lineage.length ? [`#${d.id}`, ...d.lineage.map((p) => `#${p.id}`)].join(" ← ") : null],
        ["Units", d.units.map((u) => `unit ${u.unit} (${u.method}${u.unit === 0 ? ": " + u.base : ""})`).join(" ← ")],
        ["Image", `#${d.id} · ${d.path}`],
        ...Object.entries(d.extra).map(([k, v]) => [k, v !== null && typeof v === "object" ? JSON.stringify(v) : v]),
      ];
      ui.dMeta.replaceChildren();
      for (const [k, v] of meta) {
        if (v === null || v === undefined || v === "") continue;
        ui.dMeta.append(el("dt", "", k), el("dd", "", String(v)));
      }
      paintHistory(d.history);
      paintDetailTier();
    }

    function paintHistory(history) {
      ui.dHist.replaceChildren(el("b", "", "History"));
      if (!history.length) ui.dHist.append(el("div", "", "no ratings yet"));
      for (const h of history) {
        const when = new Date(h.at * 1000).toLocaleString();
        const line = el("div", h.undone ? "lr-undone" : "", h.undo ? `undo by ${h.rater}` : `${h.tier} by ${h.rater}`);
        line.append(el("span", "lr-when", ` ${when}`));
        ui.dHist.append(line);
      }
    }

    // A rating or an undo of the image the detail view shows is stored: its History must show it now, not
    // when the view is opened again.
    async function refreshHistory(id) {
      if (!S.detail || S.ids[S.focus] !== id) return;
      const token = S.detailToken;
      let d;
      try {
        d = await call("GET", API + `image/${id}`);
      } catch (e) { return; /* it shows when the view is opened again */ }
      if (token === S.detailToken && S.detail) paintHistory(d.history);
    }

    function paintDetailTier() {
      const id = S.ids[S.focus];
      const tier = S.tier.get(id) || "";
      ui.dTier.textContent = tier || "unrated";
      ui.dTier.className = tier ? `lr-d-tier lr-chip lr-t-${tier}` : "lr-d-tier";
      ui.dBy.textContent = tier ? ` by ${S.by.get(id)}` + (S.pending.get(id) ? " (saving…)" : "") : "";
      const g = S.golden.get(id);
      ui.dGolden.textContent = tier === "UR" && g ? "★ collected in golden/" : "";
      ui.detail.dataset.id = id;
      ui.detail.dataset.tier = tier;
    }

    ui.dImg.addEventListener("load", () => {
      ui.dImg.classList.toggle("lr-pixel", ui.dImg.naturalWidth < 256);
      ui.dImg.parentElement.classList.remove("lr-missing");
    });
    ui.dImg.addEventListener("error", () => {
      if (ui.dImg.getAttribute("src")) ui.dImg.parentElement.classList.add("lr-missing");
    });
    $(".lr-excellent").addEventListener("click", (e) => rateShown("UR", false, e.timeStamp));
    $(".lr-d-close").addEventListener("click", closeDetail);
    $(".lr-d-prev").addEventListener("click", () => goTo(S.focus - 1));
    $(".lr-d-next").addEventListener("click", () => goTo(S.focus + 1));
    ui.detail.addEventListener("click", (e) => { if (e.target === ui.detail) closeDetail(); });

    // A button clicked with the mouse lets the keyboard focus go, so Enter next opens the detail view (as the
    // legend says) instead of pressing that button again (Finish, or a tier chip: a second rating).
    root.addEventListener("click", (e) => {
      const b = e.target.closest && e.target.closest("button");
      if (b && e.detail > 0) b.blur();
    });

    // -- keys ---------------------------------------------------------------------------------------------
    function onKey(e) {
      if (!root.isConnected) { document.removeEventListener("keydown", onKey); return; }
      if (!S.detail && root.offsetParent === null) return; // another tab is showing
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      const t = e.target;
      if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) {
        if (e.key === "Escape" || (e.key === "Enter" && t === ui.rater)) { t.blur(); e.preventDefault(); }
        return;
      }
      if (t && t.tagName === "BUTTON" && (e.key === "Enter" || e.key === " ")) return;
      const k = e.key.length === 1 ? e.key.toLowerCase() : e.key;
      let handled = true;
      if (KEYS[k]) { if (!e.repeat) rateShown(KEYS[k], true, e.timeStamp); }
      else if (UNDO_KEYS.has(k)) { if (!e.repeat) undo(); }
      else if (k === "ArrowRight") goTo(S.focus + 1);
      else if (k === "ArrowLeft") goTo(S.focus - 1);
      else if (k === "ArrowDown") goTo(S.focus + S.cols);
      else if (k === "ArrowUp") goTo(S.focus - S.cols);
      else if (k === "PageDown") goTo(S.focus + S.cols * Math.max(1, Math.floor(ui.scroll.clientHeight / STEP)));
      else if (k === "PageUp") goTo(S.focus - S.cols * Math.max(1, Math.floor(ui.scroll.clientHeight / STEP)));
      else if (k === "Home") goTo(0);
      else if (k === "End") goTo(S.ids.length - 1);
      else if (k === "Enter") openDetail();
      else if (k === "Escape") { if (S.detail) closeDetail(); else handled = false; }
      else handled = false;
      if (handled) e.preventDefault();
    }
    document.addEventListener("keydown", onKey);

    // -- the bar: rater name, filters, finish -------------------------------------------------------------
    ui.rater.value = S.rater;
    ui.rater.classList.toggle("lr-need", !S.rater);
    ui.rater.addEventListener("input", () => {
      S.rater = ui.rater.value.trim();
      localStorage.setItem("loop.rater", S.rater);
      ui.rater.classList.toggle("lr-need", !S.rater);
      if (S.rater) status("");
    });
    ui.showPred.checked = S.showPred;
    ui.showPred.addEventListener("change", () => {
      S.showPred = ui.showPred.checked;
      localStorage.setItem("loop.predicted", S.showPred ? "1" : "0");
      ui.showPred.blur();
      for (const t of S.live.values()) paintTile(t, t._id);
      paintTaste();
      if (S.showPred) refreshPredictions();
    });
    for (const s of [ui.round, ui.unit, ui.tier, ui.unrated, ui.order]) {
      s.addEventListener("change", () => { ui.tier.disabled = ui.unrated.checked; s.blur(); load(); });
    }
    let qTimer = null;
    ui.q.addEventListener("input", () => { clearTimeout(qTimer); qTimer = setTimeout(load, 300); });

    function paintFinish() {
      const m = S.meta;
      ui.finish.textContent = m.rate_closed ? `Round ${m.current_round}: rating closed` : `Finish rating round ${m.current_round}`;
      ui.finish.classList.toggle("lr-closed", !!m.rate_closed);
    }

    ui.finish.addEventListener("click", async () => {
      const n = S.meta.current_round;
      if (!S.meta.rate_closed && !confirm(`Close the rating of round ${n}? \`loop run --round\` then selects and trains.`)) return;
      try {
        const r = await call("POST", API + "finish", { round: n });
        S.meta.rate_closed = true;
        paintFinish();
        status(r.already ? `round ${r.round} was already closed: ${r.summary}`
          : `round ${r.round} closed (${r.summary}); now run \`loop run --round\``);
      } catch (e) {
        status(`could not finish: ${e.message}`, true);
      }
    });

    async function start() {
      // the menus and the first list in parallel: "current" lets the server pick the round before we know it
      const p = new URLSearchParams(location.search);
      const first = { round: p.get("round") || "current", unit: p.get("unit"), tier: p.get("tier"),
        unrated: p.get("unrated") === "1", q: p.get("q"),
        order: ["likely_ur", "uncertain"].includes(p.get("order")) ? p.get("order") : "" };
      const list = call("GET", API + "images?" + qs({ ...first, tab: S.tab }));
      list.catch(() => {});
      try {
        S.meta = await call("GET", API + "meta");
      } catch (e) {
        status(`could not reach the server: ${e.message}`, true);
        setTimeout(start, POLL_MS);
        return;
      }
      const m = S.meta;
      wsToken = m.w || "";
      if (m.login) {
        // behind a login, ratings are by the logged-in user (the server takes the name from the login)
        S.rater = m.login;
        ui.rater.value = m.login;
        ui.rater.readOnly = true;
        ui.rater.title = "you are logged in as " + m.login;
        ui.rater.classList.remove("lr-need");
      }
      const round = first.round === "current" ? String(m.current_round) : first.round;
      const rounds = m.rounds.map(String);
      if (round !== "all" && !rounds.includes(round)) rounds.push(round); // a round with no images yet
      ui.round.replaceChildren(new Option("all rounds", "all"), ...rounds.map((r) => new Option(`round ${r}`, r)));
      const units = m.units.map(String);
      if (first.unit && !units.includes(first.unit)) units.push(first.unit);
      ui.unit.replaceChildren(new Option("all units", ""), ...units.map((u) => new Option(`unit ${u}`, u)));
      ui.round.value = round;
      ui.unit.value = first.unit || "";
      ui.tier.value = first.tier || "";
      ui.unrated.checked = first.unrated;
      ui.tier.disabled = ui.unrated.checked;
      ui.q.value = first.q || "";
      ui.order.value = first.order;
      paintFinish();
      await load(list);
      adoptQueues(); // ratings a page closed before they were saved (after load: the tiles show them pending)
      S.pollTimer = setTimeout(poll, POLL_MS);
    }

    // a closed page gives its claim back at once (it would lapse by itself after a few seconds)
    window.addEventListener("pagehide", () => {
      fetch(API + "claim", { method: "POST", keepalive: true, credentials: "same-origin",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ tab: S.tab, image_id: null }) })
        .catch(() => {});
    });

    window.LoopRate.state = S;
    window.LoopRate.idle = () => !S.busy && S.queue.length === 0;
    window.LoopRate.timings = S.timings;
    start();
  }

  window.LoopRate = { mount };
})();
