"""Prompt cleaning as Open-Sora 1.2 does it before T5, so that our pipeline and upstream's feed T5 the same text.

Open-Sora's inference appends the score suffixes, then runs the caption cleaner of its training data (DeepFloyd
IF's) twice over each prompt: lower case, URLs, HTML, nicknames, CJK ideographs, normalised dashes and quotes,
ids, file names, runs of punctuation, shop words, and whitespace. The rules below apply the same substitutions
in the same order (`clean_caption`); `clean_prompt` is the twice-applied version the pipeline uses. It needs
`ftfy` (text repair) and `beautifulsoup4` (HTML to text).
"""

from __future__ import annotations

import html
import re
import urllib.parse

__all__ = ["clean_caption", "clean_prompt"]

_SHOP_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
_FILE_EXTS = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32"
    "\ufe58\ufe63\uff0d"
)
# Ideographic blocks the cleaner drops: CJK strokes, katakana extensions, enclosed letters, compatibility,
# extension A, Yijing hexagrams, unified ideographs.
_CJK_BLOCKS = (
    "\u31c0-\u31ef",
    "\u31f0-\u31ff",
    "\u3200-\u32ff",
    "\u3300-\u33ff",
    "\u3400-\u4dbf",
    "\u4dc0-\u4dff",
    "\u4e00-\u9fff",
)
_PUNCT_RUN = "[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]+"


def _rules(*pairs: tuple[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


# Before the HTML pass: links (with a scheme, or a bare shop-like domain; a second pass for "www:").
_BEFORE_HTML = _rules(
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _SHOP_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _SHOP_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
)
# Between the HTML pass and the basic clean-up.
_AFTER_HTML = _rules(
    (r"@[\w\d]+\b", ""),  # @nickname
    *[("[" + block + "]+", "") for block in _CJK_BLOCKS],
    ("[" + _DASHES + "]+", "-"),  # every kind of dash
    (r"[`´«»“”¨]", '"'),  # one kind of double quote
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids at the end
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _FILE_EXTS, ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (_PUNCT_RUN, " "),
    (r"\s+\.\s+", " "),
)
# After the basic clean-up: codes, shop phrases, sizes, spacing, wrapping quotes and stray edge punctuation.
_FINAL = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _FILE_EXTS + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes like 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)
_WORD_JOINERS = re.compile(r"(?:\-|\_)")


def _apply(rules: list[tuple[re.Pattern[str], str]], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def _basic_clean(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_caption(caption: str) -> str:
    """One pass of Open-Sora's caption cleaner."""
    from bs4 import BeautifulSoup

    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = BeautifulSoup(text, features="html.parser").text
    text = _apply(_AFTER_HTML, text)
    if len(_WORD_JOINERS.findall(text)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        text = _WORD_JOINERS.sub(" ", text)
    text = _apply(_FINAL, _basic_clean(text))
    return text.strip()


def clean_prompt(prompt: str) -> str:
    """What Open-Sora 1.2 sends to T5 for `prompt` (scores already appended): the cleaner, applied twice."""
    return clean_caption(clean_caption(prompt))
