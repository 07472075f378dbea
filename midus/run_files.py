"""The files of a run directory (``runs/<experiment>/<version>/``) that the kit writes and reads.

Written by training (`midus.training.run_summary.RunSummary`, Lightning's config saver) and
the ablation runner; read by the ablation table, ``report`` and the analyses. A plain module,
so commands that only read run folders never import Lightning.

* ``config.yaml``: the resolved configuration of the run (`RUN_CONFIG`), saved by LightningCLI;
* ``arm_config.yaml``: an ablation arm's merged config, written by the runner (`ARM_CONFIG`);
* ``arm_command.yaml``: the ``python -m midus`` arguments the runner started the arm with
  (`ARM_COMMAND`); a rerun compares both files before it skips or resumes the arm;
* ``checkpoints/*.ckpt`` (`CHECKPOINT_DIR`): Lightning's ModelCheckpoint files;
* ``hparams.yaml`` (`HPARAMS_FILE`) and ``events.out.tfevents.*`` (`EVENTS_GLOB`): TensorBoard's;
* ``summary.json`` (`SUMMARY_FILE`): one per fit, the row an ablation table is built from::

    {
      "schema_version": 1,
      "run_dir": "runs/quickstart/ffn",
      "config_paths": ["experiments/quickstart.yaml"],
      "device": "cpu",
      "params": {"total": 912000, "trainable": 912000, "memory": 0, "added": 0},
      "val": {"loss": 3.49, "ppl": 32.8, "recall_acc": 0.99, "recall_acc_heldout": 0.51,
              "best_loss": 3.49},
      "memory_zeroed_delta": null,
      "memory_usage": null,
      "memory_engaged_step": null,
      "knowledge_bits": {"bits": 7261.0, "bits_replay": null, "bits_per_param": 0.0080,
                         "bits_per_added_param": null},
      "train": {"loss": 3.1, "steps": 500, "batches": 500, "tokens": 2048000, "tokens_per_sec": 10500.0,
                "mean_step_time_s": 0.39, "processes": 1, "accumulate_grad_batches": 1,
                "global_batch_tokens": 4096},
      "wall_time_s": 212.0,
      "peak_memory": {"bytes": 734003200, "kind": "cpu_max_rss"},
      "optimizer_state": {"bytes": 7296120, "tensors": 90},
      "timing": {"runs_at_a_time": 2, "torch_threads": 1, "cpu_cores": 2},
      "latency": {"prompt_tokens": 128, "new_tokens": 32, "prefill_ms": 4.1, "decode_ms_per_token": 1.9}
    }

* ``val.*`` are the last logged values (``None`` when never logged, e.g. the recall probe
  switched off); ``best_loss`` is the lowest ``val/loss`` of any validation after the sanity check.
* ``train.loss`` is the mean training loss over the batches between the last two validations
  (process 0's batches); ``val.loss`` minus it is the train/validation gap.
* ``train.tokens_per_sec`` counts training batches only: the time from ``on_train_batch_start``
  to ``on_train_batch_end`` (forward, backward, optimizer step), summed, excluding validation,
  checkpointing and logging between batches. Tokens are the predicted positions
  (``input_ids[:, 1:]``) of the batches trained, summed over processes; ``mean_step_time_s`` is
  per training batch; ``steps`` is the trainer's global step (optimizer steps). Counts and times
  cover the whole run across resumes. ``global_batch_tokens`` = tokens of one optimizer step
  (micro-batch x ``accumulate_grad_batches`` x ``processes``).
* ``memory_zeroed_delta`` (models with memory branches; else null): the final validation's
  ``memory/zeroed/…`` (`midus.training.memory_zeroed`): ``loss`` = validation loss increase in
  nats when every memory branch outputs zero, ``recall_acc``, ``recall_acc_heldout``, … = the
  recall lost, and the same per memory block under ``blocks.<block index>``.
* ``memory_usage`` (models with product-key memory; else null): the final validation's slot
  diagnostics, ``usage`` (share of slots read), ``kl_uniform`` (nats), ``entropy`` (of one
  query's k retrieval weights) and ``entropy_over_log_k``, as means over memory blocks and
  under ``blocks.<block index>`` (`midus.training.memory_health`).
* ``memory_engaged_step``: the first validation step at which zeroing the memory cost at least
  0.01 nats or 0.05 recall (`midus.training.memory_health`); null when it never did.
* ``params.added``: parameters an up-scaling added to its base (0 without one).
* ``knowledge_bits`` (embedded corpus with ``model.probes.knowledge_bits_people`` > 0; else null): the
  final validation's ``val/knowledge_bits``, bits of the main population's facts the model stores
  (`midus.probes.knowledge_bits`: scaled from the people scored to the whole population), as
  ``bits``; ``bits_replay`` the same for the replay population (null without replay);
  ``bits_per_param`` = ``bits`` / ``params.total``; ``bits_per_added_param`` = ``bits`` /
  ``params.added`` (null when nothing was added): all the model's bits, not the bits the added
  parameters brought (the ablation table's bits-above-control columns subtract a control run's).
* ``latency``: batch-1 greedy `generate` at fit end, best of 3: the prefill of a random prompt
  and the mean time per token decoded one at a time with the KV cache.
* ``wall_time_s`` spans ``on_fit_start`` to the end of training (``on_train_end``), validation
  included. The record is taken there, before Lightning's teardown moves a CUDA model to the CPU
  (a fit that trains no step, e.g. resumed from its final checkpoint, takes it at ``on_fit_end``).
* ``optimizer_state``: ``bytes`` = the sum of every tensor in the optimizers' state at the end of
  training (``trainer.optimizers[i].state``), ``tensors`` their number; exact for what the run
  built. AdamW keeps two moments per trainable parameter in the parameter's dtype (fp32: 8 bytes
  a parameter) and one ``step`` scalar per parameter tensor (fp32, 4 bytes), the same with the
  for-loop, foreach or fused implementation (fused keeps ``step`` on the device). Process 0's
  state: under DDP a full copy, under FSDP its shard (a DTensor counts its local shard).
* ``timing``: what the step times and latencies were measured under. ``runs_at_a_time`` = the
  ablation runner's ``jobs`` when it started the fit (up to that many runs shared the machine;
  `RUNS_AT_A_TIME_ENV`), null for a fit started otherwise; ``torch_threads`` =
  ``torch.get_num_threads()``; ``cpu_cores`` = the cores this process may run on.
* ``peak_memory.kind`` says what ``bytes`` is: ``cuda_max_allocated``
  (`torch.cuda.max_memory_allocated` since fit start: tensors only, no allocator cache) or
  ``cpu_max_rss`` (the process's peak resident set size, since the process started, so run one
  fit per process to compare runs; the ablation runner does).

New measurements go into a new key or section (readers use ``.get``); bump
``SCHEMA_VERSION`` only when the meaning of an existing key changes.
"""

from __future__ import annotations

from typing import Any

RUN_CONFIG = "config.yaml"
ARM_CONFIG = "arm_config.yaml"
ARM_COMMAND = "arm_command.yaml"
CHECKPOINT_DIR = "checkpoints"
HPARAMS_FILE = "hparams.yaml"
EVENTS_GLOB = "events.out.tfevents.*"
SUMMARY_FILE = "summary.json"
ABLATION_RECORD = "ablation.json"
"""In ``runs/<experiment>/``: the ablation's arms, seeds, reference arms and control arm, written with its tables."""
Control = str | dict[str, str]
"""``ablation.control`` (the YAML's, parsed by `midus.ablation.config`) and ``control`` of `ABLATION_RECORD`: one
control arm for every arm, or arm → its own control arm (arms not named have none), e.g. the un-continued base for
frozen arms and the continued one for trainable."""
RUNS_AT_A_TIME_ENV = "MIDUS_RUNS_AT_A_TIME"
"""Environment variable the ablation runner gives each fit: how many runs it starts at a time (``timing``)."""
SUMMARY_SCHEMA_VERSION = 1
SUMMARY_VAL_METRICS = (
    "val/loss", "val/ppl", "val/recall_acc", "val/recall_acc_heldout", "val/recall_acc_replay",
    "val/recall_acc_replay_heldout",
)
"""Logged metrics whose final values land under ``val`` of the summary, without the ``val/`` prefix."""


def run_label(arm: str, seed: int | None) -> str:
    """A run's folder below its experiment's, and its TensorBoard version: ``arm`` or ``arm/seed<k>``."""
    return arm if seed is None else f"{arm}/seed{seed}"


def value_at(record: dict[str, Any] | None, dotted: str) -> Any:
    """``record["a"]["b"]`` for ``"a.b"`` of a nested summary record, None where any part is missing."""
    value: Any = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
