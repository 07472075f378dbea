"""``python -m midus lm-eval``: zero-shot evaluation of a kit checkpoint with the lm-evaluation-harness.

    python -m midus lm-eval --ckpt_path runs/<exp>/<arm>/checkpoints/last.ckpt --tasks arc_easy,piqa
    python -m midus lm-eval --ckpt_path <ckpt> --include_path tests/data/lm_eval_task \\
        --tasks midus_letter_successor

Prints the harness's results table and writes its results JSON (default
``<run dir>/lm_eval/results.json``, the run directory being the folder above ``checkpoints/``).
Bad input (an unknown task, a task YAML or JSON-lines data file under ``--include_path`` that
does not parse, a hub task whose dataset is neither cached nor downloadable, a missing
checkpoint) is one ``error:`` line and exit status 2, reported before the model is loaded or
anything is written: the harness itself skips a task YAML it cannot read with only a debug log
line, which would surface later as a confusing "unknown task", and an offline hub task would
end in a ConnectionError traceback after the model had loaded.
"""

from __future__ import annotations

import argparse
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _TaskYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: 4x faster when present
    """Safe loading that accepts the harness's tags (``!function utils.doc_to_text``) as plain
    strings: only the structure is checked here; the harness resolves the functions itself."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {getattr(node, 'value', '')}")


@dataclass
class LocalEntry:
    """A task, group or tag defined by the YAML files under ``--include_path``."""

    kind: str  # "task", "group" or "tag"
    path: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)


def _read_task_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task YAML with its ``include:`` files merged under it, as the harness merges them."""
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error).replace("\n", " ")
        raise ValueError(f"--include_path: task file {str(path)!r} does not parse{where}: {reason}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"--include_path: task file {str(path)!r} is not a mapping of task settings (got {type(config).__name__})"
        )
    includes = config.pop("include", None) or []
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        target = (path.parent / str(include)).resolve()
        if not target.is_file() or target in seen:
            raise ValueError(f"--include_path: {str(path)!r} includes {include!r}, which is missing or includes itself")
        merged.update({k: v for k, v in _read_task_yaml(target, (*seen, path.resolve())).items() if k != "task_list"})
    return merged | config


def local_tasks(include_paths: list[str]) -> dict[str, LocalEntry]:
    """Every task, group and tag the include paths define, each YAML parsed (as the harness
    indexes them: ``*.yaml`` at any depth; a mapping without ``task:``/``group:`` is a template)."""
    entries: dict[str, LocalEntry] = {}
    for folder in map(Path, include_paths):
        if not folder.is_dir():
            raise ValueError(f"--include_path: {str(folder)!r} is not a folder")
        for path in sorted(folder.glob("**/*.yaml")):
            if {"__pycache__", ".ipynb_checkpoints"} & set(path.parts):
                continue
            config = _read_task_yaml(path)
            kind = "group" if "group" in config else "task" if isinstance(config.get("task"), str) else None
            if kind is None:
                continue
            entries[config[kind]] = LocalEntry(kind, path, config)
            tags = config.get("tag") or []
            for tag in ([tags] if isinstance(tags, str) else tags) if kind == "task" else []:
                entries.setdefault(tag, LocalEntry("tag", None)).members.append(config["task"])
    return entries


def requested_local_configs(
    requested: list[str], local: dict[str, LocalEntry]
) -> tuple[list[tuple[str, LocalEntry]], bool]:
    """The local tasks that `requested` names (groups and tags expanded), and whether any name
    (a glob, a harness task, a group member outside the include paths) needs the harness's tasks."""
    tasks: list[tuple[str, LocalEntry]] = []
    needs_defaults = False
    pending = list(requested)
    while pending:
        name = pending.pop(0)
        entry = local.get(name)
        if entry is None or any(c in name for c in "*?["):
            needs_defaults = True
        elif entry.kind == "task":
            tasks.append((name, entry))
        elif entry.kind == "tag":
            pending += entry.members
        else:
            members = entry.config.get("task") or []
            for member in members if isinstance(members, list) else [members]:
                name_of = member.get("task") or member.get("group") if isinstance(member, dict) else member
                pending.append(str(name_of))
    return tasks, needs_defaults


def validate_data_files(tasks: list[tuple[str, LocalEntry]]) -> None:
    """Local ``dataset_kwargs.data_files`` of the tasks exist, and JSON / JSON-lines ones parse."""
    for name, entry in tasks:
        data_files = (entry.config.get("dataset_kwargs") or {}).get("data_files") or []
        values = data_files.values() if isinstance(data_files, dict) else [data_files]
        for pattern in (item for value in values for item in (value if isinstance(value, list) else [value])):
            if "://" in str(pattern):
                continue  # a remote file: the harness downloads it
            # datasets.load_dataset resolves a relative data file from the working directory.
            matches = sorted(Path(path) for path in glob.glob(str(pattern), recursive=True))
            if not matches:
                raise ValueError(
                    f"task {name} ({entry.path}): data file {str(pattern)!r} not found (a relative path is read "
                    f"from the working directory {str(Path.cwd())!r}, as datasets.load_dataset does: run from there "
                    "or make it absolute)"
                )
            for path in matches:
                if path.suffix in (".json", ".jsonl"):
                    _check_json_file(path, name, entry.path)


def _check_json_file(path: Path, task: str, yaml_path: Path | None) -> None:
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)  # one JSON document (a list of records, or a dict of columns)
        return
    except json.JSONDecodeError:
        pass  # JSON lines: one record per line
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"task {task} ({yaml_path}): data file {str(path)!r} line {number} does not parse: {error}"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"task {task} ({yaml_path}): data file {str(path)!r} line {number} is not a JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m midus lm-eval",
        description="Zero-shot evaluation of a kit checkpoint with the lm-evaluation-harness.",
    )
    parser.add_argument("--ckpt_path", required=True, help="A kit checkpoint (.ckpt written by fit).")
    parser.add_argument("--tasks", required=True, help="Comma-separated harness task or group names (globs allowed).")
    parser.add_argument(
        "--include_path",
        action="append",
        default=[],
        help="A folder of extra task YAMLs (repeatable); relative data_files resolve from the working directory.",
    )
    parser.add_argument(
        "--num_fewshot", type=int, default=0, help="Few-shot examples per prompt (default 0: zero-shot)."
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help="Documents per task (an integer), or a fraction of each task when below 1; for quick checks only.",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per forward pass.")
    parser.add_argument("--device", default="cpu", help="Torch device, e.g. cpu or cuda.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--max_length",
        type=int,
        default=0,
        help="Context limit in tokens (default 0: the model's context: with Llama-3 RoPE scaling "
        "original_max_position_embeddings x factor, else the block size it was trained on).",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer directory, for checkpoints written before the kit stored its tokenizer.",
    )
    parser.add_argument("--output_path", default=None, help="Results JSON (default <run dir>/lm_eval/results.json).")
    parser.add_argument(
        "--log_samples", action="store_true", help="Keep every document's inputs and scores in the JSON."
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="Seed of the harness's Python, NumPy and torch generators."
    )
    return parser


def resolve_tasks(requested: list[str], include_paths: list[str]) -> tuple[list[str], Any]:
    """The task names to evaluate and a `TaskManager` that knows them.

    Task YAMLs under the include paths are parsed (and the data files of the requested ones
    read) first. The harness's own ~15,000 task YAMLs take ~15 s to index on 2 cores, so they
    are indexed only when a requested name is not defined under the include paths.
    """
    from lm_eval.tasks import TaskManager

    local = local_tasks(include_paths)
    configs, needs_defaults = requested_local_configs(requested, local)
    manager = TaskManager(include_path=include_paths or None, include_defaults=needs_defaults)
    names: list[str] = []
    unknown: list[str] = []
    for pattern in requested:
        matched = manager.match_tasks([pattern]) if any(c in pattern for c in "*?[") else [pattern]
        found = [name for name in matched if name in manager.all_tasks]
        names += found
        unknown += [] if found else [pattern]
    if unknown:
        provided = ", ".join(sorted(local)) or "none"
        where = (
            f"the include path(s) {', '.join(include_paths)} provide: {provided}"
            if include_paths
            else "no --include_path given"
        )
        raise ValueError(
            f"--tasks: unknown task(s) {', '.join(unknown)}; {where}; the harness's own tasks are listed by "
            "`lm-eval ls tasks`"
        )
    validate_data_files(configs)
    return names, manager


def load_tasks(names: list[str], manager: Any) -> list[Any]:
    """The harness's Task and Group objects of `names`, their datasets loaded now (before the
    model), for `simple_evaluate`'s ``tasks`` (lm_eval 0.4.13's `TaskManager.load` takes them as is).

    A hub task (``arc_easy``) whose dataset is not in the ``datasets`` cache while the hub cannot
    be reached (``HF_DATASETS_OFFLINE=1``, no network) is a ValueError naming the task and the
    way out, instead of the ConnectionError ``datasets`` raises.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    built: list[Any] = []
    for name in names:
        try:
            loaded = manager.load(name)
        except (ConnectionError, LocalEntryNotFoundError) as error:
            reason = str(error).replace("\n", " ")
            raise ValueError(
                f"--tasks: {name} needs its dataset from the Hugging Face hub, which is not in the datasets "
                f"cache and could not be reached ({reason}); run once with network to download it into "
                "the cache (~/.cache/huggingface/datasets or $HF_DATASETS_CACHE), after which runs with "
                "HF_DATASETS_OFFLINE=1 read it from there"
            ) from None
        # A group stays one object (its aggregate is reported); a task or a tag gives its tasks.
        group = loaded["groups"].get(name)
        built += [group] if group is not None else list(loaded["tasks"].values())
    return built


def default_output(checkpoint_path: str) -> Path:
    """``<run dir>/lm_eval/results.json``: beside the run's TensorBoard events and analyses."""
    from midus.analysis.checkpoint_run import run_dir_of

    return run_dir_of(Path(checkpoint_path)) / "lm_eval" / "results.json"


def main(args: list[str]) -> None:
    """``python -m midus lm-eval --ckpt_path <ckpt> --tasks <a,b> [--include_path DIR] ...``."""
    from midus.analysis.checkpoint_run import fail_cleanly

    parsed = build_parser().parse_args(args)
    limit = parsed.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    from midus.evaluation.lm_eval_adapter import MidusEvalLM, require_lm_eval

    try:
        require_lm_eval()
        if limit is not None and limit <= 0:
            raise ValueError(f"--limit must be positive, got {parsed.limit:g}")
        requested = [name.strip() for name in parsed.tasks.split(",") if name.strip()]
        if not requested:
            raise ValueError("--tasks: give at least one task name")
        # Cheap checks first: the task YAMLs and local data files, then the checkpoint as data
        # (memory-mapped), so a missing, foreign or unsafe file is refused before any task dataset is
        # built; the datasets before the model, so an offline hub task is refused before a large
        # model is loaded.
        from midus.checkpoint.kit import read_kit_checkpoint
        from midus.checkpoint.safe_load import trusted

        names, manager = resolve_tasks(requested, parsed.include_path)
        read_kit_checkpoint(parsed.ckpt_path, "--ckpt_path", mmap=not trusted())
        tasks = load_tasks(names, manager)
        model = MidusEvalLM(
            checkpoint=parsed.ckpt_path,
            tokenizer=parsed.tokenizer,
            batch_size=parsed.batch_size,
            device=parsed.device,
            dtype=parsed.dtype,
            max_length=parsed.max_length,
        )
    except (ImportError, ValueError, FileNotFoundError) as error:
        fail_cleanly(error)
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    results = simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=manager,
        num_fewshot=parsed.num_fewshot,
        limit=limit,
        # Only recorded (under "config") when the model is an instance: the run is self-describing.
        model_args={"checkpoint": parsed.ckpt_path, "dtype": parsed.dtype, "max_length": model.max_length},
        batch_size=parsed.batch_size,
        device=parsed.device,
        log_samples=parsed.log_samples,
        random_seed=parsed.seed,
        numpy_random_seed=parsed.seed,
        torch_random_seed=parsed.seed,
        fewshot_random_seed=parsed.seed,
    )
    output = Path(parsed.output_path) if parsed.output_path else default_output(parsed.ckpt_path)
    print(f"lm-eval of {parsed.ckpt_path} ({parsed.num_fewshot}-shot, limit {limit})")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    print(f"wrote {output}")
