"""
Download TinyStories and write it as GPT-2 token shards, the data that train_gpt2.py reads.

    python prepare_tinystories.py                 # download (~1.9 GB), tokenize on all cores, write shards
    python prepare_tinystories.py --splits val    # only the 19 MB validation split: a quick first check
    python prepare_tinystories.py --source DIR    # read TinyStories-{train,valid}.txt from DIR, no download
    python prepare_tinystories.py --force         # redo the shards (reuses the downloaded text)
    python prepare_tinystories.py --help          # every flag, with its default

Source: the official text files of TinyStories (Eldan & Li 2023), in the Hugging Face dataset
roneneldan/TinyStories:
    https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt   ~1.92 GB
    https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt   ~19.4 MB
Each story is followed by a line "<|endoftext|>". We strip every story and skip the empty ones.

Output, in --out-dir (default data/tinystories), named by train_gpt2.SHARD_NAME:
    TinyStories-valid.txt, TinyStories-train.txt   the downloads, kept: --force then needs no new download
    tinystories_val_000.bin                        the validation tokens
    tinystories_train_000.bin, _001, ...           the train tokens, --shard-size (100M) per shard, the last
                                                   one holds the rest: 5 shards for TinyStories
    done.json                                      written last: the shards and counts of each finished split

Shard format (llm.c's, read by train_gpt2.read_shard): a header of 256 little-endian int32 (magic 20240520,
version 1, token count, then zeros), then the tokens as little-endian uint16: GPT-2's BPE of every story,
each story followed by <|endoftext|> (50256), in the stories' order; the same bytes for any number of workers.

Expected counts for the official files (from the source run, not re-measured here; main() prints ours next
to them):
    train   473,804,270 tokens
    val       4,550,817 tokens

Sections, in order; steps 1 to 3 run for each split, val first (it is small and fast):
    1. Download      stream the file to NAME.part, resume it after an interruption, rename it when complete
    2. Tokenize      blocks of whole stories, tokenized by a pool of workers, taken back in order into shards
    3. Publish       shards go to out_dir/incomplete/ and into out_dir once the split is complete; re-runs
                     skip the splits that done.json lists
    4. Command line  the flags; main() prints the counts, or one line "error: ..." and exits with 1
"""

import argparse
import contextlib
import fnmatch
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException

import numpy as np
from tqdm import tqdm

from train_gpt2 import (EOT, SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_NAME, SHARD_VERSION, UserError, atomic_write,
                        get_tokenizer)

SOURCE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
FILES = {"val": "TinyStories-valid.txt", "train": "TinyStories-train.txt"}  # split -> file name at SOURCE
EXPECTED_TOKENS = {"val": 4_550_817, "train": 473_804_270}  # from the official files, see the docstring
SEPARATOR = "<|endoftext|>"  # the line between two stories in the text files (also GPT-2's token 50256)
MARKER = "done.json"  # lists the finished splits; written last

# -----------------------------------------------------------------------------
# 1. Download
# A 1.9 GB download over a home connection can break halfway. We stream it to NAME.part and, when the
# connection drops, ask the server for the rest only ("Range: bytes=N-", answered with 206 Partial Content).
# The file gets its real name only once it has every byte the server announced (Content-Length), so a
# truncated download is never mistaken for the dataset. HTTP errors are checked: an error page must never
# be saved as TinyStories-train.txt.

RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}  # statuses that may go away if we ask again later


def download(url, path, retries=5, retry_wait=2.0, timeout=60):
    """Download url to path, resuming path + '.part' if an earlier try left one. Give up with a UserError
    after `retries` tries in a row that gained no bytes, waiting retry_wait, 2x, 4x, ... seconds between."""
    part = path + ".part"
    failures = 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0  # bytes we already have
        headers = {"User-Agent": "prepare_tinystories.py"}
        if have:
            headers["Range"] = f"bytes={have}-"  # resume: ask only for the bytes we lack
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                # urlopen follows redirects and raises HTTPError for 4xx/5xx; other 2xx are errors too.
                if r.status == 206:  # the rest of the file: "Content-Range: bytes have-(total-1)/total"
                    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", r.headers.get("Content-Range", ""))
                    if not m or int(m[1]) != have:
                        raise HTTPException(f"bad Content-Range {r.headers.get('Content-Range')!r}")
                    offset, total = have, int(m[2])
                elif r.status == 200:  # the whole file (a server without Range support sends this too)
                    offset, total = 0, r.length  # r.length: the Content-Length, None if not sent
                else:
                    raise UserError(f"{url}: unexpected HTTP status {r.status} {r.reason}")
                with open(part, "ab" if offset else "wb") as f, \
                        tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=os.path.basename(path)) as bar:
                    while chunk := r.read(1 << 20):  # 1 MiB at a time: memory stays small
                        f.write(chunk)
                        bar.update(len(chunk))
            size = os.path.getsize(part)
            # No Content-Length (rare) means a chunked response, whose framing http.client checks itself.
            if total is None or size == total:
                os.replace(part, path)
                return
            # http.client's read() returns b"" when the server closes early: only this check catches it.
            error = f"connection closed after {size:,} of {total:,} bytes"
        except urllib.error.HTTPError as e:  # before URLError and OSError: it is a subclass of both
            if e.code == 416 and have:  # "Range Not Satisfiable": the .part is not a prefix of this file
                os.remove(part)
                continue
            if e.code not in RETRY_HTTP:
                raise UserError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, HTTPException, OSError) as e:  # refused, reset, timed out, DNS, ...
            error = str(getattr(e, "reason", None) or e) or type(e).__name__
        # A try that gained bytes is progress, not a failure: a flaky connection still gets there.
        gained = (os.path.getsize(part) if os.path.exists(part) else 0) > have
        failures = 0 if gained else failures + 1
        if failures >= retries:
            resume = f"; re-run to resume from {part}" if os.path.exists(part) else ""
            raise UserError(f"could not download {url}: {error} ({retries} tries){resume}")
        wait = retry_wait * 2 ** max(failures - 1, 0)
        print(f"download of {url} interrupted ({error}); retrying in {wait:g} s", file=sys.stderr)
        time.sleep(wait)


def fetch(source, split, out_dir, retries, retry_wait):
    """The local path of this split's text file: downloaded into out_dir if `source` is a URL (and not
    already there), or read in place if `source` is a directory."""
    name = FILES[split]
    if re.match(r"https?://", source):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):  # only complete downloads get this name
            print(f"{split}: using {path}, downloaded before (delete it to download it again)")
        else:
            download(f"{source.rstrip('/')}/{name}", path, retries, retry_wait)
        return path
    path = os.path.join(source, name)
    if not os.path.isfile(path):
        raise UserError(f"no {path}: --source must be an http(s) URL or a directory with {FILES['train']} "
                        f"and {FILES['val']}")
    return path


def text_source(source, split):
    """Where this split's text comes from, as recorded in done.json: its URL, or the absolute file path."""
    if re.match(r"https?://", source):
        return f"{source.rstrip('/')}/{FILES[split]}"
    return os.path.abspath(os.path.join(source, FILES[split]))


# -----------------------------------------------------------------------------
# 2. Tokenize
# BPE is the slow part: one core encodes about 10 MB of text per second, so the 1.9 GB of train is ~3 min
# of work for one core. The main process reads the file in blocks of 256 KiB, each cut just after a
# separator, and one worker process per core turns a block into tokens: decode, split into stories, BPE.
# The main process does little more than read, so it keeps all the cores busy. Pool.imap returns the
# results in the order of the blocks (not in the order the workers finish), so the shards are the same
# bytes for any number of workers. Memory stays bounded: a few blocks are in flight at a time, and the
# tokens go into one preallocated shard buffer.

BLOCK_BYTES = 1 << 18  # text per task: 256 KiB, ~300 stories, ~60k tokens, ~25 ms of BPE
MAX_STORY_BYTES = 1 << 26  # 64 MiB without a separator: this is not a TinyStories file
_enc = None  # this process's tokenizer, set once per worker by _init_worker


def read_blocks(path, size):
    """Yield the bytes of a TinyStories text file in blocks of about `size` bytes, each one cut just after
    a separator, so that no story (and no UTF-8 character) is split between two blocks."""
    sep, rest, found = SEPARATOR.encode(), b"", False
    with open(path, "rb") as f:
        while block := f.read(size):
            data = rest + block  # rest: the start of a story that the previous block cut off
            cut = data.rfind(sep)
            if cut == -1:  # no story ends in this block: read on
                if len(data) > MAX_STORY_BYTES:  # memory stays bounded, even for a file of another kind
                    raise UserError(f"{path}: no {SEPARATOR} in {len(data):,} bytes: not a TinyStories text "
                                    f"file; delete it and re-run")
                rest = data
                continue
            found, cut = True, cut + len(sep)
            yield data[:cut]
            rest = data[cut:]
    if not found:
        raise UserError(f"{path} has no {SEPARATOR} lines: not a TinyStories text file; delete it and re-run")
    if rest:
        yield rest  # the last story, if the file does not end with a separator


def decode(data):
    """Bytes of text -> str, with newlines as Python reads a text file: "\\r\\n" and "\\r" become "\\n"."""
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def split_stories(text):
    """The stories in a text: split at each separator, stripped, empty ones skipped. For a whole file this
    is [s.strip() for s in text.split(SEPARATOR) if s.strip()], and so it is block by block, because every
    block ends with a separator."""
    return [story for story in (s.strip() for s in text.split(SEPARATOR)) if story]


def _init_worker(enc):
    global _enc
    _enc = enc


def tokenize_block(data):
    """The tokens of a block's stories, each followed by <|endoftext|>, as one uint16 array; and the number
    of stories. encode_ordinary never turns text into special tokens: only we insert EOT. (tiktoken's
    encode_ordinary_batch measured 1.3-1.9x slower here: it starts a thread pool on every call.)"""
    stories = split_stories(decode(data))
    ids = []
    for story in stories:
        ids.extend(_enc.encode_ordinary(story))
        ids.append(EOT)
    return np.array(ids, dtype=np.uint16), len(stories)  # every id < 50257 fits in uint16


def parallel_map(fn, tasks, workers):
    """Yield fn(task) for each task, in the tasks' order, computed by `workers` processes."""
    enc = get_tokenizer()
    if workers == 1:  # no pool: the same function in this process, so the same bytes
        _init_worker(enc)
        yield from map(fn, tasks)
        return
    # Pool.imap alone reads its input as fast as the workers take it and keeps every result that we have
    # not consumed yet: while we write a shard to disk, the results of the whole file could pile up in
    # memory. A semaphore caps the tasks in flight (sent to the pool, result not yet consumed).
    room, stop = threading.Semaphore(4 * workers), threading.Event()

    def feed():  # runs in the pool's task thread
        for task in tasks:
            room.acquire()
            if stop.is_set():
                return
            yield task

    # Ctrl-C goes to every process of the terminal. Workers are born ignoring it (they inherit SIG_IGN),
    # and the main process stops the pool itself, below.
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Each worker gets our tokenizer (copied by fork, or pickled where processes are spawned).
        pool = mp.Pool(workers, initializer=_init_worker, initargs=(enc,))
    finally:
        signal.signal(signal.SIGINT, sigint)
    try:
        # A block is already a batch of ~300 stories: the chunking that imap's chunksize would do (and
        # it comes back as one array; per-story tasks with a chunksize measured 1.9x slower).
        for result in pool.imap(fn, feed(), chunksize=1):
            room.release()
            yield result
    finally:  # done, or stopped early by an error or Ctrl-C
        stop.set()
        room.release()  # wake feed() if it waits: it ends, and the pool sees the end of the tasks
        # close() + join() let the few tasks in flight finish. Not terminate() (what `with Pool` does):
        # it can deadlock when a worker is halfway through sending a large result.
        pool.close()
        pool.join()


def write_shard(path, tokens):
    """Write a 1-D array of token ids as an llm.c shard (the format train_gpt2.read_shard reads), atomically."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16)), \
        "token ids must fit in uint16"
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tokens = np.ascontiguousarray(tokens, dtype="<u2")  # a copy only if tokens are not uint16 already
    atomic_write(path, lambda f: (f.write(header.tobytes()), f.write(tokens.data)))


class ShardWriter:
    """Collects tokens in a preallocated buffer of shard_size tokens and writes a shard each time it is
    full (and at the end, the rest). One progress bar per shard; the last one's total becomes its count."""

    def __init__(self, out_dir, split, shard_size):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0  # tokens in buf
        self.shards = {}  # file name -> token count, of the shards written so far
        self.bar = None

    def add(self, tokens):
        while len(tokens):  # a story may straddle two shards, as in llm.c
            if self.bar is None:
                self.bar = tqdm(total=self.shard_size, unit="tok", unit_scale=True,
                                desc=f"{self.split} shard {len(self.shards)}")
            n = min(len(tokens), self.shard_size - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[:n]
            self.fill, tokens = self.fill + n, tokens[n:]
            self.bar.update(n)
            if self.fill == self.shard_size:
                self.flush()

    def flush(self):
        if self.fill == 0:
            return
        if len(self.shards) == 1000:  # train_gpt2.py reads the indices 000 to 999
            raise UserError(f"more than 1000 {self.split} shards: use a larger --shard-size")
        name = SHARD_NAME.format(split=self.split, index=f"{len(self.shards):03d}")
        write_shard(os.path.join(self.out_dir, name), self.buf[:self.fill])  # temp file + rename
        self.shards[name] = self.fill
        self.fill = 0
        self.bar.total = self.bar.n  # a shard that is not full (the last one) also ends at 100%
        self.bar.close()
        self.bar = None


def tokenize_split(text_path, split, out_dir, shard_size, workers):
    """Write the shards of one split into out_dir; return its counts, as done.json records them."""
    t0 = time.perf_counter()
    writer = ShardWriter(out_dir, split, shard_size)
    n_stories = 0
    blocks = read_blocks(text_path, BLOCK_BYTES)
    try:
        with contextlib.closing(parallel_map(tokenize_block, blocks, workers)) as results:
            for tokens, n in results:
                writer.add(tokens)
                n_stories += n
        writer.flush()
    except UnicodeDecodeError as e:  # raised by a worker's decode(), passed on by the pool
        raise UserError(f"{text_path} is not UTF-8 text ({e.reason}); delete it and re-run to get it "
                        f"again") from None
    finally:
        if writer.bar is not None:  # stopped early: end the bar's line before any message
            writer.bar.close()
    seconds = time.perf_counter() - t0
    n_tokens = sum(writer.shards.values())
    mb = os.path.getsize(text_path) / 1e6
    print(f"{split}: tokenized {mb:,.1f} MB in {seconds:.1f} s with {workers} worker(s): "
          f"{mb / seconds:.1f} MB/s, {n_tokens / seconds / 1e6:.2f}M tokens/s")
    return {"stories": n_stories, "tokens": n_tokens, "shards": writer.shards}


# -----------------------------------------------------------------------------
# 3. Publish, and skip what is finished
# done.json maps each finished split to its source, shard size, counts and shards. It is written
# atomically and only after the split's shards are in place; a split counts as finished only if all its
# listed shards exist with the size their token count implies, and no other shard of that split does.

def shard_bytes(tokens):
    return SHARD_HEADER_INTS * 4 + 2 * tokens


def read_marker(out_dir):
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else {}
    except (OSError, ValueError):  # missing or damaged: nothing is finished
        return {}


def write_marker(out_dir, marker):
    text = json.dumps(marker, indent=2) + "\n"
    atomic_write(os.path.join(out_dir, MARKER), lambda f: f.write(text.encode()))


def split_shards(out_dir, split):
    """The shard files of a split in out_dir, by name: those that train_gpt2.shard_paths reads."""
    return sorted(fnmatch.filter(os.listdir(out_dir), SHARD_NAME.format(split=split, index="[0-9][0-9][0-9]")))


def finished(out_dir, split, source, shard_size):
    """The split's entry of done.json if it is finished with these settings, else None."""
    info = read_marker(out_dir).get(split)
    if not isinstance(info, dict) or info.get("source") != source or info.get("shard_size") != shard_size:
        return None
    shards = info.get("shards")
    if not isinstance(shards, dict) or split_shards(out_dir, split) != sorted(shards):
        return None
    for name, tokens in shards.items():
        if os.path.getsize(os.path.join(out_dir, name)) != shard_bytes(tokens):
            return None
    return info


def publish(staging, out_dir, split, info):
    """Move a finished split's shards from staging into out_dir, replacing any older ones."""
    marker = read_marker(out_dir)
    marker.pop(split, None)
    write_marker(out_dir, marker)  # first, the split is no longer claimed as finished
    for name in split_shards(out_dir, split):  # an older run's shards, maybe more of them: never mix runs
        os.remove(os.path.join(out_dir, name))
    for name in info["shards"]:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))  # each rename is atomic
    marker[split] = info
    # Last: claim the split. (atomic_write's fsync of out_dir also makes the renames above durable.)
    write_marker(out_dir, {s: marker[s] for s in FILES if s in marker})


# -----------------------------------------------------------------------------
# 4. Command line

def parse_args(argv=None):
    def positive(s):
        if not s.isdigit() or int(s) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
        return int(s)

    def seconds(s):
        if not re.fullmatch(r"\d+(\.\d*)?", s):
            raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {s!r}")
        return float(s)

    # Each flag's --help shows its default, but for --force: "(default: False)" says nothing.
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])  # the docstring's first line
    default = " (default: %(default)s)"
    p.add_argument("--source", default=SOURCE, help="base URL of the TinyStories files (a mirror), or a local "
                   f"directory holding {FILES['train']} and {FILES['val']} (read in place)" + default)
    p.add_argument("--out-dir", default="data/tinystories", help="where the shards, done.json and the "
                   "downloaded text go (train_gpt2.py --data-dir)" + default)
    p.add_argument("--splits", nargs="+", choices=["val", "train"], default=["val", "train"],
                   help="which splits to prepare (val always goes first)" + default)
    p.add_argument("--shard-size", type=positive, default=100_000_000, help="tokens per shard (200 MB)" + default)
    p.add_argument("--workers", type=positive, default=os.cpu_count() or 1,
                   help="tokenizer processes (the output is the same for any number)" + default)
    p.add_argument("--force", action="store_true", help="redo the splits that done.json lists as finished "
                   "(the downloaded text is reused; delete it to download again)")
    p.add_argument("--retries", type=positive, default=5, help="download tries in a row without progress "
                   "before giving up" + default)
    p.add_argument("--retry-wait", type=seconds, default=2.0, help="seconds before the first retry of a "
                   "download, doubled for each further one" + default)
    return p.parse_args(argv)


def prepare(args):
    """Prepare the requested splits; return {split: counts}. Raises UserError on failure."""
    get_tokenizer()  # fail now, not after a 2 GB download, if GPT-2's BPE cannot be loaded
    os.makedirs(args.out_dir, exist_ok=True)
    staging = os.path.join(args.out_dir, "incomplete")  # a subdirectory: train_gpt2.py does not look in it
    results = {}
    try:
        for split in [s for s in FILES if s in args.splits]:  # val first
            source = text_source(args.source, split)
            info = None if args.force else finished(args.out_dir, split, source, args.shard_size)
            if info:
                print(f"{split}: already prepared in {args.out_dir} ({MARKER}); --force redoes it")
            else:
                text_path = fetch(args.source, split, args.out_dir, args.retries, args.retry_wait)
                shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
                os.makedirs(staging)
                info = {"source": source, "shard_size": args.shard_size,
                        **tokenize_split(text_path, split, staging, args.shard_size, args.workers)}
                publish(staging, args.out_dir, split, info)
            results[split] = info
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        results = prepare(args)
    except (UserError, OSError) as e:  # OSError: a full disk, a directory we may not write, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no half-written split was left behind; re-run to continue", file=sys.stderr)
        return 130
    for split, info in results.items():
        n = len(info["shards"])
        print(f"{split:5s}: {info['stories']:>11,} stories {info['tokens']:>13,} tokens in {n} shard"
              f"{'s' if n > 1 else ''}   (for reference, the official files give {EXPECTED_TOKENS[split]:,} tokens)")
    data_dir = "" if args.out_dir == "data/tinystories" else f" --data-dir {args.out_dir}"
    print(f"next: python train_gpt2.py{data_dir}   (on a CPU: a small model, see 'Train on a CPU' in README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
