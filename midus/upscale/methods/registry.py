"""Up-scaling methods by name: the values of ``model.upscale.method``.

A method is a *plan builder*: a function ``(base: MidusLM, settings: UpscaleConfig) -> Plan`` that
checks the settings it reads (errors name the ``model.upscale.*`` field) and says, for every block
of the deeper model, where its weights come from (`midus.upscale.plan`). It builds nothing itself:
`midus.upscale.surgery.upscale` turns the plan into a model. ``none`` (load the base, up-scale
nothing) is the one value that is not a method.

Adding a method is one new file in this package with a ``@register_upscale("name")`` function,
plus one import line in ``midus/upscale/methods/__init__.py``; `UpscaleConfig.method` accepts
it from then on (list it in that field's docstring, which ``--help`` shows).

This module imports nothing of the kit's config: `UpscaleConfig` checks method names against it,
and the method files import the config, so the registry sits below both. Its table is full
whenever this module is importable: importing it runs the package's ``__init__`` first, which
imports every method file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from midus.upscale.plan import Plan

NO_UPSCALING = "none"
"""The ``model.upscale.method`` that loads the base and leaves it as it is (the control arm)."""

PlanBuilder = Callable[[Any, Any], Plan]
"""(base: MidusLM, settings: UpscaleConfig) -> Plan."""


@dataclass(frozen=True)
class UpscaleMethod:
    """A registered method: its plan builder and what it promises."""

    name: str
    build_plan: PlanBuilder
    identity_at_insertion: bool
    """Under its default settings the deeper model computes exactly the base's function
    (tests/test_upscale.py checks it for every method that claims it)."""


_METHODS: dict[str, UpscaleMethod] = {}


def register_upscale(name: str, *, identity_at_insertion: bool) -> Callable[[PlanBuilder], PlanBuilder]:
    """Function decorator: make a plan builder selectable as ``model.upscale.method: <name>``."""

    def add(build_plan: PlanBuilder) -> PlanBuilder:
        if name == NO_UPSCALING:
            raise ValueError(f"up-scaling method name {name!r} is reserved for loading the base unchanged")
        known = _METHODS.get(name)
        if known is not None and known.build_plan is not build_plan:
            raise ValueError(
                f"up-scaling method {name!r} is registered twice ({known.build_plan.__name__}, {build_plan.__name__})"
            )
        _METHODS[name] = UpscaleMethod(name, build_plan, identity_at_insertion)
        return build_plan

    return add


def method_names() -> tuple[str, ...]:
    """Values `UpscaleConfig.method` accepts: ``none`` first, then every method in registration order."""
    return (NO_UPSCALING, *_METHODS)


def registered_methods() -> tuple[UpscaleMethod, ...]:
    """Every registered method (``none`` is not one)."""
    return tuple(_METHODS.values())


def check_method_name(name: str) -> None:
    """Raises ValueError naming ``model.upscale.method`` and the accepted names, unless `name` is one."""
    if name != NO_UPSCALING and name not in _METHODS:
        raise ValueError(
            f"model.upscale.method={name!r} is not a registered up-scaling method; expected one of "
            f"{', '.join(method_names())}"
        )


def upscale_method(name: str) -> UpscaleMethod:
    """The method registered as `name`.

    Raises:
        ValueError: no method has that name (``none`` included: it builds no plan).
    """
    check_method_name(name)
    if name == NO_UPSCALING:
        raise ValueError(f"model.upscale.method={NO_UPSCALING!r} builds no plan: the base is used as it is")
    return _METHODS[name]
