"""A font that draws the prompts people write, for the labels PIL draws (the compare grid).

PIL's default font covers ASCII only: a Japanese prompt came out as boxes. `label_font` keeps the default where
it draws every character, else finds an installed font that does: first by asking fontconfig (`fc-list
:charset=...`, where fontconfig is installed), then at the usual places of CJK fonts on Linux, macOS and Windows.
Whether a font draws a character is checked by drawing it: a font without the glyph draws its "no glyph" box,
the same bitmap as for U+FFFF. Where no installed font covers the text, the default stays and the caller is told
which characters are missing (`FONT_HINT` names the package to install).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

from PIL import ImageFont

FONT_PACKAGE = "fonts-noto-cjk"
FONT_HINT = f"install a font that covers them: {FONT_PACKAGE} (Debian/Ubuntu: apt-get install {FONT_PACKAGE})"
# where CJK fonts live when fontconfig cannot be asked (Debian/Ubuntu, Fedora, Arch, openSUSE, macOS, Windows)
KNOWN_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKjp-Regular.otf",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Latin, Greek, Cyrillic: an accented prompt at least
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/YuGothM.ttc",
    "C:/Windows/Fonts/msgothic.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/malgun.ttf",
)
NO_GLYPH = "\uffff"  # a noncharacter: every font draws its "no glyph" box for it


def _mask(font, ch: str) -> tuple:
    m = font.getmask(ch)
    return m.size, bytes(m)


def missing_chars(font, chars) -> set[str]:
    """The characters of `chars` (whitespace aside) that `font` draws as its "no glyph" box."""
    box = _mask(font, NO_GLYPH)
    return {c for c in set(chars) if not c.isspace() and c != NO_GLYPH and _mask(font, c) == box}


def _fontconfig(chars: set[str]) -> list[str]:
    """Font files fontconfig says cover every one of `chars` (regular sans first); [] without fontconfig."""
    if not shutil.which("fc-list") or not chars:
        return []
    charset = " ".join(f"{ord(c):x}" for c in sorted(chars)[:200])
    try:
        out = subprocess.run(["fc-list", f":charset={charset}", "file", "style"], capture_output=True, text=True,
                             timeout=10, check=False).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        path, _, style = line.partition(":")
        found.append((path.strip(), style))

    def rank(item) -> tuple:
        path, style = item
        name = Path(path).name.lower()
        return ("regular" not in style.lower() and "book" not in style.lower(), "serif" in name and "sans" not in name,
                "bold" in name or "bold" in style.lower(), "mono" in name, name)  # fmt: skip

    return [p for p, _ in sorted(found, key=rank)]


@functools.lru_cache(maxsize=64)
def _choose(chars: frozenset, size: int) -> tuple:
    default = ImageFont.load_default(size)
    lacking = missing_chars(default, chars)
    if not lacking:
        return default, frozenset()
    best, best_missing = default, lacking
    for path in dict.fromkeys([*_fontconfig(lacking), *KNOWN_FONTS]):
        if not Path(path).is_file():
            continue
        try:
            font = ImageFont.truetype(path, size)
        except OSError:
            continue
        left = missing_chars(font, chars)
        if len(left) < len(best_missing):
            best, best_missing = font, left
        if not left:
            break
    return best, frozenset(best_missing)


def label_font(texts, size: int = 10) -> tuple:
    """(a font that draws every character of `texts`, or the one that draws the most; the characters it still
    cannot draw). PIL's default font where it draws them all."""
    return _choose(frozenset("".join(texts)), size)


def wrap(draw, text: str, font, width: int) -> list[str]:
    """`text` on lines no wider than `width` pixels: broken at spaces, and inside a word (or a run of text with no
    spaces, as Japanese and Chinese are written) only where the word alone is wider than a line."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
            line = ""
        for ch in word:  # a word wider than a line: broken where it reaches the edge
            if line and draw.textlength(line + ch, font=font) > width:
                lines.append(line)
                line = ""
            line += ch
    if line or not lines:
        lines.append(line)
    return lines
