"""A deterministic population of fictional people with independent attributes.

Each attribute value is drawn from the population's random stream *after* the
names, never computed from the name, so a fact about a person cannot be
inferred from their name: the model has to have stored it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from midus.data.corpus.names import NAME_SPACE_SIZE, name_from_index

ATTRIBUTES: tuple[str, ...] = (
    "birth_date",
    "birth_city",
    "university",
    "field",
    "employer",
    "hobby",
)

MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
# Days stop at 28 so every (day, month) pair is a real date; 50 birth years.
_DAYS = range(1, 29)
_YEARS = range(1950, 2000)

# Single common words: no value is a prefix of another value at a word
# boundary, none starts with punctuation, and each is a few BPE tokens at most.
_VALUES: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "Paris", "Lima", "Oslo", "Cairo", "Delhi", "Rome", "Tokyo", "Dublin",
        "Vienna", "Prague", "Lisbon", "Madrid", "Berlin", "Athens", "Moscow",
        "Seoul", "Sydney", "Toronto", "Boston", "Chicago", "Denver", "Austin",
        "Dallas", "Houston", "Miami", "Seattle", "Warsaw", "Munich", "Milan",
        "Naples",
    ),
    "university": (
        "Oxford", "Cambridge", "Harvard", "Yale", "Princeton", "Stanford",
        "Cornell", "Columbia", "Brown", "Duke", "Rice", "Emory", "Purdue",
        "Tufts", "Caltech", "Berkeley", "Durham", "Leeds", "Bristol", "Glasgow",
        "Edinburgh", "Warwick", "Exeter", "Toulouse",
    ),
    "field": (
        "physics", "chemistry", "biology", "history", "law", "medicine",
        "economics", "music", "art", "philosophy", "geology", "astronomy",
        "linguistics", "mathematics", "nursing", "architecture", "engineering",
        "psychology", "sociology", "literature", "botany", "zoology", "ecology",
        "statistics",
    ),
    "employer": (
        "Nimbus", "Orbit", "Vertex", "Falcon", "Summit", "Harbor", "Beacon",
        "Cobalt", "Granite", "Maple", "Atlas", "Zenith", "Quartz", "Nova",
        "Apex", "Pioneer", "Sterling", "Horizon", "Crescent", "Meridian",
        "Keystone", "Redwood", "Lumen", "Willow",
    ),
    "hobby": (
        "chess", "painting", "hiking", "cycling", "swimming", "gardening",
        "fishing", "knitting", "pottery", "rowing", "archery", "sailing",
        "skiing", "surfing", "climbing", "dancing", "baking", "juggling",
        "birdwatching", "photography", "tennis", "golf", "running", "cooking",
    ),
}


@dataclass(frozen=True)
class Person:
    """One fictional person: a unique syllable-built name and their facts.

    ``attributes`` maps every name in :data:`ATTRIBUTES` to a value string
    (``birth_date`` like ``"12 March 1987"``, the others from fixed value lists).
    It is excluded from hashing because dicts are unhashable.
    """

    name: str
    attributes: dict[str, str] = field(hash=False)


@lru_cache(maxsize=None)
def value_choices(attribute: str) -> tuple[str, ...]:
    """All candidate values of ``attribute`` (uniformly sampled; used for chance level)."""
    if attribute == "birth_date":
        return tuple(f"{d} {m} {y}" for y in _YEARS for m in MONTHS for d in _DAYS)
    if attribute not in _VALUES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    return _VALUES[attribute]


def _draw_value(rng: random.Random, attribute: str) -> str:
    """Draw one value uniformly; dates are drawn part-wise to avoid a 16800-way list."""
    if attribute == "birth_date":
        return f"{rng.choice(_DAYS)} {rng.choice(MONTHS)} {rng.choice(_YEARS)}"
    return rng.choice(_VALUES[attribute])


def generate_population(seed: int, size: int) -> list[Person]:
    """Generate ``size`` people deterministically from ``seed``.

    Names are unique within the population (indices are sampled without
    replacement from a name space of ``NAME_SPACE_SIZE`` ~ 2.4e8), so two
    populations from different seeds share a name only with negligible
    probability. Attribute values are drawn independently and uniformly from
    the same seeded stream, after all names, so they carry no name information.

    Raises:
        ValueError: if ``size`` is < 1 or larger than the name space.
    """
    if not 1 <= size <= NAME_SPACE_SIZE:
        raise ValueError(f"size must be in [1, {NAME_SPACE_SIZE}], got {size}")
    # A string seed is hashed with SHA-512 by random.seed, so it is stable
    # across processes (unlike hash()) and namespaced away from other streams.
    # The seed string is part of the corpus definition (it predates the move to midus.data): keep it.
    rng = random.Random(f"midus.corpus.population:{seed}")
    # random.sample over a range does not materialise the range.
    indices = rng.sample(range(NAME_SPACE_SIZE), size)
    names = [name_from_index(i) for i in indices]
    return [
        Person(name=name, attributes={a: _draw_value(rng, a) for a in ATTRIBUTES})
        for name in names
    ]
