// Blind A/B between units: two images of the same prompt, seed and settings, sides randomised, units hidden.
// Keys (only while the A/B tab is showing): ArrowLeft or 1 = left, ArrowRight or 2 = right, ArrowDown or 0 = tie,
// ArrowUp or 9 = skip, Z or Backspace = undo your last vote (its pair comes back to be voted on again). A pair comes with a one-time token and its images are served under it, stripped of their
// metadata, so nothing on the page (URL, file, id) names a unit; votes go to /loop/api/ab/vote with that token.
// The ranking is folded away while voting and folds itself again at each vote: open, it would show whose wins
// just went up.
window.LoopAB = (function () {
  const KEYS = { ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", ArrowDown: "tie", "0": "tie",
                 ArrowUp: "skip", "9": "skip" };

  function mount(root) {
    root.innerHTML = `
      <div class="ab">
        <div class="ab-help">Which is better? <kbd>←</kbd>/<kbd>1</kbd> left · <kbd>→</kbd>/<kbd>2</kbd> right ·
          <kbd>↓</kbd>/<kbd>0</kbd> tie · <kbd>↑</kbd>/<kbd>9</kbd> skip · <kbd>Z</kbd> undo. The units are hidden and the sides
          are random.
          <label class="ab-which">Compare <select class="ab-units"><option value="">any two units</option></select></label></div>
        <div class="ab-pair">
          <figure><img class="ab-img" data-side="left" alt="left"><figcaption><button data-w="left">Left</button></figcaption></figure>
          <figure><img class="ab-img" data-side="right" alt="right"><figcaption><button data-w="right">Right</button></figcaption></figure>
        </div>
        <div class="ab-tie"><button data-w="tie">Tie</button> <button data-w="skip">Skip</button><span class="ab-status"></span></div>
        <div class="ab-msg" hidden></div>
        <details class="ab-results"><summary>Results (they fold away while you vote, so they cannot tell you which
          unit you just picked)</summary><div class="ab-ranking"></div></details>
      </div>`;
    const imgs = { left: root.querySelector('[data-side="left"]'), right: root.querySelector('[data-side="right"]') };
    const status = root.querySelector(".ab-status");
    const msg = root.querySelector(".ab-msg");
    const which = root.querySelector(".ab-units");
    const results = root.querySelector(".ab-results");
    const ranking = root.querySelector(".ab-ranking");
    const voting = [root.querySelector(".ab-pair"), root.querySelector(".ab-tie")];
    // No pair to show: no empty image boxes or buttons, only the reason (a line of its own).
    function showPair(on, text) {
      for (const e of voting) e.hidden = !on;
      msg.hidden = on;
      msg.textContent = on ? "" : text;
    }
    let pair = null, busy = false;

    async function units() {
      try {
        const r = await fetch("/loop/api/ab/units");
        if (!r.ok) return;
        const us = (await r.json()).units.slice().sort((a, b) => b - a); // newest first
        const opts = [];
        for (let i = 0; i < us.length && opts.length < 30; i++) {
          for (let j = i + 1; j < us.length && opts.length < 30; j++) opts.push([us[i], us[j]]);
        }
        which.replaceChildren(new Option("any two units", ""),
          ...opts.map(([a, b]) => new Option(`unit ${a} vs unit ${b}`, `${a},${b}`)));
      } catch (e) { /* the server is away: "any two units" stays */ }
    }

    async function next() {
      let r;
      const [a, b] = which.value ? which.value.split(",") : [null, null];
      try {
        r = await fetch("/loop/api/ab/pair" + (a ? `?a=${a}&b=${b}` : ""));
      } catch (e) { // the server is away: keep the pair shown; the next vote (or key) tries again
        status.textContent = "the server is not answering; votes are not saved until it is back";
        return false;
      }
      let data = {};
      try { data = await r.json(); } catch (e) { /* not JSON */ }
      if (!r.ok) {
        pair = null;
        imgs.left.removeAttribute("src"); imgs.right.removeAttribute("src");
        showPair(false, data.error || "no pairs to compare yet");
        return;
      }
      show(data);
      status.textContent = "";
      return true;
    }
    function show(data) {
      pair = data;
      imgs.left.src = data.left.url; imgs.right.src = data.right.url;
      showPair(true);
    }
    async function undo() {
      if (busy) return;
      busy = true;
      results.open = false;
      try {
        const r = await fetch("/loop/api/ab/undo", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ rater: localStorage.getItem("loop.rater") || "anonymous" }),
        });
        const data = await r.json();
        if (!r.ok) { status.textContent = data.error || "not undone"; return; }
        if (data.undone === null) { status.textContent = "no vote of yours to undo"; return; }
        show(data); // the pair voted on, sides drawn again: vote on it anew
        root.dataset.votes = String(data.votes);
        status.textContent = `undone (${data.votes} votes): that pair again`;
      } catch (e) {
        status.textContent = "not undone: the server is not answering";
      } finally {
        busy = false;
      }
    }
    async function showRanking() {
      try {
        const r = await fetch("/loop/api/ab/ranking");
        if (r.ok) ranking.innerHTML = (await r.json()).html;
      } catch (e) { ranking.textContent = "the server is not answering"; }
    }
    async function vote(winner) {
      if (!pair || busy) return;
      busy = true; // one vote at a time; the next pair is showing before the next key counts
      results.open = false;
      let votes = null;
      try {
        let r, data = {};
        try {
          r = await fetch("/loop/api/ab/vote", {
            method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ pair: pair.pair, winner: winner,
                                   rater: localStorage.getItem("loop.rater") || "anonymous" }),
          });
          try { data = await r.json(); } catch (e) { /* not JSON */ }
        } catch (e) { // not sent: the same pair stays, so the vote can be given again
          status.textContent = "not saved: the server is not answering; vote again when it is back";
          return;
        }
        if (r.ok) votes = data.votes;
        const moved = await next();
        const said = winner === "skip" ? "skipped" : `saved (${data.votes} votes)`;
        if (moved !== false) status.textContent = r.ok ? said : (data.error || "not saved");
      } finally {
        busy = false;
        if (votes !== null) root.dataset.votes = String(votes);
      }
    }
    root.addEventListener("click", (e) => {
      const w = e.target.dataset && e.target.dataset.w;
      if (w) { e.target.blur(); vote(w); }
    });
    which.addEventListener("change", () => { which.blur(); next(); });
    results.addEventListener("toggle", () => { if (results.open) showRanking(); });
    function onKey(e) {
      if (!root.isConnected) { document.removeEventListener("keydown", onKey); return; }
      if (root.offsetParent === null) return; // the A/B tab is not showing
      const t = e.target;
      if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) return;
      if ((e.key === "z" || e.key === "Z" || e.key === "Backspace") && !e.ctrlKey && !e.metaKey) {
        e.preventDefault();
        if (!e.repeat) undo();
        return;
      }
      const w = KEYS[e.key];
      if (w) { e.preventDefault(); if (!e.repeat) vote(w); } // a held key is one vote, not one per repeat
    }
    document.addEventListener("keydown", onKey);
    units().then(next);
  }
  return { mount: mount };
})();
