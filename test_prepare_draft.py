"""Tests of prepare_tinystories.py: offline and fast. A small HTTP server on 127.0.0.1 plays Hugging Face,
serving small files in TinyStories' format; it supports Range requests and can be told to drop connections
or to answer with an error status."""

import glob
import http.server
import json
import multiprocessing
import os
import re
import threading

import numpy as np
import pytest

import prepare_tinystories as prep
from train_gpt2 import EOT, DataLoader, UserError, get_tokenizer, read_shard


# -----------------------------------------------------------------------------
# fixtures: stories, a local HTTP server, and the functions that read the result back

def make_stories(n, seed):
    """n synthetic stories: paragraphs, quotes, digits, non-ASCII text, spaces at line ends."""
    rng = np.random.default_rng(seed)
    words = ("Once upon a time there was little girl named Lily who loved to play in the park . , ! ? "
             "\"Hello\" said Tom's dog 42 café naïve 你好 🙂 sun-shine").split()
    stories = []
    for _ in range(n):
        paragraphs = [" ".join(rng.choice(words, size=rng.integers(5, 40)))
                      for _ in range(rng.integers(1, 4))]
        stories.append(" \n".join(paragraphs) if rng.random() < 0.2 else "\n".join(paragraphs))
    return stories


def tinystories_text(stories):
    """The official files' layout, plus what a parser must survive: an empty story, a blank-only one,
    blank lines around a story, and no separator after the last story."""
    sep = prep.SEPARATOR
    text = "".join(f"{s}\n{sep}\n" for s in stories[:-2])
    return text + f"{sep}\n  \n{sep}\n\n\n{stories[-2]}\n\n{sep}\n{stories[-1]}"


def reference_stories(text):
    """How the stories are defined, independently of prepare_tinystories' streaming parser."""
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


@pytest.fixture(scope="module")
def texts():
    """The two files, as bytes, by name: 40 val stories and 300 train stories."""
    return {prep.FILES["val"]: tinystories_text(make_stories(40, seed=1)).encode(),
            prep.FILES["train"]: tinystories_text(make_stories(300, seed=2)).encode()}


@pytest.fixture
def local_source(tmp_path, texts):
    """A directory holding the two files, for --source DIR."""
    d = tmp_path / "source"
    d.mkdir()
    for name, data in texts.items():
        (d / name).write_bytes(data)
    return str(d)


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /any/path/NAME -> server.files[NAME]. HTTP/1.0: the connection closes after each response, so
    sending fewer bytes than Content-Length is a dropped connection."""

    def do_GET(self):
        srv, name, rng = self.server, self.path.rsplit("/", 1)[-1], self.headers.get("Range")
        srv.requests.append((name, rng))
        if srv.status or name not in srv.files:
            self.send_error(srv.status or 404)
            return
        data = srv.files[name]
        rng = rng if srv.ranges else None  # a server without Range support sends the whole file
        start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))  # always the full promise
        self.end_headers()
        self.wfile.write(data[start:srv.stop_at(name, start, len(data))])  # ... which stop_at may break

    def log_message(self, *args):
        pass


@pytest.fixture
def server(texts, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a user's http_proxy must not catch our local server
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: any free port
    srv.files, srv.requests, srv.status, srv.ranges = dict(texts), [], None, True
    srv.stop_at = lambda name, start, size: size  # where the body is cut off: by default, nowhere
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_port}/datasets/roneneldan/TinyStories/resolve/main"
    yield srv
    srv.shutdown()
    srv.server_close()


def run(source, out_dir, *flags):
    """prepare_tinystories.main, with small shards and no waiting between download retries."""
    argv = ["--source", str(source), "--out-dir", str(out_dir), "--workers", "1", "--shard-size", "3000",
            "--retry-wait", "0", *flags]
    return prep.main([str(a) for a in argv])


def split_tokens(out_dir, split):
    """All tokens of a split, found the way train_gpt2's DataLoader finds them."""
    paths = sorted(glob.glob(os.path.join(out_dir, f"*{split}*.bin")))
    assert paths, f"no {split} shards in {out_dir}"
    return np.concatenate([read_shard(p) for p in paths])


def shard_bytes(out_dir):
    """Every shard in out_dir, name -> bytes."""
    paths = sorted(glob.glob(os.path.join(out_dir, "*.bin")))
    return {os.path.basename(p): open(p, "rb").read() for p in paths}


def last_line(err):
    return err.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# tests

@pytest.mark.parametrize("block_bytes", [1, 5, 13, 14, 64, 1 << 18])
def test_blocks_hold_whole_stories_so_splitting_them_is_splitting_the_whole_text(tmp_path, block_bytes):
    text = ("first story\n<|endoftext|>\n\n<|endoftext|>\n  second\n\nstory  \n<|endoftext|>\n"  # blanks
            "third<|endoftext|>fourth\r\n<|endoftext|>   \n<|endoftext|>\r\n"  # mid-line, Windows newlines
            "old\rMac<|endoftext|>last: caf\u00e9 \U0001F642, no separator\n")  # \r, UTF-8, no last separator
    path = tmp_path / "s.txt"
    path.write_bytes(text.encode())
    blocks = list(prep.read_blocks(str(path), block_bytes))
    assert b"".join(blocks) == text.encode()  # nothing lost, nothing repeated
    assert all(b.endswith(b"<|endoftext|>") for b in blocks[:-1])
    stories = [s for b in blocks for s in prep.split_stories(prep.decode(b))]
    assert stories == reference_stories(open(path, encoding="utf-8").read())  # newlines as Python reads them
    assert stories == ["first story", "second\n\nstory", "third", "fourth", "old\nMac",
                       "last: caf\u00e9 \U0001F642, no separator"]


def test_reading_stays_bounded_when_no_separator_comes(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "MAX_STORY_BYTES", 1000)
    path = tmp_path / "s.txt"
    path.write_bytes(b"a story\n<|endoftext|>\n" + b"no separator follows " * 100)
    with pytest.raises(UserError, match=r"no <\|endoftext\|> in 1,0\d\d bytes: not a TinyStories text"):
        list(prep.read_blocks(str(path), 64))


def test_download_and_tokenize_gives_every_story_in_order_followed_by_eot(server, texts, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(server.url, out) == 0
    printed = capsys.readouterr().out
    marker = json.load(open(out / "done.json"))
    enc = get_tokenizer()
    for split in ("val", "train"):
        stories = reference_stories(texts[prep.FILES[split]].decode())
        expected = [t for s in stories for t in enc.encode_ordinary(s) + [EOT]]
        tokens = split_tokens(out, split)  # read_shard checks each header against the file size
        assert tokens.tolist() == expected
        stories_back = np.split(tokens, np.flatnonzero(tokens == EOT) + 1)[:-1]  # cut after each EOT
        assert [enc.decode(s.tolist()) for s in stories_back] == [s + "<|endoftext|>" for s in stories]
        info = marker[split]
        assert (info["stories"], info["tokens"]) == (len(stories), len(expected))
        assert list(info["shards"].values()) == [3000] * (len(expected) // 3000) + [len(expected) % 3000]
        assert re.search(rf"{split}\s*:\s+{len(stories):,} stories\s+{len(expected):,} tokens", printed)
    x, y = DataLoader(str(out), "train", B=2, T=8, seed=0).next_batch()
    assert x.shape == y.shape == (2, 8) and (x[:, 1:] == y[:, :-1]).all()
    # Nothing else is left in out_dir: no .part, no temporary file, no staging directory.
    shards = [name for split in ("val", "train") for name in marker[split]["shards"]]
    assert sorted(os.listdir(out)) == sorted(["done.json", *prep.FILES.values(), *shards])
    assert [rng for name, rng in server.requests] == [None, None]  # one plain GET per file


def test_shards_are_byte_identical_for_any_worker_count(local_source, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BLOCK_BYTES", 700)  # many small tasks, so the workers really interleave
    assert run(local_source, tmp_path / "w1", "--workers", 1) == 0
    assert run(local_source, tmp_path / "w3", "--workers", 3) == 0
    one, three = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w3")
    assert len(one) > 3 and one == three


def test_dropped_connection_is_resumed_with_a_range_request(server, texts, local_source, tmp_path):
    train = prep.FILES["train"]
    size = len(texts[train])
    dropped = set()

    def drop_first_try_halfway(name, start, size):
        if name == train and name not in dropped:
            dropped.add(name)
            return size // 2
        return size
    server.stop_at = drop_first_try_halfway
    assert run(server.url, tmp_path / "out") == 0
    assert (train, f"bytes={size // 2}-") in server.requests  # the retry asked only for the rest
    assert run(local_source, tmp_path / "clean") == 0
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")
    assert open(tmp_path / "out" / train, "rb").read() == texts[train]


def test_server_without_range_support_gets_the_download_restarted(server, texts, tmp_path, capsys):
    server.ranges = False
    train = prep.FILES["train"]
    tries = []

    def drop_first_two_tries(name, start, size):
        tries.append(name)
        return size // 2 if name == train and tries.count(train) <= 2 else size
    server.stop_at = drop_first_two_tries
    assert run(server.url, tmp_path / "out") == 0  # the second try gains nothing, the third completes
    assert tries.count(train) == 3
    assert open(tmp_path / "out" / train, "rb").read() == texts[train]
    server.stop_at = lambda name, start, size: size // 2  # always cut: no try gains, it ends
    assert run(server.url, tmp_path / "out2", "--retries", 3) == 1
    assert last_line(capsys.readouterr().err).startswith("error: could not download")


def test_failed_download_is_resumed_by_the_next_run(server, texts, local_source, tmp_path, capsys):
    train = prep.FILES["train"]
    size = len(texts[train])
    server.stop_at = lambda name, start, size: max(start, size // 3) if name == train else size
    assert run(server.url, tmp_path / "out", "--retries", 2) == 1
    assert os.path.getsize(tmp_path / "out" / (train + ".part")) == size // 3
    server.stop_at = lambda name, start, size: size  # the network is back
    server.requests.clear()
    assert run(server.url, tmp_path / "out") == 0
    assert server.requests == [(train, f"bytes={size // 3}-")]  # val was finished: only the rest of train
    assert run(local_source, tmp_path / "clean") == 0
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")


@pytest.mark.parametrize("split", ["val", "train"])
def test_truncated_download_fails_with_one_line_and_leaves_no_shards_of_it(server, texts, tmp_path, capsys,
                                                                           split):
    name = prep.FILES[split]
    server.stop_at = lambda n, start, size: max(start, size // 2) if n == name else size  # on every try
    out = tmp_path / "out"
    assert run(server.url, out, "--retries", 3) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(rf"error: could not download {server.url}/{name}: connection closed after "
                        rf"[\d,]+ of {len(texts[name]):,} bytes \(3 tries\); re-run to resume from .*\.part",
                        last_line(err))
    assert not os.path.exists(out / name) and os.path.exists(out / (name + ".part"))
    assert not glob.glob(str(out / f"*{split}*.bin"))
    with pytest.raises(UserError, match=f"no {split} shards"):
        DataLoader(str(out), split, B=2, T=8, seed=0)
    if split == "val":  # the first split: nothing at all was published
        assert not glob.glob(str(out / "*.bin")) and not os.path.exists(out / "done.json")
    else:  # val was finished and published, train was not
        assert list(json.load(open(out / "done.json"))) == ["val"]


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_fails_with_one_line_naming_the_url(server, tmp_path, capsys, status):
    server.status = status
    out = tmp_path / "out"
    assert run(server.url, out, "--retries", 2) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert last_line(err).startswith(f"error: could not download {server.url}/{prep.FILES['val']}: "
                                     f"HTTP {status} ")
    assert len(server.requests) == (1 if status == 404 else 2)  # 5xx may pass: it is tried again
    assert not glob.glob(str(out / "*.bin")) and not os.path.exists(out / "done.json")


def test_text_without_separators_is_rejected(server, local_source, tmp_path, capsys):
    server.files[prep.FILES["val"]] = b"<html><body>Please log in</body></html>\n"  # a 200 that is no data
    assert run(server.url, tmp_path / "out") == 1
    assert re.fullmatch(r"error: .*TinyStories-valid.txt has no <\|endoftext\|> lines: not a TinyStories "
                        r"text file; delete it and re-run", last_line(capsys.readouterr().err))
    assert not glob.glob(str(tmp_path / "out" / "*.bin"))
    # The same with a pool of workers: the error comes through the pool, from the thread that reads blocks.
    server.shutdown()  # no other thread while the pool forks
    open(os.path.join(local_source, prep.FILES["val"]), "wb").write(b"<html>no stories</html>")
    assert run(local_source, tmp_path / "out2", "--workers", 2) == 1
    assert "has no <|endoftext|> lines" in last_line(capsys.readouterr().err)


def test_missing_local_source_fails_with_one_line(tmp_path, capsys):
    assert run(tmp_path / "nowhere", tmp_path / "out") == 1
    missing = tmp_path / "nowhere" / "TinyStories-valid.txt"
    assert last_line(capsys.readouterr().err).startswith(
        f"error: no {missing}: --source must be an http(s) URL or a directory")


def test_finished_dataset_is_skipped_and_force_redoes_it(server, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(server.url, out) == 0
    before = {p: os.stat(p) for p in glob.glob(str(out / "*.bin")) + [str(out / "done.json")]}
    contents = shard_bytes(out)
    for name in prep.FILES.values():
        os.remove(out / name)  # even without the text, a finished split needs nothing
    server.requests.clear()
    capsys.readouterr()
    assert run(server.url, out) == 0
    assert capsys.readouterr().out.count("already prepared") == 2
    assert server.requests == []
    assert {p: (s.st_ino, s.st_mtime_ns) for p, s in before.items()} == \
        {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in before}  # untouched
    assert run(server.url, out, "--force") == 0
    assert "already prepared" not in capsys.readouterr().out
    assert all(os.stat(p).st_ino != s.st_ino for p, s in before.items())  # every file written anew
    assert shard_bytes(out) == contents


def test_rerun_with_another_shard_size_replaces_all_old_shards(local_source, tmp_path):
    out = tmp_path / "out"
    assert run(local_source, out, "--shard-size", 1000) == 0
    tokens = split_tokens(out, "train")
    assert len(glob.glob(str(out / "*train*.bin"))) > 3
    assert run(local_source, out, "--shard-size", 100_000) == 0  # a new setting: redone without --force
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "*.bin"))) == \
        ["tinystories_train_000.bin", "tinystories_val_000.bin"]
    assert (split_tokens(out, "train") == tokens).all()


def test_failed_redo_leaves_the_previous_dataset_intact(local_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(local_source, out) == 0
    contents, marker = shard_bytes(out), open(out / "done.json").read()
    train = os.path.join(local_source, prep.FILES["train"])
    data = open(train, "rb").read()
    open(train, "wb").write(data[:len(data) // 2] + b"\xff\xfe" + data[len(data) // 2:])  # not UTF-8
    assert run(local_source, out, "--force", "--workers", 2) == 1  # the error comes through the pool
    assert re.fullmatch(r"error: .*TinyStories-train.txt is not UTF-8 text \(.*\); delete it and re-run to "
                        r"get it again", last_line(capsys.readouterr().err))
    assert shard_bytes(out) == contents and open(out / "done.json").read() == marker
    assert not os.path.exists(out / "incomplete")


def test_error_while_writing_shards_stops_the_workers_and_publishes_nothing(local_source, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(prep, "BLOCK_BYTES", 300)  # tasks are in flight when the error comes
    real_write_shard, calls = prep.write_shard, []

    def write_shard_until_the_disk_is_full(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", path)
        real_write_shard(path, tokens)
    monkeypatch.setattr(prep, "write_shard", write_shard_until_the_disk_is_full)
    out = tmp_path / "out"
    assert run(local_source, out, "--workers", 2, "--splits", "train") == 1
    assert re.fullmatch(r"error: \[Errno 28\] No space left on device: .*tinystories_train_002.bin'",
                        last_line(capsys.readouterr().err))
    assert multiprocessing.active_children() == []  # the pool was shut down, not left behind
    assert os.listdir(out) == []  # two shards were written, into the staging directory, now removed


def test_help_shows_every_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: the URL is not wrapped
    with pytest.raises(SystemExit):
        prep.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--source", prep.SOURCE), ("--out-dir", "data/tinystories"),
                          ("--splits", "['val', 'train']"), ("--shard-size", "100000000"),
                          ("--workers", str(os.cpu_count())), ("--force", "False"), ("--retries", "5"),
                          ("--retry-wait", "2.0")]:
        assert re.search(rf"{flag} .*?\(default: {re.escape(default)}\)", text), flag
