"""Fictional, syllable-built person names.

Names are built from consonant-vowel syllables so that a pretrained model has
no prior knowledge about anyone in the corpus, and so the name space is large
enough (about 2.4 * 10^8 full names) that populations drawn with different
seeds are disjoint with overwhelming probability.

Every name is addressed by an integer index in ``range(NAME_SPACE_SIZE)``;
sampling indices without replacement gives unique names without rejection
loops. Each part has a fixed letter layout (CVCV[n] first names, CVCVC last
names), so distinct indices always spell distinct strings.
"""

from __future__ import annotations

# Consonants and vowels chosen to give pronounceable, regular byte sequences
# (no digraphs, no "c"/"q"/"x" spelling ambiguity), which a tiny byte-level BPE
# tokenizer splits into a handful of stable pieces.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES: tuple[str, ...] = tuple(c + v for c in _CONSONANTS for v in _VOWELS)

# First names: CV + CV + optional "n" coda. The coda doubles the space and also
# drives the pronoun convention below (vowel ending -> "She", else "He").
_FIRST_CODAS: tuple[str, ...] = ("", "n")
# Last names always end in a consonant, so a last name is never a prefix of
# another last name followed by a letter at a word boundary.
_LAST_CODAS: tuple[str, ...] = ("n", "r", "l", "s", "k")

_N_SYL = len(_SYLLABLES)
FIRST_NAME_COUNT: int = _N_SYL * _N_SYL * len(_FIRST_CODAS)
LAST_NAME_COUNT: int = _N_SYL * _N_SYL * len(_LAST_CODAS)
NAME_SPACE_SIZE: int = FIRST_NAME_COUNT * LAST_NAME_COUNT


def _part(index: int, codas: tuple[str, ...]) -> str:
    """Spell one capitalised name part (two syllables plus a coda) from an index."""
    rest, coda = divmod(index, len(codas))
    first, second = divmod(rest, _N_SYL)
    return (_SYLLABLES[first] + _SYLLABLES[second] + codas[coda]).capitalize()


def name_from_index(index: int) -> str:
    """Return the "Firstname Lastname" string for ``index`` in ``range(NAME_SPACE_SIZE)``.

    The mapping is a bijection onto the name space, so unique indices give
    unique names.
    """
    if not 0 <= index < NAME_SPACE_SIZE:
        raise ValueError(f"index must be in [0, {NAME_SPACE_SIZE}), got {index}")
    first, last = divmod(index, LAST_NAME_COUNT)
    return f"{_part(first, _FIRST_CODAS)} {_part(last, _LAST_CODAS)}"


def pronoun_for(name: str) -> str:
    """Subject pronoun used for later sentences of a biography about ``name``.

    A fixed spelling convention (first name ending in a vowel -> "She", otherwise
    "He") keeps pronouns consistent across every document about one person
    without adding a hidden attribute; it carries no information about any
    probed attribute, which are drawn independently of the name.
    """
    first = name.split(" ", 1)[0]
    return "She" if first[-1:].lower() in _VOWELS else "He"
