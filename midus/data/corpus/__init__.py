"""The embedded default corpus: deterministic biographies of fictional people.

Generated from a seed, no download. Training text renders each person's facts
with train templates; validation text renders the same facts with held-out
templates; the recall probe asks for each fact with a completion prompt.
"""

from midus.data.corpus.biographies import (
    BiographyCorpus,
    RecallItem,
)
from midus.data.corpus.population import ATTRIBUTES, Person, generate_population, value_choices

__all__ = [
    "ATTRIBUTES",
    "BiographyCorpus",
    "Person",
    "RecallItem",
    "generate_population",
    "value_choices",
]
