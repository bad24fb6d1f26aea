"""Text normalisation: mojibake repair, NFKC, HTML and control characters stripped, whitespace collapsed."""

from __future__ import annotations

import html
import re
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


@lru_cache(maxsize=1)
def _t2s():
    from opencc import OpenCC

    return OpenCC("t2s")


def _drop_controls(text: str) -> str:
    # Cc (controls) and Cf (zero-width, BOM, bidi marks) carry no meaning for embedding; keep whitespace.
    return "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Co", "Cs"))


def normalise_text(text: str, config: CleanConfig) -> str:
    """One side's text after every enabled rule, in a fixed order (repair before NFKC before stripping)."""
    if config.fix_mojibake:
        text = ftfy.fix_text(text, normalization="NFC")
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
