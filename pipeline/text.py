"""Text handling: Turkish casing, caption clean-up, and one-line messages that Arrow can store."""

from __future__ import annotations

import re
import unicodedata

# Python's str.lower()/upper() map I->i and i->I, which is wrong for Turkish (I<->ı, İ<->i).
_TR_LOWER = str.maketrans({"I": "ı", "İ": "i"})
_TR_UPPER = str.maketrans({"ı": "I", "i": "İ"})
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_SURROGATES = re.compile("[\ud800-\udfff]")
_UTF8_LETTER = re.compile("[^\x00-\x7f\ufffd]")  # a multi-byte UTF-8 sequence that decoded


def decode_text(data: bytes) -> str:
    """Text from a file or tar member: UTF-16 where it starts with its byte-order mark (Windows Notepad's
    "Unicode"), else UTF-8 (a byte-order mark dropped); UTF-8 with a few bad bytes (a letter cut in two)
    keeps its letters and U+FFFD for the bad bytes; text with no UTF-8 letter at all is read in the Windows
    Turkish code page that older Turkish caption files use, whose every letter UTF-8 would have lost."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    as_utf8 = data.decode("utf-8", errors="replace")
    if _UTF8_LETTER.search(as_utf8):
        return as_utf8
    try:
        return data.decode("cp1254")
    except UnicodeDecodeError:
        return as_utf8


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


def storable(text: str) -> str:
    """text that Arrow can store: os and tarfile decode non-UTF-8 file names with surrogate escapes,
    which become backslash escapes of their bytes (b"caf\\xe9" -> "caf\\\\xe9"), so two such names stay two keys;
    other lone surrogates (JSON's "\\ud800") become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return _SURROGATES.sub("\ufffd", text)


def one_line(message: object, limit: int = 300) -> str:
    """str(message) on one storable line, cut to `limit` characters ("..." marks a cut): for error
    columns and usage errors, whatever an underlying exception printed."""
    text = storable(" ".join(str(message).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """The exception as one line, "TypeName: message"; the type alone when it has no message."""
    text = one_line(exc, limit)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
