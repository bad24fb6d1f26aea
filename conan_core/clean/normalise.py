"""Text normalisation: mojibake repair, NFKC, HTML and control characters stripped, whitespace collapsed."""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from functools import lru_cache

import ftfy

from conan_core.clean.config import CleanConfig

_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>|<!--.*?-->", re.DOTALL)
_HTML_ENTITY = re.compile(r"&(?:#\d+|#x[0-9A-Fa-f]+|[A-Za-z]+);")
_WHITESPACE = re.compile(r"\s+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


# UTF-8 read as Latin-1 / cp1252 always leaves a lead byte in U+0080..U+00FF, so text without such a
# character cannot be that mojibake and skips ftfy (the slowest rule).
_MOJIBAKE_HINT = re.compile(r"[\x80-\xff]")
# ftfy settings: repair encodings only; quotes, widths and normalisation are handled (or kept) elsewhere,
# so Chinese curly quotes are not turned into ASCII ones.
_FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False, fix_character_width=False, fix_latin_ligatures=False,
                                    normalization=None, explain=False)


@lru_cache(maxsize=1)
def _control_chars() -> re.Pattern[str]:
    """Regex of every Cc / Cf / Co / Cs code point except whitespace (built once per process)."""
    ranges: list[tuple[int, int]] = []
    # Planes 3-13 hold no such code point; planes 15-16 are private use as a whole (added below).
    for code in [*range(0x30000), *range(0xE0000, 0xF0000)]:
        ch = chr(code)
        if unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs") and not ch.isspace():
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    ranges.append((0xF0000, sys.maxunicode))
    body = "".join(f"\\U{a:08x}-\\U{b:08x}" if a != b else f"\\U{a:08x}" for a, b in ranges)
    return re.compile(f"[{body}]")


@lru_cache(maxsize=1)
def _t2s():
    from opencc import OpenCC

    return OpenCC("t2s")


def _drop_controls(text: str) -> str:
    # Cc (controls) and Cf (zero-width, BOM, bidi marks) carry no meaning for embedding; keep whitespace.
    return _control_chars().sub("", text)


def normalise_text(text: str, config: CleanConfig) -> str:
    """One side's text after every enabled rule, in a fixed order (repair before NFKC before stripping)."""
    if config.fix_mojibake and _MOJIBAKE_HINT.search(text):
        text = ftfy.fix_text(text, _FTFY_CONFIG)
    if config.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if config.strip_html and ("<" in text or "&" in text):
        text = _HTML_TAG.sub(" ", text)
        if _HTML_ENTITY.search(text):
            text = html.unescape(text)
    text = _drop_controls(text)
    if config.traditional_to_simplified:
        text = _t2s().convert(text)
    return _WHITESPACE.sub(" ", text).strip()


def detect_lang(text: str) -> str:
    """zh when CJK characters are at least 20% of the letters, en when Latin words dominate, else other."""
    cjk = len(_CJK.findall(text))
    latin = sum(len(word) for word in _LATIN_WORD.findall(text))
    if cjk and cjk * 5 >= cjk + latin:
        return "zh"
    if latin and latin >= 0.5 * len(text.replace(" ", "")):
        return "en"
    return "other"


def approx_token_count(text: str) -> int:
    """Tokens without a tokenizer: each CJK character is one, each other whitespace-free run is one."""
    return len(_TOKEN.findall(text))
