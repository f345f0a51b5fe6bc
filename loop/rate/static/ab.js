// Blind A/B between units: two images of the same prompt and seed, sides randomised, units hidden.
// Keys (only while the Compare tab is showing): ArrowLeft or 1 = left, ArrowRight or 2 = right, ArrowDown or 0 = tie.
// Votes go to /loop/api/ab/vote; the Bradley-Terry ranking below refreshes after each vote.
window.LoopAB = (function () {
  function mount(root) {
    root.innerHTML = `
      <div class="ab">
        <div class="ab-help">Which is better? <kbd>←</kbd>/<kbd>1</kbd> left · <kbd>→</kbd>/<kbd>2</kbd> right ·
          <kbd>↓</kbd>/<kbd>0</kbd> tie. The units are hidden and the sides are random.</div>
        <div class="ab-pair">
          <figure><img class="ab-img" data-side="left" alt="left"><figcaption><button data-w="left">Left</button></figcaption></figure>
          <figure><img class="ab-img" data-side="right" alt="right"><figcaption><button data-w="right">Right</button></figcaption></figure>
        </div>
        <div class="ab-tie"><button data-w="tie">Tie</button><span class="ab-status"></span></div>
        <div class="ab-msg" hidden></div>
        <div class="ab-ranking"></div>
      </div>`;
    const imgs = { left: root.querySelector('[data-side="left"]'), right: root.querySelector('[data-side="right"]') };
    const status = root.querySelector(".ab-status");
    const msg = root.querySelector(".ab-msg");
    const voting = [root.querySelector(".ab-pair"), root.querySelector(".ab-tie")];
    // No pair to show: no empty image boxes or buttons, only the reason (a line of its own).
    function showPair(on, text) {
      for (const e of voting) e.hidden = !on;
      msg.hidden = on;
      msg.textContent = on ? "" : text;
    }
    const ranking = root.querySelector(".ab-ranking");
    let pair = null, busy = false;

    async function next() {
      let r;
      try {
        r = await fetch("/loop/api/ab/pair");
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
      pair = data;
      imgs.left.src = data.left.url; imgs.right.src = data.right.url;
      showPair(true);
      status.textContent = "";
      return true;
    }
    async function showRanking() {
      try {
        const r = await fetch("/loop/api/ab/ranking");
        if (r.ok) ranking.innerHTML = (await r.json()).html;
      } catch (e) { /* the server is away: the ranking shown stays until the next vote */ }
    }
    async function vote(winner) {
      if (!pair || busy) return;
      busy = true; // one vote at a time; the next pair is showing before the next key counts
      let votes = null;
      try {
        let r, data = {};
        try {
          r = await fetch("/loop/api/ab/vote", {
            method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ left: pair.left.id, right: pair.right.id, winner: winner,
                                   rater: localStorage.getItem("loop.rater") || "anonymous" }),
          });
          try { data = await r.json(); } catch (e) { /* not JSON */ }
        } catch (e) { // not sent: the same pair stays, so the vote can be given again
          status.textContent = "not saved: the server is not answering; vote again when it is back";
          return;
        }
        if (r.ok) votes = data.votes;
        const moved = await next();
        if (moved !== false) status.textContent = r.ok ? `saved (${data.votes} votes)` : (data.error || "not saved");
      } finally {
        busy = false;
        if (votes !== null) root.dataset.votes = String(votes);
      }
      showRanking();
    }
    root.addEventListener("click", (e) => { const w = e.target.dataset && e.target.dataset.w; if (w) vote(w); });
    function onKey(e) {
      if (!root.isConnected) { document.removeEventListener("keydown", onKey); return; }
      if (root.offsetParent === null) return; // the Compare tab is not showing
      const t = e.target;
      if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA")) return;
      const w = { ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", ArrowDown: "tie", "0": "tie" }[e.key];
      if (w) { e.preventDefault(); if (!e.repeat) vote(w); } // a held key is one vote, not one per repeat
    }
    document.addEventListener("keydown", onKey);
    next(); showRanking();
  }
  return { mount: mount };
})();
