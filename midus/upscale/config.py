"""What an up-scaling run does: the `model.upscale` section, and the methods its ``method`` names.

A method is a *plan builder*: a function ``(base: MidusLM, settings: UpscaleConfig) -> Plan`` that
checks the settings it reads (errors name the ``model.upscale.*`` field) and says, for every block
of the deeper model, where its weights come from (`midus.upscale.plan`). It builds nothing itself:
`midus.upscale.surgery.upscale` turns the plan into a model. ``none`` (load the base, up-scale
nothing) is the one value that is not a method.

Adding a method is one new file in `midus.upscale.methods` with a ``@register_upscale("name")``
function, plus one import line in ``midus/upscale/methods/__init__.py``; `UpscaleConfig.method`
accepts it from then on (list it in that field's docstring, which ``--help`` shows). The method
files import this module (the config type and the decorator). The table is full whenever this
module is importable: importing it runs the ``midus.upscale`` package's ``__init__`` first, which
imports this module and then every method file, before anything can construct an `UpscaleConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from midus.model.memory_config import MemoryConfig
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


@dataclass
class UpscaleConfig:
    """Make a trained base deeper, then continue training it (method notes §1–2).

    ``dus_solar`` stacks two copies and drops `drop` blocks at the seam; ``dus_interleave``
    inserts a copy of a block after it with zeroed attention output and FFN down
    projections (LLaMA Pro: identical function); ``dus_top`` appends copies of the last
    `top_blocks` blocks; ``midus`` inserts memory blocks carrying `branch`. ``none`` only
    loads the base (the "continue without up-scaling" control). Each method is one file of
    `midus.upscale.methods`, registered by name.
    """

    base_checkpoint: str = ""
    """The base: a ``.ckpt`` written by the kit's ``fit``, or a local Hugging Face Llama-family directory."""
    base_made_by: str = ""
    """The command that writes `base_checkpoint`, quoted in the error when the file is missing."""
    method: str = "none"
    """Up-scaling method by registered name: ``none``, ``dus_solar``, ``dus_interleave``, ``dus_top`` or ``midus``."""
    every: int = 0
    """Interleaved methods: insert after every `every`-th base block (after blocks every-1, 2·every-1, …)."""
    positions: list[int] = field(default_factory=list)
    """Interleaved methods: insert after these base block indices instead of `every`."""
    drop: int = 0
    """``dus_solar``: blocks dropped at the seam from each copy (m; 32 → 48 blocks for m = 8)."""
    top_blocks: int = 0
    """``dus_top``: how many of the last base blocks are copied on top."""
    zero_init_copies: bool = True
    """``dus_top``: zero the copies' attention output and FFN down projections (identity at insertion)."""
    branch: str = "hml"
    """``midus``: the memory blocks' branch (``hml``, ``pkm``, ``multihead_pkm``, …)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """``midus``: product-key memory settings of the inserted blocks (values start at zero by default)."""
    attn_init: Literal["copy", "random"] = "copy"
    """``midus``: start a memory block's attention (and its norm) as a copy of the block it follows, or random."""
    memory_allocation: Literal["uniform", "head_importance"] = "uniform"
    """``midus`` with ``branch: hml``: how each memory block shares its reads among heads. ``uniform``:
    `memory.topk` per head (or `memory.head_topk` as given); ``head_importance``: before the surgery,
    each base block's attention heads are scored (`importance_score`) on the first
    `importance_batches` training batches, and each memory block's head h, a copy of head h of the
    block it follows (``attn_init: copy``), reads k_h ∝ that score, 1..n_subkeys, Σ k_h = n_heads ·
    topk: the same parameters and reads as uniform (`midus.upscale.head_allocation`; written into
    `memory.head_topk` of the model config, logged and stored in the checkpoint)."""
    importance_score: Literal["grad_x_act", "loss_increase"] = "grad_x_act"
    """``memory_allocation: head_importance``: ``grad_x_act``, |d loss / d head gate| (Michel et al. 2019;
    one forward and backward pass per batch), or ``loss_increase``, the loss with the head's output
    removed minus the baseline (one forward pass per head, block and batch; negative counts as 0)."""
    importance_batches: int = 4
    """``memory_allocation: head_importance``: training batches (the first ones, in the stored order, not
    the shuffled one; the validation split stays unseen) the base is scored on."""
    allow_adjacent_memory: bool = False
    """Permit two memory blocks in a row (the paper never places them so)."""
    trainable: Literal["all", "new", "new_and_norms"] = "all"
    """What trains: everything, only the inserted blocks (LLaMA Pro), or those plus every RMSNorm."""

    def __post_init__(self) -> None:
        check_method_name(self.method)  # the table is full: see the module docstring
        if isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        if self.importance_batches < 1:
            raise ValueError(f"model.upscale.importance_batches must be positive, got {self.importance_batches}")

    @property
    def enabled(self) -> bool:
        """Whether a base is loaded at all."""
        return bool(self.base_checkpoint) or self.method != "none"
