"""configs/prompts.txt: one prompt per line, read as a list (one pass) or as a ring (`loop generate --forever`).

    a red circle
    # comments and blank lines are skipped
    夕焼けの丸 🌅 --n 8 --seed 100 --cfg 5 --neg "blue" --steps 30 --w 64 --h 64

The per-line options follow AUTOMATIC1111's "prompts from file" script. A line that can't be used (a bad
option, bytes that are not UTF-8, over 10,000 characters) is reported with its line number and skipped; the
other lines still run.

The ring re-reads the file before every prompt, so edits are picked up without a restart, and keeps its
position in the store: (index of the current line, that line's text, cycle, the line done before it, the
lines that followed it). After an edit the position follows the line's text if it moved; if the line was
deleted, the ring goes on with the line after the one it did last, or, if that went too, with the first of the
lines that followed it that is still there.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from loop.config import MAX_SEED
from loop.errors import LoopError

# per-line overrides, as in A1111's "prompts from file": `a red circle --n 4 --seed 7 --cfg 5`
LINE_OPTIONS = {"--n": int, "--seed": int, "--steps": int, "--cfg": float, "--neg": str, "--w": int, "--h": int}
# a longer line is a paste gone wrong, not a prompt (CLIP reads 77 tokens; every image would carry it in its PNG)
MAX_LINE_CHARS = 10_000


@dataclass(frozen=True)
class PromptLine:
    text: str
    lineno: int
    n: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    neg: str | None = None
    w: int | None = None
    h: int | None = None


def parse_line(raw: str, lineno: int) -> PromptLine:
    """One prompt line; raises ValueError naming the bad option."""
    text, sep, rest = raw.partition(" --")
    line = PromptLine(text=text.strip(), lineno=lineno)
    if not sep:
        return line
    try:
        tokens = shlex.split("--" + rest)
    except ValueError as e:  # an unclosed quote
        raise ValueError(f"options could not be split ({e})") from None
    values = {}
    i = 0
    while i < len(tokens):
        opt = tokens[i]
        if opt not in LINE_OPTIONS:
            raise ValueError(f"unknown option {opt!r} (use {', '.join(LINE_OPTIONS)})")
        if i + 1 >= len(tokens):
            raise ValueError(f"option {opt} needs a value")
        try:
            values[opt[2:]] = LINE_OPTIONS[opt](tokens[i + 1])
        except ValueError:
            raise ValueError(f"{opt} {tokens[i + 1]!r} is not a valid {LINE_OPTIONS[opt].__name__}") from None
        i += 2
    for key in ("n", "steps", "w", "h"):
        if key in values and values[key] <= 0:
            raise ValueError(f"--{key} must be positive, got {values[key]}")
    if "seed" in values and not 0 <= values["seed"] <= MAX_SEED:
        raise ValueError(f"--seed must be between 0 and {MAX_SEED}, got {values['seed']}")
    for key in ("w", "h"):
        if key in values and values[key] % 8:
            raise ValueError(f"--{key} must be a multiple of 8, got {values[key]}")
    return replace(line, **values)


def read_prompts(path: Path, *, allow_empty: bool = False) -> tuple[list[PromptLine], list[str]]:
    """The usable lines of a prompt file, and one message per line that could not be used."""
    if not path.exists():
        raise LoopError(f"no prompt file at {path}; write one prompt per line there (`loop init` makes a sample)")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as Windows editors write
        data = data[3:]
    lines, problems = [], []
    for lineno, raw_bytes in enumerate(data.splitlines(), 1):
        try:
            raw = raw_bytes.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            problems.append(f"{path.name}:{lineno}: not UTF-8 (byte {e.start}); save the file as UTF-8; line skipped")
            continue
        if not raw or raw.startswith("#"):
            continue
        if len(raw) > MAX_LINE_CHARS:
            problems.append(
                f"{path.name}:{lineno}: {len(raw):,} characters, over the {MAX_LINE_CHARS:,} a prompt line may have; "
                "shorten it or break it into lines; line skipped"
            )
            continue
        try:
            line = parse_line(raw, lineno)
        except ValueError as e:
            problems.append(f"{path.name}:{lineno}: {e}; line skipped")
            continue
        if not line.text:
            problems.append(f"{path.name}:{lineno}: no prompt text before the options; line skipped")
            continue
        lines.append(line)
    if not lines and not allow_empty:
        why = f" ({len(problems)} line(s) could not be used: {problems[0]})" if problems else ""
        raise LoopError(f"{path} has no usable prompts{why}; write one prompt per line (# starts a comment)")
    return lines, problems


@dataclass
class RingPosition:
    index: int = 0  # the line the ring is on (among the usable lines)
    text: str = ""  # that line's text, to find it again after an edit
    cycle: int = 0  # how many times the ring went round; image k of a line in cycle c uses seed + c*n + k
    after: str = ""  # the text of the line done before it, to find the place again if this line is deleted
    # the texts of the lines that came after it (up to AHEAD), for when it and the line before are both deleted
    ahead: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"index": self.index, "text": self.text, "cycle": self.cycle, "after": self.after, "ahead": self.ahead}


AHEAD = 32


class Ring:
    """The prompt file as an endless ring, re-read before every prompt, with its position kept in the store."""

    def __init__(self, path: Path, store, key: str, log=print):
        self.path, self.store, self.key, self.log = Path(path), store, key, log
        # a new process layout (say 2 processes after 1) starts where the most recent ring stopped
        saved = store.get_state(key) or store.latest_state(key.split("/")[0] + "/") or {}
        self.pos = RingPosition(**{k: saved[k] for k in ("index", "text", "cycle", "after", "ahead") if k in saved})
        self._reported: set[str] = set()
        self.line: PromptLine | None = None  # the line the ring is on (current() or advance() set it)
        self._lines: list[PromptLine] = []  # the usable lines as current() last read them

    def current(self) -> PromptLine | None:
        """The line the ring is on, after re-reading the file; None while the file has no usable prompt."""
        try:
            lines, problems = read_prompts(self.path, allow_empty=True)
        except LoopError as e:  # the file was moved away mid-run: wait for it to come back
            problems, lines = [str(e)], []
        for p in problems:  # each problem once per run, not once per prompt
            if p not in self._reported:
                self._reported.add(p)
                self.log(f"warning: {p}")
        if not lines:
            return None
        pos = self.pos
        if not (pos.index < len(lines) and lines[pos.index].text == pos.text):
            texts = [ln.text for ln in lines]
            if pos.text and pos.text in texts:  # the line moved: follow it (the nearest copy if it appears twice)
                pos.index = min((i for i, t in enumerate(texts) if t == pos.text), key=lambda i: abs(i - pos.index))
            elif pos.after and pos.after in texts:  # the line was deleted: go on after the line done before it
                pos.index = texts.index(pos.after) + 1
            elif any(t in texts for t in pos.ahead):  # it and the one before went: on to the first that follows
                pos.index = texts.index(next(t for t in pos.ahead if t in texts))
            if pos.index >= len(lines):  # past the end: start the next cycle
                pos.index, pos.cycle = 0, (pos.cycle + 1 if pos.text else pos.cycle)
        pos.text = lines[pos.index].text
        pos.ahead = [ln.text for ln in lines[pos.index + 1 : pos.index + 1 + AHEAD]]
        self._lines = lines
        self.line = lines[pos.index]
        return self.line

    def advance(self) -> None:
        """Move to the next line (wrapping into the next cycle) and persist the position."""
        lines = self._lines or [None]
        self.pos.after = self.pos.text
        self.pos.index += 1
        if self.pos.index >= len(lines):
            self.pos.index, self.pos.cycle = 0, self.pos.cycle + 1
        self.line = lines[self.pos.index]  # the line the ring is on now (the message "the ring is at line N")
        self.pos.text = self.line.text if self.line else ""
        self.pos.ahead = [ln.text for ln in lines[self.pos.index + 1 : self.pos.index + 1 + AHEAD] if ln]
        self.save()

    def save(self) -> None:
        self.store.set_state(self.key, self.pos.as_dict())
