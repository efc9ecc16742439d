"""Turkish suffixes by rule, never spelt out per word: vowel harmony, buffer letters, consonant assimilation and
final-consonant softening, with small exception sets for lexically marked words (`inflect`)."""

from __future__ import annotations

# Templates use the usual archiphonemes: A = a/e (2-way harmony), I = ı/i/u/ü (4-way), D = d/t, C = c/ç;
# a leading "(y)", "(n)" or "(s)" is a buffer letter kept only after a vowel.
PL = "lAr"
GEN = "(n)In"
ACC = "(y)I"
DAT = "(y)A"
LOC = "DA"
ABL = "DAn"
POSS3 = "(s)I"
POSS_LOC = "nDA"  # locative after a 3rd-person possessive takes the pronominal n: sol-u-n-da
KI = "ki"

VOWELS = frozenset("aeıioöuü")
_BACK = frozenset("aıou")
_ROUNDED = frozenset("oöuü")
_VOICELESS = frozenset("çfhkpsşt")  # "fıstıkçı şahap"
_SOFTENED = {"p": "b", "ç": "c", "t": "d", "k": "ğ", "g": "ğ"}
_VOWEL_SLOTS = VOWELS | {"A", "I"}
_FOUR_WAY = {(True, False): "ı", (False, False): "i", (True, True): "u", (False, True): "ü"}

# Loanwords whose final consonant is palatal: suffixes take front vowels although the last vowel is back.
FRONT_HARMONY = frozenset({"kalp", "hilal", "saat", "rol", "gol", "alkol", "petrol"})
# Monosyllables keep their final consonant unless lexically marked; polysyllables soften unless marked.
SOFTENING_MONOSYLLABLES = frozenset({"kalp", "renk", "uç", "dip", "kap", "çok"})
NO_SOFTENING = frozenset({"saat", "sepet", "devlet", "millet", "bisiklet", "hayat"})


def _harmony(word: str, front_until: int) -> tuple[bool, bool]:
    """(back, rounded) of the word's last vowel; a vowel before index `front_until` counts as front
    (the stem of a palatal loanword)."""
    index = next((i for i in range(len(word) - 1, -1, -1) if word[i] in VOWELS), None)
    if index is None:
        raise ValueError(f"no vowel to harmonise with in {word!r}")
    return word[index] in _BACK and index >= front_until, word[index] in _ROUNDED


def _soften(word: str) -> str:
    """Final p/ç/t/k/g -> b/c/d/ğ/ğ (nk -> ng) before a vowel, where Turkish does it."""
    if word[-1] not in _SOFTENED or word in NO_SOFTENING:
        return word
    syllables = sum(ch in VOWELS for ch in word)
    if syllables < 2 and word not in SOFTENING_MONOSYLLABLES:
        return word
    if word.endswith("nk"):
        return word[:-1] + "g"
    return word[:-1] + _SOFTENED[word[-1]]


def _attach(word: str, suffix: str, front_until: int) -> str:
    if suffix.startswith("("):
        buffer, suffix = suffix[1], suffix[3:]
        if word[-1] in VOWELS:
            suffix = buffer + suffix
    if suffix[:1] in _VOWEL_SLOTS and word[-1] not in VOWELS:
        word = _soften(word)
    out = word
    for ch in suffix:
        if ch == "A":
            out += "a" if _harmony(out, front_until)[0] else "e"
        elif ch == "I":
            out += _FOUR_WAY[_harmony(out, front_until)]
        elif ch == "D":
            out += "t" if out[-1] in _VOICELESS else "d"
        elif ch == "C":
            out += "ç" if out[-1] in _VOICELESS else "c"
        else:
            out += ch
    return out


def inflect(word: str, *suffixes: str) -> str:
    """`word` with the suffix templates attached in order, e.g. inflect("kalp", GEN) == "kalbin"."""
    front_until = len(word) if word in FRONT_HARMONY else 0  # softening keeps the stem's length
    for suffix in suffixes:
        word = _attach(word, suffix, front_until)
    return word
