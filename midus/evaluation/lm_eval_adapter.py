"""A kit checkpoint as an lm-evaluation-harness model (``lm_eval``), scored with its own tokenizer.

`MidusEvalLM` is registered with the harness as ``midus``; once this module is imported,
``lm_eval.simple_evaluate(model="midus", model_args="checkpoint=<ckpt>", tasks=[...])`` works
like any built-in model. ``python -m midus lm-eval`` (`midus.evaluation.lm_eval_command`)
is the command-line front end.

Texts become ids as the harness's own Hugging Face model (``hf``, `lm_eval.models.huggingface.HFLM`)
makes them, so a kit checkpoint and its Hugging Face export score alike: the tokenizer frames
contexts and rolling-perplexity texts with its special tokens (Llama-3's BOS), an empty
context and every rolling window start from `prefix_token_id` (BOS, else EOS), and
`add_bos_token` overrides the framing as HFLM's does.

The kit's model has no attention mask, so batches are right-padded: the model is causal, so
padding after a sequence never changes the logits at its real positions, which are the only
ones read. Contexts longer than `max_length` (by default the model's context, `model_context`)
are cut from the left, as HFLM does.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from midus.checkpoint.context import DEFAULT_CONTEXT, model_context, trained_block_size
from midus.model.transformer import MidusLM

try:
    # Fills the harness's table of built-in models before "midus" joins it (see MidusEvalLM).
    importlib.import_module("lm_eval.models")
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the kit without its [eval] extra: MidusEvalLM() and the lm-eval command say how to get it
    TemplateLM = object  # type: ignore[assignment,misc]

    def register_model(*names: str):  # type: ignore[no-redef]
        return lambda cls: cls

__all__ = ["MidusEvalLM", "require_lm_eval"]

INSTALL_HINT = 'the lm-evaluation-harness is not installed: pip install "midus[eval]" (or pip install lm_eval)'


def require_lm_eval() -> None:
    """Raise ImportError with the install command when ``lm_eval`` is missing."""
    try:
        importlib.import_module("lm_eval.api.model")
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from None

DTYPES = {"float32": torch.float32, "auto": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_LENGTH = DEFAULT_CONTEXT
"""Context limit when neither `max_length` nor the model's context is known (HFLM's default too)."""
DEFAULT_BATCH_SIZE = 8


# The harness imports lm_eval.models (its lazy table of built-in models) only while its model
# registry is empty; registering first would hide "hf" and the others, hence the import above.
@register_model("midus")
class MidusEvalLM(TemplateLM):
    """The harness's view of a `MidusLM`: log-likelihoods, rolling perplexity, greedy generation.

    Args:
        checkpoint: a kit ``.ckpt`` written by ``fit`` (or pass `model` and `tokenizer` instead).
        tokenizer: a tokenizer, a ``save_pretrained`` directory or a kit ``.ckpt`` holding one;
            needed only for checkpoints older than the kit's stored tokenizer.
        model: an in-memory model (instead of `checkpoint`).
        batch_size: sequences per forward pass (``auto`` from the harness CLI means 8).
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: ``float32`` (also ``auto``: kit checkpoints hold float32 weights), ``bfloat16`` or
            ``float16``; log-probabilities are taken in float32 either way.
        max_length: context limit in tokens; 0 means the model's context (`model_context`).
        max_gen_toks: default generation length when a task does not set one.
        max_batch_size: accepted because the harness passes it; unused.
        add_bos_token: None frames texts as the tokenizer does (its BOS, if any); True / False
            forces ``add_special_tokens`` on or off, as HFLM's ``add_bos_token`` does.
        prefix_token_id: the token an empty context and each rolling window start from;
            None means BOS, else EOS (HFLM's rule).
    """

    def __init__(
        self,
        checkpoint: str = "",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        model: MidusLM | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | None = "cpu",
        dtype: str = "float32",
        max_length: int = 0,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
    ) -> None:
        require_lm_eval()
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype: one of {sorted(DTYPES)}, got {dtype!r}")
        trained_length, self.checkpoint = 0, checkpoint
        if model is None:
            model, tokenizer, trained_length = _load(checkpoint, tokenizer)
        elif isinstance(tokenizer, (str, Path)) or tokenizer is None:
            raise ValueError("tokenizer: pass the tokenizer object along with an in-memory model")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: it has no end-of-text token (eos), which the harness needs as a prefix")
        self.tokenizer = tokenizer
        self._device = torch.device(device or "cpu")
        self.model = model.to(self._device, DTYPES[dtype]).eval()
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.max_length = int(max_length) or model_context(self.model.config, trained_length)
        self.max_gen_toks = int(max_gen_toks)
        # The harness's "auto" / "auto:N" probes GPU memory with HF models; a fixed size here.
        self.batch_size = (
            DEFAULT_BATCH_SIZE if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        )
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {self.max_length}")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context and a rolling window start from (HFLM.prefix_token_id): a given
        # id, else BOS for tokenizers that have one (imported Llama-style), else end-of-text,
        # which separates documents in training.
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "midus")

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by the harness under ``config`` in its results."""
        return {
            "checkpoint": str(self.checkpoint),
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "max_length": self.max_length,
            "add_bos_token": self.add_bos_token,
            "prefix_token_id": self.prefix_token_id,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids of `string` as HFLM.tok_encode makes them (lm_eval 0.4.13, models/huggingface.py).

        An explicit `add_special_tokens` wins; else `add_bos_token` when set; else the
        tokenizer's own framing (Llama-3: BOS first), which is also how packing frames training
        documents (`midus.data.framing`). A string that already starts with the prefix token's
        text is not framed again. Like HFLM, a trailing EOS a template appends is kept here:
        equal scores with the harness matter more than the training stream's one-EOS rule.
        """
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else bool(self.add_bos_token)
            if string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        # As HFLM.tok_decode: special tokens (a generated EOS, a BOS) are not text.
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
            # The last token is only predicted, never fed; the context is cut from the left.
            rows.append(((context + continuation)[-(self.max_length + 1) :][:-1], continuation))
        # Longest first, so each batch pads little and the first batch shows any memory problem.
        order = sorted(range(len(rows)), key=lambda index: -len(rows[index][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(rows[batch[0]][0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, index in enumerate(batch):
                tokens = rows[index][0]
                ids[row, : len(tokens)] = torch.tensor(tokens)
            logits = self.model(ids.to(self._device))
            for row, index in enumerate(batch):
                inputs, continuation = rows[index]
                # Positions len-k .. len-1 predict the k continuation tokens.
                scores = F.log_softmax(logits[row, len(inputs) - len(continuation) : len(inputs)].float(), dim=-1)
                targets = torch.tensor(continuation, device=scores.device)
                logprob = scores.gather(1, targets[:, None]).sum().item()
                answer = (logprob, bool((scores.argmax(dim=-1) == targets).all()))
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in windows of `max_length`, each token predicted once."""
        totals = []
        for request in requests:
            (text,) = request.args[:1]
            windows = [
                (None, *make_disjoint_window(window))
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first of the request's ``until`` strings."""
        outputs = []
        for request in requests:
            context, options = request.args[0], dict(request.args[1] or {})
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            until = handle_stop_sequences(options.get("until"), eos=eos)
            max_new = int(options.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :] or [self.prefix_token_id]
            text = self._greedy(ids, max_new, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return outputs

    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        # The model's own generate has no stop strings: step with a KV cache and stop as soon
        # as one appears, instead of always paying for max_new tokens.
        cache = self.model.new_cache(1, len(ids) + max_new)
        logits = self.model(torch.tensor([ids], device=self._device), cache, 0)[:, -1]
        generated: list[int] = []
        text = ""
        for step in range(max_new):
            token = int(logits.argmax(dim=-1))
            if token == self.eot_token_id:
                break
            generated.append(token)
            text = self.tok_decode(generated)
            if any(stop in text for stop in until):
                break
            logits = self.model(torch.tensor([[token]], device=self._device), cache, len(ids) + step)[:, -1]
        for stop in until:
            text = text.split(stop)[0]
        return text


def _load(checkpoint: str, tokenizer: Any) -> tuple[MidusLM, PreTrainedTokenizerBase, int]:
    """Model, tokenizer and training block size (0 if unknown) of a kit checkpoint."""
    from midus.checkpoint.kit import checkpoint_tokenizer, model_from_checkpoint, read_kit_checkpoint
    from midus.data.tokenizers import load_tokenizer_dir

    if not checkpoint:
        raise ValueError("checkpoint: give a kit .ckpt written by fit (model_args checkpoint=<path>)")
    stored = read_kit_checkpoint(checkpoint, "checkpoint")
    model = model_from_checkpoint(stored, checkpoint, "checkpoint")
    if tokenizer is None or tokenizer == "":
        tokenizer = checkpoint_tokenizer(stored)
        if tokenizer is None:
            raise ValueError(
                f"checkpoint: {checkpoint!r} stores no tokenizer (written before the kit kept one); give "
                "tokenizer=<dir> (--tokenizer), the save_pretrained directory it was trained with, "
                "e.g. data/tokenizers/<key>"
            )
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer_dir(tokenizer, "tokenizer")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer: it has {len(tokenizer)} tokens but the checkpoint's model only {model.config.vocab_size}; "
            "give the tokenizer the checkpoint was trained with"
        )
    return model, tokenizer, trained_block_size(stored)
