"""Token-shard preparation (``data.format: shards``) against the tokenizer it runs, and against
today's packed blocks: speed, disk and memory.

What it measures
    Text: the paragraphs of ``../shared/data/wikitext2-valid.txt`` and ``tinyshakespeare.txt``
    (or ``--text`` files), repeated into a .txt file of ``--speed-mb`` MB (and of each
    ``--rss-mb`` size), read with ``data.files.sample_by: paragraph``. Tokenizer: the kit's BPE
    (`midus.data.tokenizers.train_bpe`, ``--vocab`` entries) trained once on the unrepeated text,
    passed to every arm as a Hugging Face tokenizer (``data.tokenizer: hf``).

    * speed, tokens/s over all tokens of the file (training and 5 % held-out validation), and
      CPU seconds (this process's threads plus its reaped worker processes):
      ``tokenizer(texts)``, the tokenizer's own batch encoding in one process, in calls of
      `UNIT_RECORDS` records with the text already in memory; `prepare_shards` with
      ``num_proc`` 1 and 2, which also reads the file, frames each document, appends EOS,
      writes the shards and the manifest; and today's packed blocks (``data.format: blocks``:
      text into `datasets`' Arrow cache, `pack_documents` in one process, blocks saved to the
      cache), unless ``--no-blocks``. The one-process arms run twice: on one thread
      (``TOKENIZERS_PARALLELISM=false``; ``tokenizer(texts)`` so is the reference, 1.00) and on
      the tokenizer's own threads (unset, its default: a batch is encoded on every core).
      ``num_proc=2`` runs one thread per worker process.
    * disk, bytes per token: the shard directory (shards, manifest, tokenizer) with the BPE
      (ids below 2**16: uint16) and with the same BPE plus 64,000 added special tokens (ids up
      to 66,047: uint32; the same ids for the text); today's cache (Arrow text, map cache and
      saved blocks) per token of its blocks.
    * memory: peak RSS (``ru_maxrss``) of a separate process preparing each ``--rss-mb`` size
      with ``num_proc=2``: its main process and its largest worker (``RUSAGE_CHILDREN``).

How to run
    python benchmarks/prepare_speed.py                        # 10 MB speed, RSS at 10 and 100 MB
    python benchmarks/prepare_speed.py --speed-mb 2 --rss-mb 2 20 --no-blocks   # a quick look

Timings are single runs on whatever else the machine is doing; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from midus.data.prepare import prepare_shards  # noqa: E402
from midus.data.streamed_text import streamed_files  # noqa: E402
from midus.data.text_records import text_records  # noqa: E402
from midus.data.token_shard_encoding import UNIT_RECORDS  # noqa: E402
from midus.data.token_shards import TokenBlocks  # noqa: E402
from midus.data.tokenizers import train_bpe  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MB = 1_000_000


def repeated_text(records: list[str], megabytes: float, path: Path) -> Path:
    """`records` as paragraphs (blank line between), repeated until the file holds `megabytes` MB."""
    target = int(megabytes * MB)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            for record in records:
                handle.write(record + "\n\n")
                written += len(record.encode()) + 2
                if written >= target:
                    break
    return path


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its reaped child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def threads(on: bool) -> None:
    """The tokenizer's own threads on (its default) or off; `tokenizers` reads this at every batch."""
    if on:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def prepare(path: Path, tokenizer, cache: Path, num_proc: int) -> tuple[float, float, int, Path]:
    """(seconds, CPU seconds, tokens, directory) of preparing `path`'s shards in `num_proc` processes."""
    text = streamed_files([str(path)], [], 0.05, "text", "paragraph", 0)
    start, cpu = time.perf_counter(), cpu_seconds()
    _, directory = prepare_shards(text, "hf", tokenizer, 0, str(cache), num_proc=num_proc)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = sum(TokenBlocks(directory, split, 1).tokens for split in ("train", "validation"))
    return seconds, cpu, tokens, directory


def encode(tokenizer, texts: list[str]) -> tuple[float, float, int]:
    """(seconds, CPU seconds, tokens) of ``tokenizer(texts)`` in calls of `UNIT_RECORDS` records."""
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    for first in range(0, len(texts), UNIT_RECORDS):
        tokens += sum(len(ids) for ids in tokenizer(texts[first : first + UNIT_RECORDS])["input_ids"])
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens


def rss_child(path: str, tokenizer_dir: str, num_proc: int) -> None:
    """Runs in its own process: prepare `path` and print the peak RSS of this process and its workers."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    with tempfile.TemporaryDirectory() as cache:
        seconds, _, tokens, _ = prepare(Path(path), tokenizer, Path(cache), num_proc)
    print(json.dumps({
        "seconds": seconds, "tokens": tokens,
        "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", nargs="*", default=[str(SHARED / "wikitext2-valid.txt"),
                                                      str(SHARED / "tinyshakespeare.txt")])
    parser.add_argument("--speed-mb", type=float, default=10.0, help="text size of the speed and disk runs")
    parser.add_argument("--rss-mb", type=float, nargs="*", default=[10.0, 100.0], help="text sizes of the RSS runs")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=512, help="block size of the packed-blocks arm")
    parser.add_argument("--no-blocks", action="store_true", help="skip today's packed blocks")
    parser.add_argument("--rss-child", nargs=3, metavar=("TEXT", "TOKENIZER", "NUM_PROC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return
    missing = [path for path in args.text if not Path(path).is_file()]
    if missing:
        raise SystemExit(f"--text: {missing} absent (the defaults are ../shared/data's files)")

    work = Path(tempfile.mkdtemp(prefix="prepare_speed-"))
    records = [record for path in args.text for record in text_records(path, "paragraph")]
    tokenizer = train_bpe([records], args.vocab)
    tokenizer.save_pretrained(str(work / "tokenizer"))
    text = repeated_text(records, args.speed_mb, work / "speed.txt")
    print(f"prepare_speed: {args.speed_mb:g} MB of text ({', '.join(Path(p).name for p in args.text)}, repeated), "
          f"kit BPE of {len(tokenizer)} tokens, {os.cpu_count()} CPUs")

    texts = list(text_records(str(text), "paragraph"))
    rows, directories = [], {}
    for on in (False, True):
        threads(on)
        where = "its threads" if on else "1 thread"
        rows.append((f"tokenizer(texts), 1 process, {where}, text in memory", *encode(tokenizer, texts)))
        seconds, cpu, tokens, directories[on] = prepare(text, tokenizer, work / f"shards-{where[:1]}", 1)
        rows.append((f"prepare, num_proc=1, {where}", seconds, cpu, tokens))
    del texts
    seconds, cpu, tokens, _ = prepare(text, tokenizer, work / "shards-2", 2)
    rows.append(("prepare, num_proc=2 (1 thread each)", seconds, cpu, tokens))
    disk = [("shards, uint16", directory_bytes(directories[False]), rows[1][3])]
    if not args.no_blocks:
        from midus.data.sources import FilesConfig
        from midus.data.text_data import TextData

        start, cpu = time.perf_counter(), cpu_seconds()
        data = TextData(source="files", files=FilesConfig(train=[str(text)]), tokenizer="hf",
                        tokenizer_path=str(work / "tokenizer"),
                        block_size=args.block_size, cache_dir=str(work / "blocks"))
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        block_tokens = (len(data.train_blocks) + len(data.val_blocks)) * (args.block_size + 1)
        rows.append(("packed blocks (format: blocks), 1 process, its threads", seconds, cpu, block_tokens))
        disk.append(("packed blocks: Arrow text + map cache + blocks", directory_bytes(work / "blocks"), block_tokens))

    wide = train_bpe([records], args.vocab)
    wide.add_tokens([f"<|extra_{index}|>" for index in range(64_000)], special_tokens=True)
    _, _, wide_tokens, wide_directory = prepare(text, wide, work / "shards_uint32", 2)
    disk.append((f"shards, uint32 (vocabulary {len(wide)})", directory_bytes(wide_directory), wide_tokens))

    reference = rows[0][3] / rows[0][1]
    print(f"\n{'speed':<56} {'tokens':>10} {'wall s':>6} {'CPU s':>6} {'M tok/s':>7} {'ratio':>5} {'M tok/CPU-s':>11}")
    for name, seconds, cpu, tokens in rows:
        print(f"{name:<56} {tokens:>10,} {seconds:>6.2f} {cpu:>6.2f} {tokens / seconds / 1e6:>7.3f} "
              f"{tokens / seconds / reference:>5.2f} {tokens / cpu / 1e6:>11.3f}")
    print(f"\n{'disk':<56} {'bytes':>11} {'bytes/token':>11} {'shards only':>11}")
    for name, size, tokens in disk:
        shards = name.startswith("shards")
        directory = directories[False] if "uint16" in name else wide_directory
        only = sum(path.stat().st_size for path in directory.glob("*.bin")) / tokens if shards else size / tokens
        print(f"{name:<56} {size:>11,} {size / tokens:>11.2f} {only:>11.2f}")

    print(f"\n{'peak RSS, num_proc=2':<22} {'tokens':>11} {'M tokens/s':>10} {'main MB':>8} {'worker MB':>9}")
    peaks = []
    for megabytes in args.rss_mb:
        path = repeated_text(records, megabytes, work / f"rss{megabytes:g}.txt")
        result = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(path), str(work / "tokenizer"), "2"],
            capture_output=True, text=True, check=True,
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        peaks.append(measured)
        path.unlink()
        print(f"{f'{megabytes:g} MB of text':<22} {measured['tokens']:>11,} "
              f"{measured['tokens'] / measured['seconds'] / 1e6:>10.3f} {measured['main_mb']:>8.0f} "
              f"{measured['worker_mb']:>9.0f}")
    if len(peaks) > 1:
        first, last = peaks[0], peaks[-1]
        print(f"{'ratio last/first':<22} {last['tokens'] / first['tokens']:>11.1f} {'':>10} "
              f"{last['main_mb'] / first['main_mb']:>8.2f} {last['worker_mb'] / first['worker_mb']:>9.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
