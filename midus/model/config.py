"""The one dataclass that describes a kit model, layer by layer.

A model is a stack of blocks. Each block has a *kind* (a Transformer block, or a MIDUS
memory block) and a *residual branch* chosen by name from `midus.model.branches`. `layers` lists
them explicitly; when it is empty, the model is `n_layers` Transformer blocks that carry
`branch`, except the indices in `memory_layers`, which are memory blocks carrying
`memory_branch`. Validation happens in `__post_init__`, so a bad YAML fails before anything
is built or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from midus.model.memory_config import MemoryConfig

if TYPE_CHECKING:
    from midus.model.branches.registry import Branch

BlockKind = Literal["transformer", "memory"]


@dataclass
class LayerSpec:
    """What one layer of the stack is."""

    block: BlockKind = "transformer"
    """Block kind: ``transformer`` = x + Attn(norm x), then x + branch(norm x);
    ``memory`` = x + branch(Attn'(norm x)), Attn' without output projection (MIDUS)."""
    branch: str = "ffn"
    """Residual branch by registered name (see ``midus.model.branches.available_branches()``)."""


@dataclass
class ModelConfig:
    """A Llama-style decoder, described per layer.

    Derived values (`head_dim`, `kv_heads`, `ffn_width`, the per-layer `stack`) are properties;
    every constraint is checked in `__post_init__` with an error that names the field.
    """

    vocab_size: int = 0
    """Vocabulary size. Linked from the data module's tokenizer by the CLI; never typed twice."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of blocks when `layers` is empty (ignored otherwise: `layers` sets the depth)."""
    n_heads: int = 4
    """Attention (query) heads; must divide `d_model` unless `head_width` is set."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; must divide `n_heads`. 0 means `n_heads`."""
    head_width: int = 0
    """Width of one attention head (Hugging Face's head_dim); 0 means d_model / n_heads. Other
    values decouple the attention width n_heads · head_width from d_model (Qwen3-0.6B: 16 heads
    of 128 on d_model 1024). Set by the Hugging Face import. A memory block on decoupled heads
    feeds its branch the heads a_1 … a_H (n_heads · head_width wide), and the branch writes back
    d_model: HML with ``memory.combine: sum``, PKM and multi-head PKM (their query projections
    read the heads' width); see `branch_input_width`."""
    ffn_hidden: int = 0
    """Hidden width of the SwiGLU FFN. 0 means Llama's rule: 8/3 · d_model rounded up to 64."""
    branch: str = "ffn"
    """Residual branch of every Transformer block when `layers` is empty."""
    memory_layers: list[int] = field(default_factory=list)
    """Indices (0-based, < n_layers) that are memory blocks instead of Transformer blocks."""
    memory_branch: str = "hml"
    """Residual branch of the memory blocks placed by `memory_layers`."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Product-key memory settings shared by every memory branch and memory block."""
    layers: list[LayerSpec] = field(default_factory=list)
    """Explicit per-layer block kind and branch; empty means `n_layers` layers built from
    `branch`, `memory_layers` and `memory_branch`."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    rope_scaling: dict[str, float] = field(default_factory=dict)
    """Llama-3 style frequency scaling (keys: factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings); empty means none. Set by the Hugging Face import."""
    context_length: int = 0
    """Positions the model was pretrained to read (a Hugging Face config's max_position_embeddings,
    set by the import and written back by the export); 0: not stated (a kit model reads what it was
    trained on, its data.block_size). Rotary positions need no table: this only informs evaluation."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2 has it)."""
    attn_out_bias: bool = False
    """Bias on the attention output projection."""
    qk_norm: bool = False
    """RMSNorm (own gain per layer, eps `norm_eps`) over each head's query and key, before the
    rotary embedding (Qwen3 has it); a memory block's attention gets the norms too."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""

    def __post_init__(self) -> None:
        # Fields keep what the user wrote (0 and [] mean "derive"): jsonargparse reads the
        # defaults of a config instance back from its fields, so filling them in here would
        # turn derived values into fixed defaults (a later n_layers override would be ignored).
        # Derived values are the properties below.
        self.layers = [LayerSpec(**spec) if isinstance(spec, dict) else spec for spec in self.layers]
        if isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        self.validate()

    @property
    def head_dim(self) -> int:
        """Resolved width of one attention head (`head_width`, or d_model / n_heads when 0)."""
        return self.head_width or self.d_model // self.n_heads

    @property
    def attention_width(self) -> int:
        """Width of the concatenated query heads, n_heads · head_dim (d_model unless `head_width` is set)."""
        return self.n_heads * self.head_dim

    def branch_input_width(self, layer_index: int) -> int:
        """Width of what layer `layer_index`'s residual branch reads.

        A Transformer block's branch reads norm(x), d_model wide. A memory block's branch reads
        Attn'(norm x): the heads a_1 … a_H concatenated, n_heads · head_dim wide (d_model when the
        heads are coupled), or d_model when ``memory.attn_output_projection`` keeps W_O. Branches
        whose input passes through a projection (PKM's query, the FFN) size it by this.
        """
        if self.stack[layer_index].block == "memory" and not self.memory.attn_output_projection:
            return self.attention_width
        return self.d_model

    @property
    def kv_heads(self) -> int:
        """Resolved key/value head count (`n_kv_heads`, or `n_heads` when 0)."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_width(self) -> int:
        """Resolved SwiGLU hidden width (`ffn_hidden`, or Llama's 8/3 · d_model rounded up to 64)."""
        return self.ffn_hidden or 64 * -(-int(8 * self.d_model / 3) // 64)

    @property
    def stack(self) -> list[LayerSpec]:
        """The resolved layers: `layers` if given, else `n_layers` built from the branch fields."""
        if self.layers:
            return list(self.layers)
        return [
            LayerSpec("memory", self.memory_branch) if index in self.memory_layers
            else LayerSpec("transformer", self.branch)
            for index in range(self.n_layers)
        ]

    @property
    def depth(self) -> int:
        """Number of blocks in the resolved stack."""
        return len(self.stack)

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"model config: {message}")

        need(self.d_model > 0, f"d_model must be positive, got {self.d_model}")
        need(self.n_heads > 0, f"n_heads must be positive, got {self.n_heads}")
        need(self.head_width >= 0, f"head_width must be 0 (= d_model/n_heads) or positive, got {self.head_width}")
        if self.head_width:
            need(self.head_width % 2 == 0, f"head_width={self.head_width} must be even for rotary embeddings")
        else:
            need(
                self.d_model % self.n_heads == 0,
                f"n_heads={self.n_heads} must divide d_model={self.d_model}",
            )
            need(
                self.head_dim % 2 == 0, f"head_dim=d_model/n_heads={self.head_dim} must be even for rotary embeddings"
            )
        need(self.n_kv_heads >= 0, f"n_kv_heads must be 0 (= n_heads) or positive, got {self.n_kv_heads}")
        need(
            self.n_heads % self.kv_heads == 0,
            f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}",
        )
        need(self.ffn_hidden >= 0, f"ffn_hidden must be 0 (= Llama's rule) or positive, got {self.ffn_hidden}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        self.memory.validate(self.d_model, self.n_heads)
        if not self.layers:
            need(self.n_layers > 0, f"n_layers must be positive (or list `layers`), got {self.n_layers}")
            _require_branch(self.branch, "branch")
            _require_branch(self.memory_branch, "memory_branch")
            for position, index in enumerate(self.memory_layers):
                need(
                    0 <= index < self.n_layers,
                    f"memory_layers[{position}]={index} is not a layer index; the model has "
                    f"n_layers={self.n_layers} layers (0..{self.n_layers - 1})",
                )
        elif self.memory_layers:
            need(False, "memory_layers places memory blocks in a stack built from n_layers; with an explicit "
                 "`layers` list, set block: memory on those entries instead")
        for index, spec in enumerate(self.stack):
            need(
                spec.block in ("transformer", "memory"),
                f"layers[{index}].block={spec.block!r} is not a known block kind; expected 'transformer' or 'memory'",
            )
            branch_class = _require_branch(spec.branch, f"layers[{index}].branch")
            need(
                spec.block == "memory" or not branch_class.reads_attention_heads,
                f"layers[{index}].branch={spec.branch!r} queries with the attention heads' outputs, which only a "
                "memory block provides; use block: memory (or memory_layers) for it",
            )
            if branch_class.is_product_key_memory:
                # Each query splits into memory.n_subspaces equal parts: HML's queries are the heads, PKM's
                # the learned projections.
                width, width_field = ((self.head_dim, "head_dim") if branch_class.reads_attention_heads
                                      else (self.memory.query_dim(self.d_model), "memory.pkm_query_dim"))
                reason = self.memory.subspaces_error(width, width_field)
                need(reason is None, f"layers[{index}].branch={spec.branch!r}: {reason}")
            if spec.block == "memory" and self.attention_width != self.d_model:
                # Decoupled heads (Qwen3-0.6B): Attn' gives n_heads · head_dim channels, the residual
                # stream has d_model. The branch must read the former and write the latter; the
                # branch class says whether (and under which memory settings) it does.
                if self.memory.internal_residual:
                    reason = ("memory.internal_residual=true adds x (d_model wide) to the heads a_1 … a_H; set "
                              "memory.internal_residual: false")
                else:
                    reason = branch_class.decoupled_heads_error(self.memory)
                need(
                    reason is None,
                    f"layers[{index}] is a memory block, which needs n_heads · head_dim = d_model; got n_heads="
                    f"{self.n_heads} · head_width={self.head_width} = {self.attention_width} != d_model="
                    f"{self.d_model} (decoupled heads), which layers[{index}].branch={spec.branch!r} cannot read "
                    f"as set: {reason}",
                )
        hml_blocks = self.hml_memory_layers()
        need(
            not self.memory.head_topk or len(self.memory.head_topk) == len(hml_blocks),
            f"memory.head_topk has {len(self.memory.head_topk)} rows; expected one per HML memory block "
            f"({len(hml_blocks)}: layers {hml_blocks}), or none for every head at memory.topk",
        )

    def hml_memory_layers(self) -> list[int]:
        """Indices of the memory blocks carrying ``hml``: the rows of ``memory.head_topk``, in order."""
        return [index for index, spec in enumerate(self.stack) if spec.block == "memory" and spec.branch == "hml"]

    def require_vocab(self) -> None:
        """Building a model needs a vocabulary; the CLI links it from the tokenizer."""
        if self.vocab_size <= 0:
            raise ValueError(
                "model config: vocab_size must be positive (got "
                f"{self.vocab_size}); the CLI links it from data.vocab_size, set it when building by hand"
            )


def _require_branch(name: str, field_name: str) -> type[Branch]:
    # Imported on use: importing the registry imports every branch file, and those import this
    # module for the config type, so a module-level import here would run before ModelConfig exists.
    from midus.model.branches.registry import available_branches, branch_class

    known = available_branches()
    if name not in known:
        raise ValueError(
            f"model config: {field_name}={name!r} is not a registered branch; expected one of {sorted(known)}"
        )
    return branch_class(name)
