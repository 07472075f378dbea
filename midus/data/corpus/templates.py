"""Sentence templates that render one fact as one short sentence.

Templates are ``str.format`` strings with ``{name}`` (the subject: the full name,
or a pronoun in later sentences of a biography) and ``{value}`` (the attribute
value). Each attribute has TRAIN templates, used in training documents, and
HELD-OUT templates whose phrasing never occurs in training, so validation loss
and the recall probe on held-out prompts measure stored facts rather than
memorised sentences.

Conventions (checked by the tests):

* every held-out template starts with the name (``"{name} "`` or ``"{name}'s "``), its
  connecting phrase (between the name and the value) occurs in no train template, and
  every word of it occurs in some train template;
* at least two train and two held-out templates per attribute end with
  ``"{value}."``, so :func:`probe_prefix` can turn them into recall prompts;
* a template starts with ``{value}`` only for capitalised (proper-noun)
  values, so rendered sentences never start in lower case;
* a pronoun may replace the name only in templates starting with ``"{name} "``
  (the name used as a sentence-initial subject, not as a possessive).
"""

from __future__ import annotations

TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "{name}'s date of birth is {value}.",
        "On {value}, {name} was born.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} grew up in {value}.",
        "{name}'s hometown is {value}.",
        "{value} is the birthplace of {name}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} attended {value}.",
        "{value} is where {name} earned a degree.",
    ),
    "field": (
        "{name} majored in {value}.",
        "{name} specialized in {value}.",
        "{name}'s field is {value}.",
        "{name} chose {value} as a major.",
    ),
    "employer": (
        "{name} worked for {value}.",
        "{name} was employed by {value}.",
        "{name} took a job at {value}.",
        "{value} hired {name}.",
    ),
    "hobby": (
        "{name} enjoys {value}.",
        "{name} likes {value}.",
        "{name}'s hobby is {value}.",
        "{name} does {value} for fun.",
    ),
}

HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # New sentence structures built only from words that training text uses, so held-out
    # loss measures facts in unseen phrasing, not the cost of never-seen vocabulary.
    "birth_date": (
        "{name} was born into the world on {value}.",
        "{name}'s birth date is {value}.",
    ),
    "birth_city": (
        "{name}'s birthplace is {value}.",
        "{name} came into the world in {value}.",
    ),
    "university": (
        "{name} earned a degree at {value}.",
        "{name}'s degree is from {value}.",
    ),
    "field": (
        "{name}'s major is {value}.",
        "{name} majored in the field of {value}.",
    ),
    "employer": (
        "{name} was hired by {value}.",
        "{name}'s job is at {value}.",
    ),
    "hobby": (
        "{name} likes the hobby of {value}.",
        "{name} does the hobby of {value}.",
    ),
}


def allows_pronoun(template: str) -> bool:
    """Whether the name in ``template`` may be replaced by a subject pronoun."""
    return template.startswith("{name} ")


def render(template: str, subject: str, value: str) -> str:
    """Render ``template`` with ``subject`` (name or pronoun) and ``value``."""
    return template.format(name=subject, value=value)


def probe_prefix(template: str) -> str | None:
    """The template text before ``{value}`` if the value ends the sentence, else None.

    A final period after ``{value}`` is allowed and dropped; the returned prefix
    has no trailing space (e.g. ``"{name} was born in"``), so a prompt rendered
    from it is completed by ``" " + value``.
    """
    body = template[:-1] if template.endswith(".") else template
    if not body.endswith(" {value}") or body.count("{value}") != 1:
        return None
    return body[: -len(" {value}")]


def probe_templates(family: dict[str, tuple[str, ...]], attribute: str) -> tuple[str, ...]:
    """The templates of ``family`` for ``attribute`` that can yield a probe prompt."""
    return tuple(t for t in family[attribute] if probe_prefix(t) is not None)
