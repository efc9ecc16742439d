"""Turkish-aware text handling: casing and caption clean-up."""

from __future__ import annotations

import re
import unicodedata

# Python's str.lower()/upper() map I->i and i->I, which is wrong for Turkish (I<->ı, İ<->i).
_TR_LOWER = str.maketrans({"I": "ı", "İ": "i"})
_TR_UPPER = str.maketrans({"ı": "I", "i": "İ"})
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def tr_lower(text: str) -> str:
    """Lowercase with Turkish dotted/dotless i rules."""
    return unicodedata.normalize("NFC", text).translate(_TR_LOWER).lower()


def tr_upper(text: str) -> str:
    """Uppercase with Turkish dotted/dotless i rules."""
    return unicodedata.normalize("NFC", text).translate(_TR_UPPER).upper()


def tr_capitalize(text: str) -> str:
    """First letter uppercased the Turkish way, the rest left as is."""
    return tr_upper(text[:1]) + text[1:] if text else text


def clean_caption(text: str) -> str:
    """Unicode NFC, whitespace collapsed, no space before punctuation, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = _SPACES.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)
