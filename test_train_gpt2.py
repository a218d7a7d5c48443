"""Tests of train_gpt2.py and prepare_tinystories.py, offline and on CPU.

The sections below follow train_gpt2.py's: the model (2), the BPE encoding (3), the data loader (4), the
training loop (5), sampling (6), then section 7's command line (where the config of section 1 becomes flags)
and machinery: devices and precision, MFU, --bench, the bookkeeping of a run (resume, checkpoints, metrics,
signals), memory and the micro-batch probe, fp16 loss scaling, the chunked loss, GPT-2's BPE file, Hugging
Face import/export, --plot, and torchrun. A last section tests prepare_tinystories.py (download, resume,
shards, errors). Shared helpers, and the reference run that many tests compare with, come first.

Run them (two to three minutes on 2 CPU cores, no GPU needed):

    python -m pytest -q test_train_gpt2.py

The models are tiny (2 layers, 2 heads, 32 channels, 16 positions, GPT-2's real 50,257-token vocabulary) and
the data are token shards written here from synthetic stories; a local HTTP server plays Hugging Face for
prepare_tinystories.py. GPT-2's BPE comes from tiktoken's download or, without internet (as in CI), from
$GPT2_BPE_FILE, a local copy of r50k_base.tiktoken (see "Offline use" in README.md):

    GPT2_BPE_FILE=.cache/r50k_base.tiktoken python -m pytest -q test_train_gpt2.py

The tests whose subject is another process (a signal or kill -9 from outside, torchrun, a ulimit) have
their processes run in the background from the start, while the other tests run in this process: see
Background.

Two things are pinned for the whole file, in this process and in the training subprocesses alike:
  - one CPU thread: these tensors are tiny, and on a busy 2-core machine two threads make a step ~10x slower;
  - matmul_flops, the timing that dtype "auto" and the MFU display are based on, is replaced by fixed numbers
    (fp32 "faster" than bf16): "auto" then always means float32, and no start-up spends seconds timing."""

import concurrent.futures
import dataclasses
import glob
import http.server
import io
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import types
import sys
import threading
import time
from contextlib import contextmanager, redirect_stdout, suppress
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import prepare_tinystories as prep
import train_gpt2 as tg
from train_gpt2 import (BPE_FILE_ENV, EOT, GPT, SHARD_HEADER_INTS, ChunkedCrossEntropy, DataLoader, GPTConfig,
                        KVCache, Runtime, SampleConfig, TrainConfig, UserError, chunked_cross_entropy,
                        choose_dtype, complete, configure_optimizer, device_peak_flops, export_hf,
                        flops_per_token, for_sampling, generate, get_lr, get_tokenizer, load_checkpoint, load_hf, main,
                        load_weights, parse_args, read_metrics, read_shard, train, train_step)
from prepare_tinystories import write_shard
from train_gpt2 import matmul_flops as REAL_MATMUL_FLOPS  # the fixture below replaces tg.matmul_flops


REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, "train_gpt2.py")
V = 50257  # GPT-2's vocabulary; the embedding table is padded to 50,304 rows
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)
TINY_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16"]
CPU = ["--device", "cpu", "--dtype", "float32"]
RT = Runtime(device="cpu", dtype=torch.float32)
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # train_step's loss scaler, off as for fp32 and bf16


# -----------------------------------------------------------------------------
# Shared helpers and fixtures: one thread, fixed timing, tiny models, synthetic stories as token shards

def fake_matmul_flops(fp32, bf16):
    """Stands in for train_gpt2.matmul_flops (a timing of CPU matmuls): fixed FLOP/s per dtype, at no cost."""
    def matmul_flops(device, dtype, n=1024, reps=5):
        assert device == "cpu"
        return fp32 if dtype == torch.float32 else bf16  # (fp16 as fast as bf16)
    return matmul_flops


# `python train_gpt2.py ARGS` with the same fixed timing as in this process (fp32 "twice as fast as bf16"),
# for the training subprocesses (signals, kill -9, torchrun).
FIXED_TIMING_MAIN = ("import sys, torch, train_gpt2 as t; "
                     "t.matmul_flops = lambda device, dtype, n=1024, reps=5: 1e11 if dtype == torch.float32 "
                     "else 5e10; sys.exit(t.main(sys.argv[1:]))")


@pytest.fixture(autouse=True, scope="module")
def one_thread_fixed_timing():
    """One thread and fixed matmul timing (see the module docstring), offline Hugging Face; all restored
    afterwards. OMP_NUM_THREADS reaches the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "matmul_flops", fake_matmul_flops(1e11, 5e10))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


def start_training(args, env):
    """Start `python train_gpt2.py ARGS` (with the fixed timing) as a background subprocess (see Background);
    stdout and stderr merged, line by line."""
    return nice(subprocess.Popen([sys.executable, "-c", FIXED_TIMING_MAIN, *args], cwd=REPO, text=True,
                                 env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))


def nice(proc):
    """Lower the priority of a background process (and of the processes it starts): this one's tests first."""
    with suppress(ProcessLookupError):  # (it may be gone already)
        os.setpriority(os.PRIO_PROCESS, proc.pid, 10)
    return proc


def run_in_background(command, env, timeout=300, **kwargs):
    """subprocess.run(command), niced: (exit status, stdout, stderr)."""
    proc = nice(subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, **kwargs))
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# Background jobs: the other processes that tests run and check (training processes to signal or kill,
# torchrun, a process under ulimit). Each spends seconds importing torch before it does anything, on a
# core that this process (one thread) leaves idle: so a thread runs them one after another from the
# start of the module, at low priority, while the other tests run here, and each test waits for the result
# of its job. A job only starts processes and reads their output, in the environment that this module set
# up (not a test's monkeypatched one); its test makes every check.
BACKGROUND_JOBS = {}  # name -> (job, the tests that use its result), in the order of the tests


def background_job(*tests):
    """Register job(ctx) as the background job of these tests (ctx: data_dir, enc, env, tmp: a directory)."""
    def register(job):
        BACKGROUND_JOBS[job.__name__] = (job, tests)
        return job
    return register


class Background:
    """Runs the named jobs, one after another, in a thread; result(name) waits for one."""

    def __init__(self, ctx, names):
        self.ctx, self.futures = ctx, {name: concurrent.futures.Future() for name in names}
        self.thread = threading.Thread(target=self.run_jobs, args=(names,), name="background jobs", daemon=True)
        self.thread.start()

    def run_jobs(self, names):
        for name in names:
            try:
                self.futures[name].set_result(BACKGROUND_JOBS[name][0](self.ctx))
            except BaseException as e:  # raised again in the test that waits for this job
                self.futures[name].set_exception(e)

    def result(self, name):
        """The result of job `name`, once it has finished."""
        return self.futures[name].result(timeout=900)

    def join(self):
        """Wait until every job has finished, and the thread with them."""
        self.thread.join()


@pytest.fixture(autouse=True, scope="module")
def background(request, one_thread_fixed_timing, data_dir, enc, tmp_path_factory):
    """Starts the background jobs of the tests that this session runs."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    names = [name for name, (_, tests) in BACKGROUND_JOBS.items() if selected & set(tests)]
    ctx = SimpleNamespace(data_dir=data_dir, enc=enc, env=dict(os.environ), tmp=tmp_path_factory.mktemp("background"))
    jobs = Background(ctx, names)
    yield jobs
    jobs.join()  # no process is left running


def tiny_model(seed=0, **overrides):
    return GPT(GPTConfig(**{**TINY, **overrides}), seed=seed)


def every_logits(model, idx):
    """The logits at every position of idx (B, T): (B, T, V). GPT.forward gives the last position's only,
    all that sampling needs, so this runs it on each prefix in turn."""
    return torch.cat([model(idx[:, :t + 1])[0] for t in range(idx.size(1))], dim=1)


def random_tokens(shape, seed):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def make_stories(n, seed):
    """n short stories from a small vocabulary: a tiny model learns them within a few dozen steps."""
    rng = random.Random(seed)
    names, animals = ["Tom", "Lily", "Sam", "Mia", "Ben", "Sue"], ["cat", "dog", "bird", "frog", "bear", "fish"]
    places, things = ["park", "garden", "house", "forest", "river"], ["ball", "kite", "hat", "cake", "book", "box"]
    colors = ["red", "big", "blue", "little", "green"]
    stories = []
    for _ in range(n):
        name, animal, place = rng.choice(names), rng.choice(animals), rng.choice(places)
        thing, color = rng.choice(things), rng.choice(colors)
        stories.append(f"Once upon a time there was a {animal} named {name}. {name} liked to play in the "
                       f"{place}. One day {name} found a {color} {thing}. {name} was very happy. The end.")
    return stories


def story_tokens(enc, stories):
    """The token stream of prepare_tinystories.py: each story followed by <|endoftext|>."""
    ids = []
    for story in stories:
        ids += enc.encode_ordinary(story) + [EOT]
    return np.array(ids, dtype=np.int64)


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, enc):
    """Two train shards (31 stories) and one val shard (15 stories), named as prepare_tinystories.py names
    them. The train shards hold 68 windows of 16 + 1 tokens: a step of the resume tests reads 8 (2 x 4), so
    their step 8 (the 9th) reads the last windows of epoch 0 and the first of epoch 1."""
    d = tmp_path_factory.mktemp("tinystories")
    train_ids = story_tokens(enc, make_stories(31, seed=1))
    half = len(train_ids) // 2
    write_shard(str(d / "tinystories_train_000.bin"), train_ids[:half])
    write_shard(str(d / "tinystories_train_001.bin"), train_ids[half:])
    write_shard(str(d / "tinystories_val_000.bin"), story_tokens(enc, make_stories(15, seed=2)))
    assert DataLoader(str(d), "train", 4, 16, seed=0).n_windows == 68
    return str(d)


def run_cli(capsys, args):
    """main(args) in this process: (exit status, stdout, stderr)."""
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, *fragments):
    """Exit status 1 and one line "error: ..." holding each fragment, no traceback."""
    assert rc == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def assert_same(a, b, where="checkpoint"):
    """a == b, bit for bit: nested dicts, lists and tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# -----------------------------------------------------------------------------
# The reference run, which many tests below repeat with a change and compare with: 10 steps of 2
# micro-batches of 4 x 16 tokens, a checkpoint every 2 steps, the weights and optimizer state kept after
# every step; and how to stop a run during a chosen step.

N_STEPS = 10
TRAIN_ARGS = ["--batch-size", "4", "--tokens-per-step", "128", "--max-steps", str(N_STEPS), "--warmup-steps", "3",
              "--eval-interval", "4", "--eval-tokens", "128", "--eval-sample-tokens", "8", "--ckpt-interval", "2",
              *CPU, "--no-compile"]
TIMING_FIELDS = ("ms", "tok_per_sec")  # the metrics that differ between identical runs


def train_args(data_dir, out_dir, *extra):
    return ["--data-dir", data_dir, "--out-dir", out_dir, *TINY_FLAGS, *TRAIN_ARGS, *extra]


def clone_state(model, optimizer):
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": torch.utils._pytree.tree_map(
                lambda x: x.clone() if isinstance(x, torch.Tensor) else x, optimizer.state_dict())}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted run of N_STEPS, with the weights and optimizer state after every step, and what it
    printed."""
    out = str(tmp_path_factory.mktemp("reference"))
    after_step, real, printed = {}, tg.train_step, io.StringIO()

    def train_step(model, optimizer, *args, **kwargs):
        result = real(model, optimizer, *args, **kwargs)
        after_step[len(after_step) + 1] = clone_state(model, optimizer)
        return result

    with pytest.MonkeyPatch.context() as mp, redirect_stdout(printed):
        mp.setattr(tg, "train_step", train_step)
        rc = main(train_args(data_dir, out))
    assert rc == 0, printed.getvalue()
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == N_STEPS and len(after_step) == N_STEPS
    return SimpleNamespace(out=out, ckpt=ckpt, after_step=after_step, printed=printed.getvalue(),
                           metrics=read_metrics(os.path.join(out, "metrics.jsonl")))


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in metrics]


def assert_same_run(out_dir, reference):
    """The run in out_dir ended exactly as the reference: final weights, optimizer state, data position,
    and the logged losses, each train step exactly once and in order."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert ckpt["step"] == N_STEPS
    assert_same(ckpt["model"], reference.ckpt["model"], "model")
    assert_same(ckpt["optimizer"], reference.ckpt["optimizer"], "optimizer")
    assert ckpt["loader"] == reference.ckpt["loader"]
    metrics = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    assert [m["step"] for m in metrics if "train_loss" in m] == list(range(N_STEPS))
    assert without_timing(metrics) == without_timing(reference.metrics)


def assert_state_after_step(ckpt, reference):
    """A checkpoint of step s holds exactly the reference run's weights and optimizer after s steps."""
    state = reference.after_step[ckpt["step"]]
    assert_same(ckpt["model"], state["model"], f"model at step {ckpt['step']}")
    assert_same(ckpt["optimizer"], state["optimizer"], f"optimizer at step {ckpt['step']}")


def resume_command(printed):
    """The arguments of the 'Continue with: python train_gpt2.py ...' line that a stopped run prints."""
    match = re.search(r"Continue with: python train_gpt2\.py (.+)", printed)
    assert match, printed
    args = shlex.split(match[1])
    assert "--resume" in args
    return args


def copy_run(reference_out, out, names=("ckpt.pt", "metrics.jsonl")):
    os.makedirs(out, exist_ok=True)
    for name in names:
        open(os.path.join(out, name), "wb").write(open(os.path.join(reference_out, name), "rb").read())


@contextmanager
def signal_during_step(k, signum):
    """Deliver `signum` to this process as the k-th optimizer step (1-based) ends, as Ctrl-C or a cloud's
    preemption notice would, without changing any setting of the run (--max-steps and so the
    learning-rate schedule stay those of the uninterrupted run): the run stops with the checkpoint of step
    k. A signal that arrives where training's handler is not installed fails the test instead of killing
    pytest. (signal_during_micro_batch stops one in the middle of a step.)"""
    real, calls = tg.train_step, []

    def train_step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(k)
        if len(calls) == k:
            signal.raise_signal(signum)  # the Python-level handler runs before this returns
        return result

    def outside(signum, frame):
        raise AssertionError(f"signal {signum} arrived while training's handler was not installed")

    old = signal.signal(signum, outside)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tg, "train_step", train_step)
            yield
    finally:
        signal.signal(signum, old)


@pytest.fixture(scope="module")
def stopped_at_4(data_dir, tmp_path_factory):
    """The reference run stopped by SIGTERM during its step 4, so with the checkpoint of step 4: its out_dir,
    which tests copy before they damage or resume it."""
    out = str(tmp_path_factory.mktemp("stopped_at_4"))
    with signal_during_step(4, signal.SIGTERM):
        assert main(train_args(data_dir, out)) == 128 + signal.SIGTERM
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 4
    return out


# -----------------------------------------------------------------------------
# 2. Model: GPT-2 small's size, the attention written out, causality, weight tying, the loss at the start

def test_gpt2_small_has_124m_parameters_with_and_without_vocab_padding(monkeypatch):
    # The count does not depend on the values: build on the meta device, with the init skipped (seconds saved).
    monkeypatch.setattr(GPT, "_init_weights", lambda self, module, generator: None)
    with torch.device("meta"):
        padded, unpadded = GPT(GPTConfig()), GPT(GPTConfig(vocab_pad_to=1))
    assert GPTConfig().padded_vocab_size == 50304 and padded.lm_head.weight.shape == (50304, 768)
    assert padded.num_params() == 124_475_904  # the tied wte/lm_head counted once
    assert unpadded.num_params() == 124_439_808  # OpenAI's GPT-2 small


def test_attention_written_out_gives_the_logits_of_the_fused_kernel_with_and_without_the_cache():
    """--attention manual (q k^T / sqrt(hs), causal mask, softmax, @ v) is the textbook that SDPA fuses:
    the same weights give the same logits, for a whole sequence and token by token with the KV cache."""
    fused, manual = tiny_model(seed=5).eval(), tiny_model(seed=5, attention="manual").eval()
    assert manual.transformer.h[0].attn.manual and not fused.transformer.h[0].attn.manual
    idx = random_tokens((2, 16), seed=13)
    with torch.no_grad():
        full_fused, full_manual = every_logits(fused, idx), every_logits(manual, idx)
        cache = KVCache(manual, 2)
        steps = [manual(idx[:, :6], kv_cache=cache)[0]] + [manual(idx[:, t:t + 1], kv_cache=cache)[0]
                                                          for t in range(6, 16)]
    assert torch.allclose(full_manual, full_fused, atol=1e-5, rtol=1e-5)
    assert torch.allclose(torch.cat(steps, dim=1), full_fused[:, 5:], atol=1e-5, rtol=1e-5)  # from the prefill's last


def test_changing_a_token_changes_no_logit_before_it_and_every_logit_from_it_on():
    model = tiny_model().eval()
    idx = random_tokens((2, 16), seed=1)
    t = 7
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % V
    with torch.no_grad():
        logits, logits_changed = every_logits(model, idx), every_logits(model, changed)
    assert torch.equal(logits[:, :t], logits_changed[:, :t])
    diff = (logits - logits_changed).abs().amax(dim=(0, 2))  # (T,)
    assert (diff[t:] > 1e-4).all(), diff


def assert_tied(model):
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_token_embedding_and_output_layer_share_one_matrix_after_loading(tmp_path):
    model = tiny_model(seed=0)
    assert_tied(model)
    source = tiny_model(seed=1)
    model.load_state_dict(source.state_dict())
    assert_tied(model)
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)
    # Through a checkpoint file, loaded the way --sample and --export-hf load it.
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "config": {"model": dataclasses.asdict(source.config)},
                "step": 0}, path)
    ckpt = load_checkpoint(str(path))
    loaded = load_weights(GPT(GPTConfig(**ckpt["config"]["model"])), ckpt["model"], str(path))
    assert_tied(loaded)
    assert torch.equal(loaded.transformer.wte.weight, source.transformer.wte.weight)
    with torch.no_grad():  # one matrix: a change through one name shows through the other
        loaded.lm_head.weight[5, 0] = 123.0
    assert loaded.transformer.wte.weight[5, 0] == 123.0


def test_loss_at_init_is_that_of_a_uniform_guess_and_std_1_embeddings_start_far_worse():
    model = tiny_model(n_embd=64)
    x, y = random_tokens((4, 16), seed=2), random_tokens((4, 16), seed=3)
    with torch.no_grad():
        _, loss = model(x, y)
        assert abs(loss.item() - math.log(V)) < 0.5  # -ln(1/50257) = 10.82
        model.lm_head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))  # nn.Embedding's init
        _, loss_std1 = model(x, y)
    assert loss_std1.item() > math.log(V) + 5


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = tiny_model()
    x, y = random_tokens((3, 16), seed=6), random_tokens((3, 16), seed=7)
    _, loss = model(x, y)
    with torch.no_grad():
        logits, last = every_logits(model, x), model(x)[0]
    assert last.shape == (3, 1, V)  # the last position only, over the real vocabulary (padding is never sampled)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, V), y.view(-1)).item(), rel=1e-6)


def test_textbook_attention_and_loss_train_like_the_fused_ones(data_dir, reference, tmp_path, capsys):
    """--attention manual --loss plain: the first 3 steps of the reference run, up to float rounding.
    (--lr-decay-steps 10 gives a 3-step run the reference's learning rates.)"""
    out = str(tmp_path / "run")
    rc, _, err = run_cli(capsys, train_args(data_dir, out, "--attention", "manual", "--loss", "plain",
                                            "--max-steps", "3", "--lr-decay-steps", str(N_STEPS)))
    assert rc == 0, err
    losses = [m["train_loss"] for m in read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m]
    assert losses == pytest.approx([m["train_loss"] for m in reference.metrics if "train_loss" in m][:3], rel=1e-5)
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["config"]["model"]["attention"] == "manual"


# -----------------------------------------------------------------------------
# 3. BPE encoding: GPT-2's token ids, and the encoder written out

def test_bpe_gives_gpt2_token_ids(enc):
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("Once upon a time") == [7454, 2402, 257, 640]
    assert enc.encode_ordinary("!") == [0]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT] == [50256]
    assert enc.eot_token == EOT and enc.n_vocab == V
    assert EOT not in enc.encode_ordinary("<|endoftext|>")  # as text, the marker is ordinary tokens
    text = "Lily's dog, café 42!\n\"Hi,\" said Tom."
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_bpe_written_out_gives_tiktokens_ids_on_stories_and_hard_strings(enc):
    """bpe_encode (section 3: split with GPT-2's regex, merge the lowest-ranked pair first) is what tiktoken
    does in Rust: the same ids on stories, non-ASCII text, emoji, whitespace runs and digits."""
    ranks = tg.bpe_ranks()
    texts = make_stories(20, seed=9) + [
        "Once upon a time, Tommy had a puppy.", "Rumpelstiltskin", "naïve café, Straße, 北京, مرحبا",
        "emoji 🐶🐱 and 👩‍👩‍👧 and 🇫🇷", "  two  spaces,\ttab\n\nnew lines \r\n", "I'M sure you'll don't 12345678",
        "<|endoftext|>", ""]
    for text in texts:
        assert tg.bpe_encode(text, ranks) == enc.encode_ordinary(text), text


def test_the_bpe_example_of_section_3_is_what_the_bpe_gives(enc):
    """The worked example in section 3's comment, read from train_gpt2.py: its pieces and ids are tiktoken's."""
    source = open(tg.__file__, encoding="utf-8").read()
    text, pieces, ids = re.search(r'^#\s+"(.+)"\n#\s+1\. (.+)\n(?:#.*\n)*?#\s+-> \[([\d, ]+)\]', source, re.M).groups()
    ids = [int(i) for i in ids.split(",")]
    assert enc.encode_ordinary(text) == ids
    assert [enc.decode([i]) for i in ids] == re.findall(r"'([^']*)'", pieces)  # one token per common word
    rare, rare_pieces = re.search(r"^#.*'(\w+)' -> ((?:'\w+' ?)+)", source, re.M).groups()
    assert [enc.decode([i]) for i in enc.encode_ordinary(rare)] == re.findall(r"'(\w+)'", rare_pieces)


# -----------------------------------------------------------------------------
# 4. Data loader: token shards, shuffled windows, a resumable position, the shares of several processes

B_L, T_L = 4, 8


@pytest.fixture
def counting_dir(tmp_path):
    """Token i of a shard is start + i, so a window shows where it came from. 124 + 68 = 192 windows of 8
    (a multiple of 2 x 4) in two train shards, and a val shard whose tokens the train loader must never see."""
    write_shard(str(tmp_path / "tinystories_train_000.bin"), np.arange(0, 1000))  # (1000 - 1) // 8 = 124 windows
    write_shard(str(tmp_path / "tinystories_train_001.bin"), np.arange(2000, 2549))  # 548 // 8 = 68 windows
    write_shard(str(tmp_path / "tinystories_val_000.bin"), np.arange(5000, 5200))
    return str(tmp_path)


def all_window_starts():
    return {0 + w * T_L for w in range(124)} | {2000 + w * T_L for w in range(68)}


def starts(x):
    return x[:, 0].tolist()


def test_targets_are_the_inputs_shifted_by_one_within_one_shard(counting_dir):
    loader = DataLoader(counting_dir, "train", B_L, T_L, seed=0)
    for _ in range(loader.n_windows // B_L):  # one epoch
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B_L, T_L) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, -1], x[:, -1] + 1)  # the next token of the shard
        assert torch.equal(x, x[:, :1] + torch.arange(T_L))  # consecutive tokens: no window crosses shards
        assert set(starts(x)) <= all_window_starts()


def test_an_epoch_visits_every_window_exactly_once(counting_dir):
    loader = DataLoader(counting_dir, "train", B_L, T_L, seed=0)
    assert loader.n_windows == 192
    per_epoch = loader.n_windows // B_L  # 48 micro-batches
    seen = [s for _ in range(per_epoch) for s in starts(loader.next_batch()[0])]
    assert sorted(seen) == sorted(all_window_starts())
    assert loader.state() == {"epoch": 1, "window": 0}
    second = [s for _ in range(per_epoch) for s in starts(loader.next_batch()[0])]
    assert sorted(second) == sorted(seen) and second != seen  # the next epoch: same windows, new order


def read_batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_data_order_depends_only_on_seed_and_epoch(counting_dir):
    n = 2 * 48 + 5  # into the third epoch
    a = read_batches(DataLoader(counting_dir, "train", B_L, T_L, seed=7), n)
    assert_same_batches(a, read_batches(DataLoader(counting_dir, "train", B_L, T_L, seed=7), n))
    other = read_batches(DataLoader(counting_dir, "train", B_L, T_L, seed=8), n)
    assert not any(torch.equal(xa, xo) for (xa, _), (xo, _) in zip(a, other))
    # Epoch 1's order, reached by loading a position rather than by reading epoch 0 first.
    jumped = DataLoader(counting_dir, "train", B_L, T_L, seed=7)
    jumped.load_state({"epoch": 1, "window": 0})
    assert_same_batches(a[48:96], read_batches(jumped, 48))


def test_loader_state_resumes_the_exact_sequence(counting_dir):
    loader = DataLoader(counting_dir, "train", B_L, T_L, seed=3)
    read_batches(loader, 45)
    state = json.loads(json.dumps(loader.state()))  # as plain data, like a checkpoint
    expected = read_batches(loader, 10)  # crosses into epoch 1
    resumed = DataLoader(counting_dir, "train", B_L, T_L, seed=3)
    resumed.load_state(state)
    assert_same_batches(expected, read_batches(resumed, 10))


def step_windows(loaders, accum):
    """The set of windows all loaders together read in one optimizer step of accum micro-batches each."""
    return {s for loader in loaders for _ in range(accum) for s in starts(loader.next_batch()[0])}


def test_two_ranks_read_disjoint_windows_that_together_match_one_process_with_double_accumulation(counting_dir):
    accum = 2
    single = DataLoader(counting_dir, "train", B_L, T_L, seed=5)
    ranks = [DataLoader(counting_dir, "train", B_L, T_L, seed=5, rank=r, world=2) for r in range(2)]
    assert [loader.n_windows for loader in ranks] == [single.n_windows] * 2  # each rank sees every window
    for step in range(single.n_windows // B_L // (2 * accum)):  # one epoch
        per_rank = [step_windows([loader], accum) for loader in ranks]
        assert not per_rank[0] & per_rank[1], step
        assert per_rank[0] | per_rank[1] == step_windows([single], 2 * accum), step


def test_two_ranks_match_one_process_with_double_accumulation_across_epochs(tmp_path):
    """The docstring's promise ("together, per step, exactly the windows that a single process with world
    times the accumulation would read") for a whole run, where an epoch is not a whole number of steps,
    nor of micro-batches (TinyStories: ~462,700 windows, ~7,229.7 micro-batches of 64): micro-batches and
    steps then span the end of an epoch, and from the second epoch on the processes must still read what
    the single process reads."""
    write_shard(str(tmp_path / "tinystories_train_000.bin"), np.arange(86 * T_L + 1))  # 86 windows: 21.5 micro-batches
    single = DataLoader(str(tmp_path), "train", B_L, T_L, seed=5)
    ranks = [DataLoader(str(tmp_path), "train", B_L, T_L, seed=5, rank=r, world=2) for r in range(2)]
    for step in range(25):  # a little over two epochs of 2 x 2 micro-batches per step
        assert step_windows(ranks, 1) == step_windows([single], 2), f"step {step}"


def test_fixed_batches_are_the_same_on_every_call(counting_dir):
    loader = DataLoader(counting_dir, "val", B_L, T_L, seed=0)
    first = loader.fixed_batches(3 * B_L)
    assert len(first) == 3
    loader.next_batch()
    assert_same_batches(first, loader.fixed_batches(3 * B_L))
    assert_same_batches(first, DataLoader(counting_dir, "val", B_L, T_L, seed=99).fixed_batches(3 * B_L))
    assert all(x.min() >= 5000 for x, _ in first)  # val tokens only
    ranks = [DataLoader(counting_dir, "val", B_L, T_L, seed=0, rank=r, world=2).fixed_batches(3 * B_L)
             for r in range(2)]
    assert_same_batches(first, [ranks[0][0], ranks[1][0], ranks[0][1]])  # a strided share each
    # The same windows in smaller micro-batches (--batch-size auto halving B): the same validation set.
    halves = DataLoader(counting_dir, "val", B_L // 2, T_L, seed=0).fixed_batches(3 * B_L)
    assert_same_batches(first, [tuple(torch.cat(t) for t in zip(*halves[i:i + 2])) for i in range(0, 6, 2)])
    # Fewer windows asked for than one micro-batch holds: one micro-batch per process, not an empty set.
    assert [len(DataLoader(counting_dir, "val", B_L, T_L, seed=0, rank=r, world=2).fixed_batches(1))
            for r in range(2)] == [1, 1]


def shard_parts(tokens):
    """A shard's header (as ints) and body (as bytes), to be damaged by a test."""
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    return header, np.asarray(tokens, dtype="<u2").tobytes()


@pytest.mark.parametrize("defect, message", [
    ("magic", "bad magic"), ("version", "version 2"), ("truncated", "truncated"), ("extra", "truncated"),
    ("short header", "truncated"), ("header cut inside an int", "truncated")])
def test_bad_shard_raises_user_error_naming_the_file(tmp_path, defect, message):
    header, body = shard_parts(np.arange(100))
    if defect == "magic":
        header[0] = 1234
    if defect == "version":
        header[1] = 2
    data = header.tobytes() + body
    data = {"truncated": data[:-2], "extra": data + b"\0\0", "short header": data[:1000],
            "header cut inside an int": data[:1023]}.get(defect, data)
    path = tmp_path / "tinystories_train_000.bin"
    path.write_bytes(data)
    with pytest.raises(UserError, match=message) as e:
        read_shard(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(UserError):  # the loader reports it the same way
        DataLoader(str(tmp_path), "train", 2, 8, seed=0)


def test_too_few_tokens_for_one_batch_is_a_user_error(tmp_path):
    write_shard(str(tmp_path / "tinystories_train_000.bin"), np.arange(30))  # 3 windows of 8
    with pytest.raises(UserError, match=r"hold 30 tokens: too few for 1 x 4 sequences of 9 tokens") as e:
        DataLoader(str(tmp_path), "train", 4, 8, seed=0)
    assert str(tmp_path) in str(e.value)
    DataLoader(str(tmp_path), "train", 3, 8, seed=0)  # 3 windows make one batch of 3


def test_missing_data_points_to_prepare_tinystories(tmp_path):
    with pytest.raises(UserError, match="prepare_tinystories.py"):
        DataLoader(str(tmp_path / "nowhere"), "train", 4, 8, seed=0)
    with pytest.raises(UserError, match=r"no train shards.*prepare_tinystories.py"):
        DataLoader(str(tmp_path), "train", 4, 8, seed=0)  # a directory without shards


# -----------------------------------------------------------------------------
# 5. Training loop: the LR schedule, AdamW, train_step with gradient accumulation, evaluation, train()

def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=100, max_steps=3000)
    assert get_lr(0, cfg) == pytest.approx(6e-4 / 100)
    assert get_lr(49, cfg) == pytest.approx(6e-4 * 50 / 100)
    assert get_lr(99, cfg) == pytest.approx(6e-4)  # end of warmup
    assert get_lr(100, cfg) == pytest.approx(6e-4)  # start of the cosine
    assert get_lr(1550, cfg) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway through the cosine
    quarter = 0.5 * (1 + math.cos(math.pi / 4))  # 0.854 of the way from min_lr to max_lr: a cosine, not a line
    assert get_lr(100 + 725, cfg) == pytest.approx(6e-5 + quarter * (6e-4 - 6e-5))
    assert get_lr(3000, cfg) == pytest.approx(6e-5)
    assert get_lr(5000, cfg) == pytest.approx(6e-5)  # a resumed run past max_steps stays at the floor
    # The schedule's length is lr_decay_steps once fixed (train() fixes it to max_steps at a run's start):
    # extending the run to 4000 steps keeps the cosine of 3000 steps and goes on at the floor.
    extended = dataclasses.replace(cfg, max_steps=4000, lr_decay_steps=3000)
    assert [get_lr(s, extended) for s in (1550, 2999, 3000, 3999)] == [get_lr(s, cfg) for s in (1550, 2999, 3000, 3999)]
    warmup = [get_lr(s, cfg) for s in range(100)]
    cosine = [get_lr(s, cfg) for s in range(100, 3001)]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert all(a > b for a, b in zip(cosine, cosine[1:]))


STORY = "Once upon a time there was a cat named Tom. The end."


@pytest.fixture(scope="module")
def overfit(enc):
    """A tiny model trained on one batch of one story repeated, with configure_optimizer and train_step.
    The 8 windows start at every other token of the 15-token story + <|endoftext|> cycle, so the batch
    holds the story's start at position 0 and <|endoftext|> at position 0. Returns (model, losses)."""
    T = 16
    stream = torch.tensor(story_tokens(enc, [STORY] * 4))
    buf = torch.stack([stream[start:start + T + 1] for start in range(0, 16, 2)])  # (8, T + 1)
    x, y = buf[:, :-1], buf[:, 1:]
    model = tiny_model(seed=0)
    optimizer = configure_optimizer(model, TrainConfig(weight_decay=0.0), "cpu")
    losses = []
    for _ in range(200):
        loss, _ = train_step(model, optimizer, NO_SCALER, lambda: (x, y), 1, RT, lr=1e-2, grad_clip=1.0)
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break
    return model.eval(), losses


def test_tiny_model_overfits_one_batch(overfit):
    _, losses = overfit
    assert abs(losses[0] - math.log(V)) < 0.5
    assert losses[-1] < 0.1, losses[-10:]


def grads_seen_by_optimizer(model, batches, accum):
    """Run train_step; return (loss, {name: the gradient optimizer.step() saw})."""
    optimizer = configure_optimizer(model, TrainConfig(weight_decay=0.0), "cpu")
    seen = {}

    def step_spy(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    optimizer.step = step_spy
    it = iter(batches)
    loss, _ = train_step(model, optimizer, NO_SCALER, lambda: next(it), accum, RT, lr=1e-3, grad_clip=0.0)
    assert len(seen) > 0, "optimizer.step() was not called"
    assert all(p.grad is None for p in model.parameters()), "gradients not zeroed after the step"
    return loss, seen


def test_gradient_accumulation_over_micro_batches_equals_one_big_batch():
    x, y = random_tokens((8, 16), seed=4), random_tokens((8, 16), seed=5)
    k = 4
    micro = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    loss_accum, grads_accum = grads_seen_by_optimizer(tiny_model(seed=0), micro, accum=k)
    loss_big, grads_big = grads_seen_by_optimizer(tiny_model(seed=0), [(x, y)], accum=1)
    assert loss_accum.item() == pytest.approx(loss_big.item(), rel=1e-6)
    assert grads_accum.keys() == grads_big.keys()
    for name in grads_big:
        assert torch.allclose(grads_accum[name], grads_big[name], rtol=1e-4, atol=1e-8), name


def test_train_step_leaves_the_weights_alone_when_the_gradient_is_not_finite():
    """train() stops on a non-finite loss or gradient norm and says "the weights were not updated"; with a
    finite loss and an inf gradient, train_step() must not step either."""
    model = tiny_model()
    optimizer = configure_optimizer(model, TrainConfig(), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.transformer.wpe.weight.register_hook(lambda g: g * float("inf"))  # e.g. an overflow in backward
    x, y = random_tokens((2, 16), seed=8), random_tokens((2, 16), seed=9)
    loss, norm = train_step(model, optimizer, NO_SCALER, lambda: (x, y), 1, RT, lr=1e-3, grad_clip=1.0)
    assert torch.isfinite(loss) and not torch.isfinite(norm)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == []


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """`python train_gpt2.py ...` (main() in this process) on the synthetic shards: 40 steps of a tiny
    model. Returns out_dir."""
    out = str(tmp_path_factory.mktemp("run"))
    assert main(["--data-dir", data_dir, "--out-dir", out, *TINY_FLAGS, *CPU, "--no-compile",
                 "--batch-size", "4", "--tokens-per-step", "64", "--max-steps", "40", "--warmup-steps", "5",
                 "--max-lr", "1e-2", "--min-lr", "1e-3", "--eval-interval", "20", "--eval-tokens", "256"]) == 0
    return out


def test_cli_training_lowers_the_validation_loss_and_writes_a_checkpoint(trained_run):
    assert os.path.isfile(os.path.join(trained_run, "ckpt.pt"))
    metrics = read_metrics(os.path.join(trained_run, "metrics.jsonl"))
    train_lines = [m for m in metrics if "train_loss" in m]
    val_lines = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in train_lines] == list(range(40))
    assert all({"train_loss", "lr", "tok_per_sec"} <= m.keys() for m in train_lines)
    assert [m["step"] for m in val_lines] == [0, 20, 40]
    assert abs(val_lines[0]["val_loss"] - math.log(V)) < 0.5
    val = [m["val_loss"] for m in val_lines]
    assert val[2] < val[1] < val[0] - 3  # 10.8 -> ~3.6 -> ~3.0
    assert train_lines[-1]["train_loss"] < train_lines[0]["train_loss"] - 3
    # Watching it learn: each evaluation's sample continues the same prompt with the same seed. The first,
    # from random weights, is noise; by the end the model writes the stories' words.
    samples = [m["sample"][len("Once upon a time"):] for m in val_lines if m["sample"].startswith("Once upon a time")]
    vocabulary = set(re.findall(r"\w+", " ".join(make_stories(100, seed=1))))
    known = [np.mean([w in vocabulary for w in re.findall(r"\w+", text)] or [0]) for text in samples]
    assert len(samples) == 3 and known[0] < 0.3 and known[2] > 0.8, samples
    ckpt = load_checkpoint(os.path.join(trained_run, "ckpt.pt"))
    assert ckpt["step"] == 40 and ckpt["config"]["model"]["n_layer"] == 2


def test_sampling_at_each_evaluation_is_printed_under_the_val_loss_and_changes_nothing_else(
        data_dir, reference, tmp_path, capsys):
    """The sample of each evaluation comes from its own generator: the run without samples ends with the
    same weights and the same log, bit for bit, apart from the samples."""
    out = str(tmp_path / "run")
    rc, printed, _ = run_cli(capsys, train_args(data_dir, out, "--eval-sample-tokens", "0"))
    assert rc == 0 and "sample:" not in printed
    assert_same(load_checkpoint(os.path.join(out, "ckpt.pt"))["model"], reference.ckpt["model"], "model")
    without_samples = [{k: v for k, v in m.items() if k != "sample"} for m in reference.metrics]
    assert without_timing(read_metrics(os.path.join(out, "metrics.jsonl"))) == without_timing(without_samples)
    lines = reference.printed.splitlines()  # the run with samples
    i = lines.index(next(x for x in lines if x.startswith("step     4 | val loss")))
    sample = next(m["sample"] for m in reference.metrics if m["step"] == 4 and "val_loss" in m)
    assert sample.startswith("Once upon a time") and lines[i + 1] == f"step     4 | sample: {' '.join(sample.split())}"


# -----------------------------------------------------------------------------
# 6. Sampling: the KV cache, generate(), complete() and --sample

def test_kv_cache_gives_the_logits_of_the_full_forward():
    model = tiny_model().eval()
    idx = random_tokens((2, 16), seed=10)
    with torch.no_grad():
        full = every_logits(model, idx)
        cache = KVCache(model, 2)
        steps = [model(idx[:, :5], kv_cache=cache)[0]]  # prefill
        steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 16)]  # one token at a time
    assert cache.length == 16
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)  # from the prefill's last


def test_kv_cache_refuses_several_tokens_at_once_after_the_prefill():
    """forward(idx, kv_cache=...) takes a prefill of any length, then one token at a time. Several new
    tokens after cached positions would need a causal mask aligned bottom-right (query i sees keys
    0..T_past + i), and SDPA's is_causal aligns it top-left (keys 0..i): wrong logits, so the cache refuses.
    (generate() never does this.)"""
    model = tiny_model().eval()
    idx = random_tokens((2, 16), seed=11)
    with torch.no_grad():
        cache = KVCache(model, 2)
        model(idx[:, :5], kv_cache=cache)
        with pytest.raises(AssertionError, match="one token at a time"):
            model(idx[:, 5:9], kv_cache=cache)


@pytest.mark.parametrize("top_k, temperature, prompt_len", [
    (50, 1.0, 5), (0, 1.0, 5), (50, 0.7, 20), (0, 1.5, 20), (1, 1.0, 16)])
def test_sampling_with_kv_cache_draws_the_tokens_of_sampling_without(top_k, temperature, prompt_len):
    """Also past block_size (16): 5 + 30 tokens, and prompts longer than the context (cropped from the left)."""
    model = tiny_model(seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # more peaked distributions (top token ~1-30%), still varied
    prompt = random_tokens((2, prompt_len), seed=12)
    outs = [generate(model, prompt, 30, temperature, top_k, torch.Generator().manual_seed(42), use_cache,
                     stop_at_eot=False) for use_cache in (True, False)]
    kept = min(prompt_len, 16)
    assert outs[0].shape == (2, kept + 30)
    assert torch.equal(outs[0][:, :kept], prompt[:, -kept:])
    assert torch.equal(outs[0], outs[1])
    if top_k != 1:  # real draws, not one token repeated
        assert len(set(outs[0][:, kept:].flatten().tolist())) > 5


@pytest.mark.parametrize("top_k", [0, 50])
def test_temperature_near_zero_samples_the_greedy_tokens(top_k):
    """Temperature divides the logits (after top-k, which keeps their order): near 0 the softmax puts all
    probability on the largest logit, so every draw is the greedy (top-1) token; at 1 the draws vary."""
    model = tiny_model(seed=3).eval()
    prompt = random_tokens((2, 4), seed=5)
    greedy = generate(model, prompt, 20, top_k=1, stop_at_eot=False)
    cold = generate(model, prompt, 20, 1e-4, top_k, torch.Generator().manual_seed(1), stop_at_eot=False)
    warm = generate(model, prompt, 20, 1.0, top_k, torch.Generator().manual_seed(1), stop_at_eot=False)
    assert torch.equal(cold, greedy)
    assert not torch.equal(warm, greedy)


def test_sampling_stops_at_end_of_text(overfit, enc):
    model, _ = overfit
    prompt = torch.tensor([enc.encode_ordinary("Once upon a time")] * 2)
    out = generate(model, prompt, 40, top_k=1)
    assert out.shape == (2, len(enc.encode_ordinary(STORY)) + 1) and (out[:, -1] == EOT).all()
    assert generate(model, prompt, 40, top_k=1, stop_at_eot=False).shape == (2, 4 + 40)
    cfg = SampleConfig(num_samples=2, max_new_tokens=40, top_k=1)
    n_new = out.size(1) - prompt.size(1)  # the story's tokens after the prompt, and <|endoftext|>
    assert complete(model, enc, "Once upon a time", cfg, RT, seed=0) == ([STORY, STORY], 2 * n_new)


def spy_on_generate(monkeypatch):
    """The prompts (as lists of ids) that complete() passes to generate(), collected as it runs."""
    prompts = []

    def generate_spy(model, idx, *args, **kwargs):
        prompts.append(idx.tolist())
        return generate(model, idx, *args, **kwargs)

    monkeypatch.setattr(tg, "generate", generate_spy)
    return prompts


def test_empty_prompt_starts_a_new_story_after_end_of_text(overfit, enc, monkeypatch):
    model, _ = overfit
    prompts = spy_on_generate(monkeypatch)
    cfg = SampleConfig(num_samples=2, max_new_tokens=40, top_k=1)
    assert complete(model, enc, "", cfg, RT, seed=0)[0] == [STORY, STORY]
    assert prompts == [[[EOT], [EOT]]]


def test_a_prompt_is_conditioned_as_in_training_after_end_of_text(overfit, enc, monkeypatch):
    """Every story in training comes after <|endoftext|>: so does a prompt given to --sample."""
    model, _ = overfit
    prompts = spy_on_generate(monkeypatch)
    cfg = SampleConfig(num_samples=1, max_new_tokens=40, top_k=1)
    assert complete(model, enc, "Once upon a time", cfg, RT, seed=0)[0] == [STORY]
    assert prompts == [[[EOT] + enc.encode_ordinary("Once upon a time")]]


def cli_samples(capsys, out_dir, seed, prompt="Once upon a time"):
    rc, out, _ = run_cli(capsys, ["--out-dir", out_dir, "--sample", prompt, "--seed", str(seed),
                                  "--num-samples", "2", "--max-new-tokens", "20", *CPU])
    assert rc == 0
    chunks = re.split(r"^--- sample \d+ ---\n", out, flags=re.M)
    assert chunks[0] == "" and len(chunks) == 3, out
    return [c[:-2] for c in chunks[1:]]  # print() adds "\n" after each "text\n"


def test_cli_samples_start_with_the_prompt_and_repeat_with_the_seed(trained_run, capsys):
    first = cli_samples(capsys, trained_run, seed=7)
    assert all(text.startswith("Once upon a time") and len(text) > len("Once upon a time") for text in first)
    assert cli_samples(capsys, trained_run, seed=7) == first
    assert cli_samples(capsys, trained_run, seed=8) != first


def test_sampling_reads_a_bf16_lm_head_on_a_cpu_and_the_runs_dtype_on_a_gpu():
    """for_sampling: on a CPU the lm_head (tied to wte) in bf16, every other weight fp32, also after a bf16
    run; on a GPU every weight in the run's 16-bit dtype. Eval mode, and logits close to fp32's, either way."""
    idx = random_tokens((1, 12), seed=9)
    with torch.no_grad():
        ref = tiny_model(seed=4)(idx)[0]
    cpu = for_sampling(tiny_model(seed=4).to(torch.bfloat16).train(), Runtime("cpu", torch.bfloat16))
    assert cpu.lm_head.weight.dtype == cpu.transformer.wte.weight.dtype == torch.bfloat16 and not cpu.training
    assert {p.dtype for p in cpu.parameters() if p is not cpu.lm_head.weight} == {torch.float32}
    gpu = for_sampling(tiny_model(seed=4), Runtime("cuda:0", torch.bfloat16))  # (the dtype only: stays on CPU)
    assert {p.dtype for p in gpu.parameters()} == {torch.bfloat16} and not gpu.training
    for model in (cpu, gpu):
        with torch.no_grad():
            got = model(idx)[0]
        assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()


# -----------------------------------------------------------------------------
# 7. Command line: the flags (generated from the config dataclasses), --help, validation, main()'s errors

def test_a_cpu_hears_at_once_that_gpt2_124m_would_take_years_and_a_small_model_trains_without_a_note(
        data_dir, capsys):
    """Before the model is built and probed (minutes for GPT-2 124M on a CPU), preflight estimates the run at
    half the CPU's peak (this file fixes it at 100 GFLOP/s) and points a run of more than 12 hours to 'Train
    on a CPU'; the README's CPU recipe gets no such note."""
    rt = Runtime("cpu", torch.float32)
    tg.preflight(GPTConfig(), TrainConfig(data_dir=data_dir), rt, start_step=0)
    note = capsys.readouterr().out
    assert re.fullmatch(r"note: on cpu this run will take roughly [\d,]+\.\d days\. For one that finishes "
                        r"within an hour or two, see 'Train on a CPU' in README\.md \(Ctrl-C stops and saves\)\.\n", note)
    small = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256)  # the recipe's shape
    tg.preflight(small, TrainConfig(data_dir=data_dir, tokens_per_step=8192, max_steps=200), rt, start_step=0)
    assert capsys.readouterr().out == ""


def test_help_lists_every_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping (textwrap also breaks at hyphens, as in 6e-05)
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cls in (GPTConfig, TrainConfig, SampleConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            entry = re.search(rf"^  {flag}\b(.*?)(?=^  -|\Z)", text, re.M | re.S)
            assert entry, f"{flag} missing from --help"
            if f.default not in (None, "", False):
                assert f"(default: {f.default})" in " ".join(entry.group(1).split()), (flag, entry.group(0))


def test_flags_set_the_config_fields():
    model_cfg, cfg, sample_cfg, given = parse_args(
        ["--n-layer", "3", "--max-lr", "1e-3", "--no-compile", "--resume", "--top-k", "0", "--dtype", "bfloat16"])
    assert (model_cfg.n_layer, model_cfg.n_head) == (3, 12)
    assert (cfg.max_lr, cfg.compile, cfg.resume, cfg.dtype, cfg.batch_size) == (1e-3, False, True, "bfloat16", "auto")
    assert parse_args(["--batch-size", "16"])[1].batch_size == 16
    assert sample_cfg.top_k == 0
    assert given == {"n_layer", "max_lr", "compile", "resume", "top_k", "dtype"}


@pytest.mark.parametrize("argv, message", [
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 must be divisible by --n-head 4"),
    (["--n-layer", "0"], "--n-layer must be positive"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--block-size", "0"], "--block-size must be positive"),
    (["--vocab-size", "100"], "--vocab-size must be at least 50257"),
    (["--min-lr", "1e-2"], "--min-lr <= --max-lr"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--top-k", "-1"], "cannot be negative"),
    (["--dtype", "float64"], "invalid choice"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--batch-size", "many"], "argument --batch-size: expected auto or a whole number, not 'many'"),
    (["--lr", "1e-3"], "unrecognized arguments: --lr 1e-3"),  # not taken as --lr-decay-steps
    (["--device", "gpu"], "--device gpu: unknown"),
    (["--device", "cpu:0"], "--device cpu:0: unknown"),
    (["--weight-decay", "-0.1"], "--weight-decay cannot be negative"),
    (["--tokens-per-step", "0"], "--tokens-per-step must be positive"),
    (["--eval-tokens", "-5"], "--eval-tokens must be positive"),
    (["--grad-accum", "8"], "unrecognized arguments: --grad-accum 8"),  # now --tokens-per-step
    (["--n-layer", "two"], "invalid int value"),
])
def test_invalid_settings_exit_with_status_2_and_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err  # no usage block


def test_missing_data_exits_with_status_1_and_points_to_prepare_tinystories(tmp_path, capsys):
    rc, _, err = run_cli(capsys, ["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out"),
                                  *TINY_FLAGS, *CPU])
    assert_one_line_error(rc, err, "prepare_tinystories.py")


# -----------------------------------------------------------------------------
# Devices and precision: the device, the dtype that "auto" chooses

def test_missing_device_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has a GPU
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda", "--bench", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--device cuda: not available" in err, err


@pytest.mark.parametrize("amx, avx512_bf16, dtype", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                     (False, False, torch.float32)],
                         ids=["AMX", "AVX512-BF16", "neither"])
def test_auto_dtype_of_a_cpu_is_bf16_only_where_it_has_bf16_units(monkeypatch, amx, avx512_bf16, dtype):
    """A CPU with AMX or AVX512-BF16 trains in bf16; without them bf16 is emulated (many times slower than
    fp32), so "auto" means fp32, as on mps. An explicit --dtype is obeyed on every device."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # for "cuda" below
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    assert choose_dtype("auto", "cpu") == dtype
    assert choose_dtype("auto", "mps") == torch.float32
    for device in ("cpu", "cuda", "mps"):
        for name in ("float32", "bfloat16", "float16"):
            assert choose_dtype(name, device) == getattr(torch, name)


@pytest.mark.parametrize("capability, dtype, compiled", [
    ((6, 0), torch.float32, False), ((6, 1), torch.float32, False), ((7, 0), torch.float16, True),
    ((7, 5), torch.float16, True), ((8, 0), torch.bfloat16, True), ((9, 0), torch.bfloat16, True)],
    ids=["P100", "GTX1080", "V100", "T4", "A100", "H100"])
def test_auto_dtype_and_compile_of_a_gpu_follow_its_compute_capability(monkeypatch, capability, dtype, compiled):
    """bf16 from Ampere (8.0) on; fp16 with loss scaling on T4 and V100, whose bf16 is emulated (whatever
    torch.cuda.is_bf16_supported() says); fp32 below 7.0, which has no tensor cores (--dtype float16 stays
    possible there). torch.compile is "auto" only from 7.0 on, where its Triton kernels run."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    assert choose_dtype("auto", "cuda") == choose_dtype("auto", "cuda:1") == dtype
    assert choose_dtype("float16", "cuda") == torch.float16
    assert tg.use_compile(TrainConfig(), Runtime("cuda:0", dtype)) == compiled
    assert tg.use_compile(TrainConfig(compile=True), Runtime("cuda:0", dtype))
    assert not tg.use_compile(TrainConfig(), Runtime("cpu", torch.float32))


DEFAULT_WHEEL = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # CUDA 12.8 and newer builds
CU126_WHEEL = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("capability, archs, runs", [
    ((6, 0), DEFAULT_WHEEL, False), ((7, 0), DEFAULT_WHEEL, False), ((7, 5), DEFAULT_WHEEL, True),
    ((8, 9), DEFAULT_WHEEL, True), ((6, 0), CU126_WHEEL, True), ((7, 0), CU126_WHEEL, True),
    ((9, 0), ["sm_80", "compute_80"], True), ((12, 0), ["sm_80", "sm_90a"], False), ((9, 4), ["gfx90a"], True)],
    ids=["P100-default", "V100-default", "T4-default", "L4-default", "P100-cu126", "V100-cu126", "H100-ptx", "B-old",
         "ROCm"])
def test_a_gpu_that_this_torch_build_has_no_kernels_for_is_a_one_line_error_naming_the_fix(
        monkeypatch, capability, archs, runs):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    if runs:
        choose_dtype("auto", "cuda")
    else:
        fix = "whl/cu126" if capability < (7, 5) else "pip install --upgrade torch"  # older or newer than the build
        with pytest.raises(UserError, match=rf"no kernels for Some GPU \(compute capability {capability[0]}\."
                                            rf"{capability[1]};.*{fix}"):
            choose_dtype("auto", "cuda:0")


def test_a_process_on_cuda_n_sets_that_device_and_syncs_wait_on_it(monkeypatch):
    """--device cuda:1: the process makes GPU 1 its current device (a bare "cuda" and CUDA's context go there,
    not to GPU 0), and timings wait on GPU 1's queue."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: calls.append(("tf32", precision)))
    rt = tg.setup_process(TrainConfig(device="cuda:1"))
    assert (rt.device, rt.dtype) == ("cuda:1", torch.bfloat16)
    tg.sync(rt.device)
    assert calls == [("set_device", "cuda:1"), ("tf32", "high"), ("synchronize", "cuda:1")]


# -----------------------------------------------------------------------------
# MFU: the peak FLOP/s of a device, and the MFU a run logs

def test_peak_flops_of_a_cpu_is_its_faster_measured_matmul_of_fp32_and_the_dtype_in_use(monkeypatch):
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1.5e11, 4e11))
    assert device_peak_flops(Runtime("cpu", torch.float32)) == 1.5e11  # bf16 is not timed: it may be emulated
    assert device_peak_flops(Runtime("cpu", torch.bfloat16)) == 4e11
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1.5e11, 1e10))
    assert device_peak_flops(Runtime("cpu", torch.bfloat16)) == 1.5e11


def test_a_matmul_timing_stops_after_a_second_of_a_slow_dtype(monkeypatch):
    """matmul_flops times a warm-up and up to `reps` matmuls, fewer once a second has passed: an emulated
    bf16 matmul on a CPU without bf16 units can take a minute."""
    clock = iter(range(0, 1000, 2))  # every perf_counter() call: 2 s later
    monkeypatch.setattr(tg.time, "perf_counter", lambda: next(clock))
    assert REAL_MATMUL_FLOPS("cpu", torch.float32, n=8, reps=5) == 2 * 8 ** 3 / 2  # the warm-up and one timing
    assert next(clock) == 12  # start, two timings of two calls each, one look at the clock that stops it


MEASURED = 77e12  # what the faked matmul_flops measures


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 PCIe", torch.bfloat16, ("H100 PCIe", 0)),  # the most specific name first: not the H100 SXM's
    ("NVIDIA L40S", torch.bfloat16, ("L40S", 0)),  # "L4" (looked up first here) matches whole words only
    ("Tesla T4", torch.bfloat16, ("T4", 1)),  # no bf16 units: bf16 runs at the fp32 rate
    ("NVIDIA RTX A6000", torch.bfloat16, None),  # not in the table: measured
    ("NVIDIA H100 NVL", torch.bfloat16, ("H[12]00 NVL", 0)), ("NVIDIA H200 NVL", torch.bfloat16, ("H[12]00 NVL", 0)),
    ("NVIDIA GH200 480GB", torch.bfloat16, ("G?H[12]00", 0)), ("NVIDIA H200", torch.bfloat16, ("G?H[12]00", 0)),
    ("NVIDIA GeForce RTX 4070 Ti", torch.bfloat16, ("RTX 4070 Ti", 0)),
    ("NVIDIA GeForce RTX 3090 Ti", torch.bfloat16, ("RTX 3090 Ti", 0)),
    ("NVIDIA GeForce RTX 4090 D", torch.bfloat16, ("RTX 4090 D", 0)),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", torch.bfloat16, None),  # a slice of the GPU: measured
    ("Tesla P100-PCIE-16GB", torch.float32, ("P100", 1)),
    ("NVIDIA GeForce RTX 3060 Ti", torch.bfloat16, None), ("NVIDIA GeForce RTX 4070 Ti SUPER", torch.bfloat16, None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", torch.bfloat16, None)])  # other chips than the rows': measured
def test_gpu_peak_flops_come_from_the_datasheet_of_that_gpu_only(monkeypatch, name, dtype, peak):
    """Known GPUs: their datasheet's peak (GPU_PEAKS: fp16/bf16 tensor cores, fp32) for the dtype in use.
    Any other GPU is measured: the peak of a GPU whose name is only part of this one's would be wrong."""
    monkeypatch.setattr(tg, "GPU_PEAKS", {"L4": tg.GPU_PEAKS["L4"], **tg.GPU_PEAKS})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5) if "T4" in name else (8, 9))
    monkeypatch.setattr(tg, "matmul_flops", lambda device, dtype, n=1024, reps=5: MEASURED if n == 8192 else 0)
    expected = MEASURED if peak is None else tg.GPU_PEAKS[peak[0]][peak[1]] * 1e12
    assert device_peak_flops(Runtime("cuda:0", dtype)) == expected


@pytest.mark.parametrize("world", [1, 2])
def test_logged_mfu_is_the_flops_per_second_of_one_device_over_its_peak(world, data_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """MFU = achieved FLOP/s over the peak FLOP/s of the hardware that achieved them. Under torchrun a step's
    tokens (--tokens-per-step) are shared by `world` devices, so the step's FLOPs are
    measured against world x one device's peak. world=2 runs in this process, as rank 0 of a gloo group
    of one: it then does its share of the step, and the logged MFU must be that share over one peak."""
    peak = 1e9
    monkeypatch.setattr(tg, "device_peak_flops", lambda rt: peak)
    model_cfg = GPTConfig(**TINY)
    cfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "run"), batch_size=2, tokens_per_step=2 * 16 * 2,
                      max_steps=3, warmup_steps=1, eval_interval=100, eval_tokens=2 * 16, compile=False)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        train(model_cfg, cfg, Runtime("cpu", torch.float32, rank=0, world=world))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    logged = [float(m) for m in re.findall(r"MFU ([\d.]+)%", capsys.readouterr().out)]
    steps = [m for m in read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl")) if "train_loss" in m]
    step_flops = flops_per_token(model_cfg) * cfg.tokens_per_step
    expected = [100 * step_flops / (m["ms"] / 1000) / (world * peak) for m in steps]
    assert len(logged) == len(expected) == 3
    assert logged == pytest.approx(expected, rel=0.01, abs=0.06)


# -----------------------------------------------------------------------------
# --bench

@pytest.mark.parametrize("compile_flag, compile_note", [("--no-compile", "off"),
                                                        ("--compile", r"-?[\d.]+ s \(first step minus a later one\)")],
                         ids=["no_compile", "compile"])
def test_bench_reports_training_speed_mfu_memory_compile_and_sampling_speed(monkeypatch, capsys, compile_flag,
                                                                            compile_note):
    """With --compile, torch.compile runs with backend="eager" (Inductor takes minutes on this CPU): the same
    wrapper, so bench reports a compile time."""
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1e11, 2e11))
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend="eager"))
    rc, out, _ = run_cli(capsys, ["--bench", *TINY_FLAGS, *CPU, compile_flag, "--batch-size", "2",
                                  "--max-new-tokens", "8"])
    assert rc == 0
    lines = out.splitlines()

    def line(prefix):
        found = [x for x in lines if x.startswith(prefix)]
        assert len(found) == 1, (prefix, lines)
        return found[0]

    assert re.search(r"[\d,]+ tok/s .* MFU [\d.]+% of 0.10 TFLOP/s", line("train:"))
    assert re.fullmatch(rf"peak memory: [\d.]+ GiB \| compile: {compile_note}", line("peak memory"))
    assert re.search(r"[\d,]+ tok/s \(batch 1, 8 new tokens\)", line("sample (KV cache):"))
    assert re.search(r"[\d,]+ tok/s \(batch 1, 8 new tokens\)", line("sample (no cache):"))


# -----------------------------------------------------------------------------
# The bookkeeping of a run: resume, checkpoints, metrics, signals. Never lose a run: stopped by a signal,
# a crash or kill -9, a run resumes bit-exactly; a damaged or hostile checkpoint is a one-line error.

@contextmanager
def signal_during_micro_batch(n, *signums):
    """Deliver the signals, one after another, while the loader hands out the n-th micro-batch (1-based)
    of the run; yields the list of micro-batches handed out after that one (there should be none)."""
    real, calls, after = tg.DataLoader.next_batch, [], []

    def next_batch(self):
        calls.append(1)
        if len(calls) == n:
            for signum in signums:
                signal.raise_signal(signum)
        elif len(calls) > n:
            after.append(len(calls))
        return real(self)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg.DataLoader, "next_batch", next_batch)
        yield after


LONG_STEPS = ["--batch-size", "1", "--max-steps", "6"]  # steps of 8 micro-batches of 1 x 16 tokens


@pytest.fixture(scope="module")
def long_steps_run(data_dir, tmp_path_factory):
    """The uninterrupted run of LONG_STEPS that the test below compares with: out_dir."""
    out = str(tmp_path_factory.mktemp("long_steps"))
    assert main(train_args(data_dir, out, *LONG_STEPS)) == 0
    return out


@pytest.mark.parametrize("signums", [[signal.SIGTERM], [signal.SIGTERM, signal.SIGTERM]], ids=["one", "two"])
def test_a_signal_in_the_middle_of_a_long_step_stops_at_the_next_micro_batch_and_resumes_bit_exact(
        signums, data_dir, long_steps_run, tmp_path, capsys):
    """Steps of 8 micro-batches (1 x 16 tokens): SIGTERM during the 3rd micro-batch of step 4 stops before
    the 4th; the step's gradients are dropped, ckpt.pt holds the state at its start (step 3, the loader
    back there too), and the resumed run ends bit-exact as an uninterrupted one. Two SIGTERMs in a row
    (a scheduler's, then torchrun's) are the same request."""
    out = str(tmp_path / "cut")
    with signal_during_micro_batch(3 * 8 + 3, *signums) as after:
        rc, printed, _ = run_cli(capsys, train_args(data_dir, out, *LONG_STEPS))
    assert rc == 128 + signal.SIGTERM and after == [] and printed.count("stopping at the next micro-batch") == 1
    assert "checkpoint of step 3 saved" in printed and "Continue with: python train_gpt2.py --resume" in printed
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["loader"] == {"epoch": 0, "window": 3 * 8}
    assert run_cli(capsys, resume_command(printed))[0] == 0
    a, b = (load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (long_steps_run, out))
    assert_same(a["model"], b["model"], "model")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")


def test_a_signal_during_an_evaluation_stops_it_and_saves_the_step_before_it(data_dir, reference, tmp_path, capsys):
    """An evaluation can take minutes (the default validation set is 1.3M tokens): a SIGTERM during the one
    at step 4 stops it there, and ckpt.pt is the state after 4 steps; the resumed run is the same run."""
    out = str(tmp_path / "run")
    real, calls = tg.evaluate, []

    def evaluate(model, batches, rt, stop=lambda: False):
        calls.append(1)
        if len(calls) == 2:  # the evaluation at step 4 (eval_interval 4)
            signal.raise_signal(signal.SIGTERM)
        return real(model, batches, rt, stop)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "evaluate", evaluate)
        rc, printed, _ = run_cli(capsys, train_args(data_dir, out))
    assert rc == 128 + signal.SIGTERM and "checkpoint of step 4 saved" in printed
    assert not any(m["step"] == 4 and "val_loss" in m for m in read_metrics(os.path.join(out, "metrics.jsonl")))
    assert run_cli(capsys, resume_command(printed))[0] == 0
    assert_same_run(out, reference)


@background_job("test_a_run_killed_long_after_its_last_step_checkpoint_resumes_from_one_written_by_time")
def killed_with_checkpoints_by_time(ctx):
    out = str(ctx.tmp / "ckpt_minutes")
    proc = start_training(train_args(ctx.data_dir, out, "--ckpt-interval", "1000", "--ckpt-minutes", "0.0001"),
                          ctx.env)
    for line in proc.stdout:
        if line.startswith("step     4 | loss"):
            proc.kill()
            break
    proc.wait()
    return out


def test_a_run_killed_long_after_its_last_step_checkpoint_resumes_from_one_written_by_time(
        background, reference, capsys):
    """--ckpt-interval 1000 would write no checkpoint before the end; --ckpt-minutes (here 6 ms) writes one
    whenever that much time has passed since the last. kill -9 at step 4, then --resume: the same run."""
    out = background.result("killed_with_checkpoints_by_time")
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] >= 3
    rc, printed, err = run_cli(capsys, ["--resume", "--out-dir", out])
    assert rc == 0, err
    assert_same_run(out, reference)


def test_resume_after_a_signal_at_step_k_is_bit_exact(data_dir, reference, tmp_path, capsys):
    """Stopped during the k-th step, for k = 1, 5 (SIGINT, as Ctrl-C; SIGTERM otherwise), 8 (just before the
    step that crosses into epoch 1), 9 and N (the last step), each time resumed with the command the run
    printed (--resume --out-dir only, so every setting comes from the checkpoint): at each stop ckpt.pt holds
    exactly the uninterrupted run's weights and optimizer after k steps, and the metrics its first k steps;
    resumed after the last stop, the run ends with the weights, optimizer and metrics of the uninterrupted run.
    (One run, stopped five times: as many steps as one run. Fresh runs stopped at other steps: stopped_at_4,
    the fp16 test, the signal during an evaluation.)"""
    out = str(tmp_path / "run")
    args, done = train_args(data_dir, out), 0
    for k, signum in [(1, signal.SIGTERM), (5, signal.SIGINT), (8, signal.SIGTERM), (9, signal.SIGTERM),
                      (10, signal.SIGTERM)]:
        with signal_during_step(k - done, signum):  # the (k - done)-th step of this process is step k
            rc, printed, _ = run_cli(capsys, args)
        assert rc == 128 + signum
        assert done == 0 or f"resuming {out}/ckpt.pt at step {done}" in printed
        ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
        assert ckpt["step"] == k
        assert_state_after_step(ckpt, reference)
        assert [m["step"] for m in read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m] \
            == list(range(k))
        args, done = resume_command(printed), k
    rc, printed, _ = run_cli(capsys, args)
    assert rc == 0
    assert f"resuming {out}/ckpt.pt at step {done}" in printed
    assert_same_run(out, reference)


def test_metrics_after_a_crash_and_resume_have_each_step_once_in_order(data_dir, reference, tmp_path, capsys):
    """A crash (an exception, as an out-of-memory would raise) during step 8 leaves ckpt.pt at step 6 and
    metrics.jsonl with lines up to step 6; the resumed run drops that line and logs steps 6.. once."""
    out, real, calls = str(tmp_path / "run"), tg.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "train_step", train_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(train_args(data_dir, out))
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 6
    steps = [m["step"] for m in read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m]
    assert steps == list(range(7))  # step 6 was logged after the checkpoint of step 6: it is redone
    assert run_cli(capsys, ["--resume", "--out-dir", out])[0] == 0
    assert_same_run(out, reference)


def test_resume_survives_a_torn_last_line_in_metrics(stopped_at_4, reference, tmp_path, capsys):
    """A crash in the middle of appending to metrics.jsonl (power loss, a full disk) leaves half a JSON
    line at its end. The run must still resume (that line belongs to a step after the checkpoint)."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped_at_4, out)  # stopped by SIGTERM during step 4
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "train_loss": 10.7')  # cut short
    rc, _, err = run_cli(capsys, ["--resume", "--out-dir", out])
    assert rc == 0, err
    assert_same_run(out, reference)


def kill_chain(data_dir, out, env, seed, n_kills):
    """Start training, `kill -9` it, copy what is on disk (for the test to look at), resume (or start afresh
    when no checkpoint was written yet), kill again, ... n_kills times. (The test then resumes to the end.)
    The first kill lands during start-up (0-0.5 s after the process starts: it is still importing
    torch), before any checkpoint. Each later one comes from random.Random(seed): wait until the
    process prints "step s | loss" for some s >= a target step, then sleep 0-150 ms more (a step takes
    ~80 ms here, a checkpoint write tens of ms), so kills land in steps, evaluations and checkpoint writes.
    Returns one record per kill, with the copy of out_dir that the kill left ("left")."""
    rng, records = random.Random(seed), []
    ckpt_path = os.path.join(out, "ckpt.pt")
    targets = [-1] + sorted(rng.randrange(0, N_STEPS) for _ in range(n_kills - 1))
    for target in targets:
        delay = rng.uniform(0, 0.5) if target < 0 else rng.uniform(0, 0.15)
        resumed = os.path.exists(ckpt_path)
        args = ["--resume", "--out-dir", out] if resumed else train_args(data_dir, out)
        proc = start_training(args, env)
        if target >= 0:
            for line in proc.stdout:
                match = re.match(r"step\s+(\d+) \| loss", line)
                if match and int(match[1]) >= target:
                    break
        time.sleep(delay)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.communicate()
        leftovers = glob.glob(os.path.join(out, "*.tmp*"))  # of the files that atomic_write replaces
        left = f"{out}.kill{len(records)}"
        if os.path.exists(out):
            shutil.copytree(out, left)
        records.append(dict(target=target, delay=round(delay, 3), returncode=proc.returncode, resumed=resumed,
                            tmp_files=sorted(os.path.basename(p).split(".tmp")[0] for p in leftovers), left=left))
        if proc.returncode == 0:  # it finished before the kill
            break
    return records


@background_job("test_kill_9_at_random_moments_then_resume_is_bit_exact")
def kill_9_chain(ctx):
    out = str(ctx.tmp / "kill_9")
    return out, kill_chain(ctx.data_dir, out, ctx.env, seed=4, n_kills=5)


def test_kill_9_at_random_moments_then_resume_is_bit_exact(background, data_dir, reference, capsys):
    """Five `kill -9` in one run: one during start-up, four at seeded moments in steps, evaluations and
    checkpoint writes. After each, ckpt.pt loads and holds exactly the state of its step (a leftover
    ckpt.pt.tmp* is never read); before the first checkpoint, --resume says there is none. Resumed
    after the last kill, the run ends bit-exactly as the uninterrupted one."""
    out, records = background.result("kill_9_chain")
    for record in records:  # what each kill left on disk
        ckpt_path = os.path.join(record["left"], "ckpt.pt")
        if os.path.exists(ckpt_path):
            ckpt = load_checkpoint(ckpt_path)  # never torn: it loads after every kill
            assert_state_after_step(ckpt, reference)  # and holds exactly the state of its step
            record["ckpt_step"] = ckpt["step"]
        else:  # killed before the first checkpoint: --resume says there is none (and starts nothing)
            record["ckpt_step"] = None
            rc, _, err = run_cli(capsys, ["--resume", "--out-dir", record["left"]])
            assert_one_line_error(rc, err, "no checkpoint")
    args = ["--resume", "--out-dir", out] if os.path.exists(os.path.join(out, "ckpt.pt")) else train_args(data_dir, out)
    assert main(args) == 0
    assert_same_run(out, reference)
    print(records)
    assert records[0]["returncode"] == -signal.SIGKILL and records[0]["ckpt_step"] is None
    assert any(r["ckpt_step"] is not None and r["returncode"] == -signal.SIGKILL for r in records)


def test_leftover_temporary_files_are_never_read_as_a_checkpoint(stopped_at_4, reference, tmp_path, capsys):
    """A kill during a checkpoint write leaves ckpt.pt.tmp<pid> next to ckpt.pt. Even when that file
    holds a newer, valid checkpoint, resume reads ckpt.pt only; with no ckpt.pt, there is none."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped_at_4, out)  # stopped by SIGTERM during step 4
    newer = open(os.path.join(reference.out, "ckpt.pt"), "rb").read()  # step 10
    open(os.path.join(out, "ckpt.pt.tmp99999"), "wb").write(newer)
    open(os.path.join(out, "metrics.jsonl.tmp99999"), "w").write("not json\n")
    rc, printed, _ = run_cli(capsys, ["--resume", "--out-dir", out])
    assert rc == 0 and f"resuming {out}/ckpt.pt at step 4" in printed
    assert_same_run(out, reference)
    only_tmp = str(tmp_path / "only_tmp")
    os.makedirs(only_tmp)
    open(os.path.join(only_tmp, "ckpt.pt.tmp99999"), "wb").write(newer)
    assert_one_line_error(*run_cli(capsys, ["--resume", "--out-dir", only_tmp])[::2], "no checkpoint")


def test_resume_removes_temporary_files_left_by_a_killed_run(stopped_at_4, reference, tmp_path, capsys):
    """Each kill during a checkpoint write leaves a ckpt.pt.tmp<pid> as big as a checkpoint (1.5 GB for
    GPT-2 124M with AdamW's state); nothing ever removes them, so a preempted run that is resumed many
    times fills its disk. The resumed run (the only writer of out_dir) should delete them."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped_at_4, out)  # stopped by SIGTERM during step 4
    for name in ("ckpt.pt.tmp99999", "metrics.jsonl.tmp99999"):
        open(os.path.join(out, name), "wb").write(b"left by a killed process")
    assert run_cli(capsys, ["--resume", "--out-dir", out])[0] == 0
    assert glob.glob(os.path.join(out, "*.tmp*")) == []


@background_job("test_sigterm_to_a_training_process_saves_prints_how_to_resume_and_exits_128_plus_15")
def sigterm_from_outside(ctx):
    """Returns (out_dir, exit status, what the process printed)."""
    out = str(ctx.tmp / "sigterm")
    proc = start_training(train_args(ctx.data_dir, out), ctx.env)
    printed = ""
    for line in proc.stdout:
        printed += line
        if line.startswith("step     3 | loss"):
            break
    proc.send_signal(signal.SIGTERM)
    printed += proc.communicate(timeout=120)[0]
    return out, proc.returncode, printed


def test_sigterm_to_a_training_process_saves_prints_how_to_resume_and_exits_128_plus_15(
        background, reference, capsys):
    """A real signal from outside, as a cloud's preemption notice (Ctrl-C's SIGINT goes the same way:
    test_resume_after_a_signal_at_step_k_is_bit_exact sends both in-process)."""
    signum = signal.SIGTERM
    out, returncode, printed = background.result("sigterm_from_outside")
    assert returncode == 128 + signum, printed
    saved_step = int(re.search(r"stopped by SIG\w+: checkpoint of step (\d+)", printed)[1])
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == saved_step
    assert_state_after_step(ckpt, reference)
    assert not glob.glob(os.path.join(out, "*.tmp*"))
    assert run_cli(capsys, resume_command(printed))[0] == 0
    assert_same_run(out, reference)


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling calls os.system("touch MARKER")."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def damage(name, reference, path, marker):
    """Write a damaged or hostile ckpt.pt at path."""
    good = open(os.path.join(reference.out, "ckpt.pt"), "rb").read()
    if name == "truncated":  # a copy cut short
        open(path, "wb").write(good[:len(good) // 2])
    elif name == "empty":  # a copy that never started (full disk, interrupted cp)
        open(path, "wb").close()
    elif name == "garbage":
        open(path, "wb").write(np.random.default_rng(0).bytes(4096))
    elif name == "runs_code":  # a checkpoint someone sent you, with a payload
        torch.save({**reference.ckpt, "step": RunsCodeWhenUnpickled(marker)}, path)
    elif name == "not_a_dict":
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize("mode", ["--resume", "--sample", "--export-hf"])
@pytest.mark.parametrize("damaged", ["truncated", "empty", "garbage", "runs_code", "not_a_dict"])
def test_damaged_or_hostile_checkpoint_gives_a_one_line_error_and_runs_no_code(
        damaged, mode, reference, data_dir, tmp_path, capsys):
    out, marker, export = str(tmp_path / "run"), str(tmp_path / "MARKER"), str(tmp_path / "export")
    os.makedirs(out)
    damage(damaged, reference, os.path.join(out, "ckpt.pt"), marker)
    args = {"--resume": ["--resume"], "--sample": ["--sample", "Hi", "--max-new-tokens", "2"],
            "--export-hf": ["--export-hf", export]}[mode]
    rc, _, err = run_cli(capsys, ["--out-dir", out, "--data-dir", data_dir, *args])
    assert_one_line_error(rc, err, os.path.join(out, "ckpt.pt"))
    assert not os.path.exists(marker), "the pickle's code ran"
    assert not os.path.exists(export)
    assert sorted(os.listdir(out)) == ["ckpt.pt"]  # nothing written, nothing replaced


def test_the_hostile_checkpoint_payload_is_live(reference, tmp_path):
    """Unpickled in full (weights_only=False), the payload above does run: the no-code check can fail."""
    path, marker = str(tmp_path / "ckpt.pt"), str(tmp_path / "MARKER")
    damage("runs_code", reference, path, marker)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_resume_with_another_model_shape_gives_a_one_line_error(data_dir, reference, tmp_path, capsys):
    out = str(tmp_path / "run")
    copy_run(reference.out, out, ["ckpt.pt"])
    rc, _, err = run_cli(capsys, ["--resume", "--out-dir", out, "--n-layer", "3"])
    assert_one_line_error(rc, err, "--n-layer 3 differs from 2")


def test_resume_of_a_checkpoint_whose_weights_do_not_fit_its_config_gives_a_one_line_error(
        reference, tmp_path, capsys):
    """A checkpoint whose saved config says 3 layers but holds 2 layers' weights (edited, or mixed up):
    --sample and --export-hf say so in one line; --resume must too (not a load_state_dict traceback)."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    ckpt = {**reference.ckpt, "config": {**reference.ckpt["config"],
                                         "model": {**reference.ckpt["config"]["model"], "n_layer": 3}}}
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    rc, _, err = run_cli(capsys, ["--out-dir", out, "--sample", "Hi", "--max-new-tokens", "2"])
    assert_one_line_error(rc, err, "do not fit")
    rc, _, err = run_cli(capsys, ["--resume", "--out-dir", out])
    assert_one_line_error(rc, err)


def finite_if_float(x):
    return not isinstance(x, float) or np.isfinite(x)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, reference, tmp_path, capsys):
    """The loss of step 7 turns nan (injected, as a hardware fault or a bad batch would): a one-line error
    that names the last good checkpoint (step 6), which stays as it was, finite and exact; no nan reaches
    metrics.jsonl; resumed, the run then ends exactly as if nothing had happened."""
    out, real_step, real_loss, calls = str(tmp_path / "run"), tg.train_step, tg.chunked_cross_entropy, []
    saved = {}

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            saved["ckpt"] = open(os.path.join(out, "ckpt.pt"), "rb").read()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tg, "chunked_cross_entropy", lambda *a, **k: real_loss(*a, **k) * float("nan"))
                return real_step(*args, **kwargs)
        return real_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "train_step", train_step)
        rc, _, err = run_cli(capsys, train_args(data_dir, out))
    assert_one_line_error(rc, err, "nan", "at step 6", f"{out}/ckpt.pt (step 6)", "--max-lr")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == saved["ckpt"]
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert_state_after_step(ckpt, reference)
    metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in metrics if "train_loss" in m] == list(range(6))
    assert all(finite_if_float(v) for m in metrics for v in m.values())
    assert run_cli(capsys, ["--resume", "--out-dir", out])[0] == 0
    assert_same_run(out, reference)


def test_non_finite_loss_before_the_first_checkpoint_says_none_was_written(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, _, err = run_cli(capsys, train_args(data_dir, out, "--max-lr", "1e6", "--warmup-steps", "1"))
    assert_one_line_error(rc, err, "nan", "no checkpoint was written yet")
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def assert_plain(x, where="ckpt"):
    """Only tensors, numbers, strings, None, lists, tuples and dicts with string keys."""
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert x is None or type(x) in (torch.Tensor, int, float, str, bool), f"{where}: {type(x)}"


def test_checkpoint_holds_plain_types_and_unprefixed_keys_even_with_compile(data_dir, reference, tmp_path, capsys):
    """torch.load(weights_only=True) reads it; no '_orig_mod.' key although the model ran compiled.
    Inductor takes ~130 s to compile even this tiny model on this CPU, so torch.compile runs with
    backend="eager": the same OptimizedModule wrapper, whose own state_dict keys do carry the prefix."""
    assert_plain(torch.load(os.path.join(reference.out, "ckpt.pt"), weights_only=True))
    real_compile, compiled = torch.compile, []

    def compile_eager(model, **kwargs):
        compiled.append(real_compile(model, backend="eager"))
        return compiled[-1]

    out = str(tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", compile_eager)
        assert run_cli(capsys, train_args(data_dir, out, "--compile", "--max-steps", "2"))[0] == 0
    assert compiled and all(k.startswith("_orig_mod.") for k in compiled[0].state_dict())
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert_plain(ckpt)
    assert ckpt["model"].keys() == reference.ckpt["model"].keys()
    assert ckpt["config"]["train"]["compile"] is True


def test_warmup_note_judges_the_settings_the_run_really_uses(data_dir, reference, tmp_path, capsys):
    """A resumed run takes --warmup-steps from its checkpoint (3 here), not from the default (100)."""
    out = str(tmp_path / "run")
    copy_run(reference.out, out)
    rc, printed, _ = run_cli(capsys, ["--resume", "--out-dir", out, "--max-steps", str(N_STEPS + 1)])
    assert rc == 0 and "note: --warmup-steps" not in printed
    rc, printed, _ = run_cli(capsys, train_args(data_dir, str(tmp_path / "new"), "--max-steps", "1",
                                                "--warmup-steps", "2"))
    assert rc == 0 and "note: --warmup-steps 2 >= --max-steps 1" in printed


@pytest.mark.parametrize("saved_before_lr_decay_steps", [False, True], ids=["checkpoint", "older_checkpoint"])
def test_an_extended_run_keeps_its_schedule_and_goes_on_at_the_floor(
        data_dir, reference, tmp_path, capsys, saved_before_lr_decay_steps):
    """--resume --max-steps 13 after a 10-step run: the cosine was fixed at 10 steps when the run started
    (also for a checkpoint from before lr_decay_steps existed), so steps 10-12 run at --min-lr; the LR
    never jumps back up. Flags that change how the model computes (--attention) may be given anew."""
    out = str(tmp_path / "run")
    copy_run(reference.out, out)
    assert reference.ckpt["config"]["train"]["lr_decay_steps"] == N_STEPS
    if saved_before_lr_decay_steps:
        ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
        del ckpt["config"]["train"]["lr_decay_steps"]
        torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    rc, printed, err = run_cli(capsys, ["--resume", "--out-dir", out, "--max-steps", "13", "--attention", "manual"])
    assert rc == 0, err
    lrs = [m["lr"] for m in read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m]
    assert lrs[:N_STEPS] == [m["lr"] for m in reference.metrics if "lr" in m]
    assert lrs[N_STEPS:] == [TrainConfig().min_lr] * 3 and lrs[N_STEPS - 1] > lrs[N_STEPS]
    saved = load_checkpoint(os.path.join(out, "ckpt.pt"))["config"]
    assert saved["train"]["lr_decay_steps"] == N_STEPS and saved["model"]["attention"] == "manual"


def test_fresh_run_where_a_checkpoint_exists_is_refused(data_dir, reference, tmp_path, capsys):
    out = str(tmp_path / "run")
    copy_run(reference.out, out)
    rc, _, err = run_cli(capsys, train_args(data_dir, out))
    assert_one_line_error(rc, err, "--resume", f"{out}/ckpt.pt exists")
    for name in ("ckpt.pt", "metrics.jsonl"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(reference.out, name), "rb").read()


def test_init_from_into_a_directory_with_a_checkpoint_is_refused(data_dir, reference, hf_dir, tmp_path, capsys):
    """--init-from starts a new run too: it must not overwrite another run's ckpt.pt and metrics.jsonl."""
    out = str(tmp_path / "run")
    copy_run(reference.out, out)
    args = ["--data-dir", data_dir, "--out-dir", out, "--init-from", hf_dir, *TRAIN_ARGS, "--max-steps", "2"]
    rc, _, err = run_cli(capsys, args)
    for name in ("ckpt.pt", "metrics.jsonl"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(reference.out, name), "rb").read(), \
            f"{name} was overwritten"
    assert_one_line_error(rc, err, "--resume")


def test_resume_converts_a_checkpoint_that_counted_the_step_in_micro_batches(stopped_at_4, reference, tmp_path, capsys):
    """Checkpoints of older versions saved --grad-accum and --eval-batches (micro-batches of --batch-size, or
    of 64 with auto) and no --lr-decay-steps: --resume reads them as the same step and validation set in
    tokens, and the run ends bit-exact as the reference."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped_at_4, out)  # stopped by SIGTERM during step 4
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    old = ckpt["config"]["train"]
    for name in ("tokens_per_step", "eval_tokens", "lr_decay_steps"):
        del old[name]
    old.update(grad_accum=2, eval_batches=2)  # 2 x 4 x 16 = 128 tokens, as TRAIN_ARGS
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    rc, printed, err = run_cli(capsys, ["--resume", "--out-dir", out])
    assert rc == 0, err
    assert "128 tokens per step = 2 micro-batches of 4 x 16" in printed
    assert_same_run(out, reference)
    assert {"tokens_per_step": 128, "eval_tokens": 128}.items() <= \
        load_checkpoint(os.path.join(out, "ckpt.pt"))["config"]["train"].items()


def test_resume_keeps_the_dtype_the_run_was_started_with(data_dir, tmp_path, capsys):
    """A run started with --dtype bfloat16, resumed with the printed command (no --dtype), must go on in
    bfloat16, as it goes on with every other saved setting. (Here dtype "auto" means float32.)"""
    out = str(tmp_path / "run")
    small = ["--batch-size", "2", "--tokens-per-step", "32", "--eval-tokens", "32"]  # bf16 is emulated on most CPUs
    with signal_during_step(1, signal.SIGTERM):
        rc, printed, _ = run_cli(capsys, train_args(data_dir, out, "--dtype", "bfloat16", "--max-steps", "2", *small))
    assert rc == 128 + signal.SIGTERM and "device cpu, bfloat16" in printed
    rc, printed, _ = run_cli(capsys, resume_command(printed))
    assert rc == 0
    assert "device cpu, bfloat16" in printed, printed.splitlines()[:2]


# -----------------------------------------------------------------------------
# Memory: the micro-batch that fits (--batch-size auto), out of memory, resume with another micro-batch

@background_job("test_keep_freed_memory_keeps_a_freed_buffer_in_the_process_for_the_next_step")
def freed_memory(ctx):
    """A new process frees a 256 MB block with malloc's defaults, then again after keep_freed_memory()."""
    script = ("import os, torch, train_gpt2\n"
              "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
              "def freed():\n"
              "    x = torch.ones(2**26)\n    before = rss()\n    del x\n    return before - rss()\n"
              "default = freed()\nkept = train_gpt2.keep_freed_memory()\nprint(kept, default, freed())")
    return run_in_background([sys.executable, "-c", script], ctx.env)


def test_keep_freed_memory_keeps_a_freed_buffer_in_the_process_for_the_next_step(background):
    """glibc hands a freed 256 MB block straight back to the OS (it came from mmap(), so the next step gets
    it back as fresh pages, a fault each); after keep_freed_memory() it stays in the process. (One new process,
    which frees the block first with malloc's defaults, then after keep_freed_memory().)"""
    r = background.result("freed_memory")
    kept, *freed = r.stdout.split()
    assert kept == "True", r.stderr
    freed = dict(zip(("default", "keep"), map(int, freed)))
    assert freed["default"] > 200e6 and freed["keep"] < 10e6, freed


@pytest.mark.parametrize("free_gib, dtype, first", [(15, torch.float16, 16), (31.7, torch.float16, 32),
                                                    (11.5, torch.bfloat16, 16), (23.5, torch.bfloat16, 32),
                                                    (79, torch.bfloat16, 64)],
                         ids=["T4", "V100-32GB", "RTX3060", "RTX4090", "A100-80GB"])
def test_auto_micro_batch_on_a_gpu_probes_first_the_largest_its_free_memory_predicts(
        monkeypatch, free_gib, dtype, first):
    """GPT-2 124M: the first probe (one compile) is the micro-batch that memory_needed() predicts for the
    GPU's free memory, the sizes of README's "Which GPU?"; the probe confirms it."""
    probed = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 0))
    monkeypatch.setattr(tg, "probe_step", lambda runner, model, B, rt: (probed.append(B), (None, "room"))[1])
    model = types.SimpleNamespace(config=GPTConfig())  # only its shape is read
    assert tg.fit_micro_batch(model, model, TrainConfig(), Runtime("cuda:0", dtype)) == first
    assert probed == [first]


def out_of_memory_above(limit):
    """GPT.forward that raises CUDA's out-of-memory error for micro-batches above `limit`, as a GPU would."""
    real = GPT.forward

    def forward(self, idx, targets=None, kv_cache=None):
        if targets is not None and idx.size(0) > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {idx.size(0)} GiB")
        return real(self, idx, targets, kv_cache)
    return forward


def test_auto_micro_batch_halves_until_it_fits_and_trains_as_that_micro_batch_given(data_dir, tmp_path, capsys):
    """--batch-size auto with room for 8 sequences: 64, 32 and 16 fail, 8 fits, and on a CPU (which cannot
    tell how close 8 came to the limit) it takes 4, with 16 micro-batches in the step of 1,024 tokens asked
    for. The run equals the one given --batch-size 4, bit for bit, and one given --batch-size 8 up to float
    rounding (each with the same 64 validation windows)."""
    args = ["--max-steps", "1", "--tokens-per-step", "1024", "--eval-tokens", "1024"]
    auto = str(tmp_path / "auto")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GPT, "forward", out_of_memory_above(8))
        rc, printed, err = run_cli(capsys, train_args(data_dir, auto, *args, "--batch-size", "auto"))
    assert rc == 0, err
    for b in (64, 32, 16):
        assert f"micro-batch {b} x 16 does not fit (CUDA out of memory. Tried to allocate {b} GiB); trying {b // 2}" \
            in printed
    assert "micro-batch 8 x 16 fits, maybe only just: taking 4, for headroom" in printed
    assert "1,024 tokens per step = 16 micro-batches of 4 x 16" in printed
    runs = {}
    for b in (4, 8):
        runs[b] = str(tmp_path / f"b{b}")
        assert run_cli(capsys, train_args(data_dir, runs[b], *args, "--batch-size", str(b)))[0] == 0
    metrics = {name: without_timing(read_metrics(os.path.join(d, "metrics.jsonl")))
               for name, d in (("auto", auto), (4, runs[4]), (8, runs[8]))}
    assert metrics["auto"] == metrics[4]
    losses = {name: [m.get("train_loss", m.get("val_loss")) for m in log] for name, log in metrics.items()}
    assert losses[8] == pytest.approx(losses[4], rel=1e-5)
    assert_same(load_checkpoint(os.path.join(auto, "ckpt.pt"))["model"],
                load_checkpoint(os.path.join(runs[4], "ckpt.pt"))["model"], "model")


def test_resume_with_another_micro_batch_continues_the_same_run(stopped_at_4, reference, tmp_path, capsys):
    """Stopped after step 4 of 2 micro-batches of 4 x 16, continued with --batch-size 2 (as on a smaller GPU):
    the step and the validation set are counted in tokens, so they keep their windows in 4 micro-batches,
    and the run is the same up to float rounding. A micro-batch that does not divide the step is refused."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped_at_4, out)  # stopped by SIGTERM during step 4
    assert_one_line_error(*run_cli(capsys, ["--resume", "--out-dir", out, "--batch-size", "3"])[::2],
                          "--tokens-per-step 128 is not a multiple of 3 x 16 x 1")
    rc, printed, err = run_cli(capsys, ["--resume", "--out-dir", out, "--batch-size", "2"])
    assert rc == 0, err
    assert "changed: batch_size" in printed and "128 tokens per step = 4 micro-batches of 2 x 16" in printed
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == N_STEPS and ckpt["loader"] == reference.ckpt["loader"]
    for k, v in reference.ckpt["model"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-6)
    losses = [m.get("train_loss", m.get("val_loss")) for m in read_metrics(os.path.join(out, "metrics.jsonl"))]
    assert losses == pytest.approx([m.get("train_loss", m.get("val_loss")) for m in reference.metrics], rel=1e-5)


# `python train_gpt2.py ARGS` (with the fixed timing) under `ulimit -v`: its address space may grow by sys.argv[1]
# KiB beyond what importing train_gpt2 took (set from inside, after the import: a CUDA build of torch maps more).
LIMITED_MAIN = ("import resource, sys, train_gpt2\n"
                "size = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')][0])\n"
                "limit = (size + int(sys.argv.pop(1))) * 1024\n"
                "resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
                + FIXED_TIMING_MAIN)


@background_job("test_out_of_memory_with_an_explicit_micro_batch_is_one_line_and_auto_finds_one_that_fits")
def under_ulimit(ctx):
    """The two runs under `ulimit -v`, --batch-size 64 and auto: (out_dir of auto, their results)."""
    data, out = ctx.tmp / "ulimit_data", ctx.tmp / "ulimit_auto"
    data.mkdir()
    write_shard(str(data / "tinystories_train_000.bin"), story_tokens(ctx.enc, make_stories(200, seed=1)))
    write_shard(str(data / "tinystories_val_000.bin"), story_tokens(ctx.enc, make_stories(200, seed=2)))
    flags = ["--data-dir", str(data), "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
             "--loss", "plain", *CPU, "--tokens-per-step", "1024", "--max-steps", "1", "--warmup-steps", "1",
             "--eval-tokens", "256", "--eval-sample-tokens", "0"]
    command = [sys.executable, "-c", LIMITED_MAIN, "500000", *flags]
    return out, [run_in_background([*command, *args], ctx.env) for args in
                 (["--batch-size", "64", "--out-dir", str(ctx.tmp / "ulimit_explicit")], ["--out-dir", str(out)])]


def test_out_of_memory_with_an_explicit_micro_batch_is_one_line_and_auto_finds_one_that_fits(background):
    """A real failed allocation: the process runs under `ulimit -v`, with 0.5 GB of address space beyond what
    importing train_gpt2 takes, where the textbook loss's (B*T, V) logits of 64 x 16 tokens (0.2 GB, several
    times over) cannot be allocated (micro-batches of 16 to 32 fit). --batch-size 64 stops with one line; auto
    finds a smaller micro-batch and trains."""
    out_dir, (explicit, auto) = background.result("under_ulimit")
    err = explicit.stderr
    assert explicit.returncode == 1 and err.startswith("error: out of memory (") and err.count("\n") == 1, err
    assert "can't allocate memory" in err and "--batch-size auto" in err
    out = auto.stdout
    assert auto.returncode == 0, out[-2000:] + auto.stderr[-2000:]
    assert "micro-batch 64 x 16 does not fit ([enforce fail" in out and "can't allocate memory" in out
    accum, chosen = map(int, re.search(r"^model: .* 1,024 tokens per step = (\d+) micro-batches of (\d+) x 16", out,
                                       re.M).groups())
    assert chosen < 64 and chosen * accum == 64
    assert load_checkpoint(str(out_dir / "ckpt.pt"))["step"] == 1


# -----------------------------------------------------------------------------
# fp16 with loss scaling, for GPUs without bf16 units. fp16 matmuls are slow on most CPUs (no fp16 units):
# these runs are few and short, with small steps (32 tokens: 2 micro-batches of 1 x 16).

FP16 = ["--dtype", "float16", "--max-lr", "1e-2", "--warmup-steps", "1", "--batch-size", "1", "--tokens-per-step", "32",
        "--eval-tokens", "32"]


def inject_at_step(k, hook):
    """Monkeypatch train_step so that during its k-th call (1-based) hook(model) is applied first; hook
    returns what to undo afterwards (a hook handle), or None."""
    real, calls = tg.train_step, []

    def train_step(model, *args, **kwargs):
        calls.append(1)
        handle = hook(model) if len(calls) == k else None
        try:
            return real(model, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
    return train_step


def test_fp16_with_loss_scaling_lowers_the_loss_and_resumes_bit_exact_after_a_signal(data_dir, tmp_path, capsys):
    out, cut = str(tmp_path / "run"), str(tmp_path / "cut")
    args = [*FP16, "--max-steps", "6", "--eval-interval", "3"]
    rc, printed, _ = run_cli(capsys, train_args(data_dir, out, *args))
    assert rc == 0 and "device cpu, float16" in printed and "| scale 65536" in printed
    steps = [m for m in read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 1 and all(m["loss_scale"] > 0 for m in steps)
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["scaler"]["scale"] == steps[-1]["loss_scale"]
    with signal_during_step(3, signal.SIGTERM):
        rc, printed, _ = run_cli(capsys, train_args(data_dir, cut, *args))
    assert rc == 128 + signal.SIGTERM
    assert run_cli(capsys, resume_command(printed))[0] == 0
    resumed = load_checkpoint(os.path.join(cut, "ckpt.pt"))
    for key in ("model", "optimizer", "scaler"):
        assert_same(resumed[key], ckpt[key], key)
    assert without_timing(read_metrics(os.path.join(cut, "metrics.jsonl"))) == \
        without_timing(read_metrics(os.path.join(out, "metrics.jsonl")))


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale_but_a_nan_loss_still_stops_the_run(
        data_dir, tmp_path, capsys):
    """An inf gradient at a finite loss (what an fp16 overflow gives) during step 1: the step is skipped
    and logged so, the loss scale halves, the run goes on. A nan loss is a divergence, fp16 or not."""
    out = str(tmp_path / "run")
    overflow = inject_at_step(2, lambda model: model.transformer.wpe.weight.register_hook(lambda g: g * float("inf")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "train_step", overflow)
        rc, printed, err = run_cli(capsys, train_args(data_dir, out, *FP16, "--max-steps", "3"))
    assert rc == 0, err
    assert re.search(r"^step     1 \| .* \| skipped: fp16 overflow$", printed, re.M), printed
    steps = [m for m in read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m]
    assert [m["grad_norm"] is None for m in steps] == [False, True, False]
    assert steps[1]["loss_scale"] == steps[0]["loss_scale"] / 2 == steps[2]["loss_scale"]
    nan_loss = inject_at_step(1, lambda model: model.transformer.ln_f.register_forward_hook(lambda m, i, o: o * float("nan")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "train_step", nan_loss)
        rc, _, err = run_cli(capsys, train_args(data_dir, str(tmp_path / "nan"), *FP16, "--max-steps", "3"))
    assert_one_line_error(rc, err, "the loss became nan", "no checkpoint was written yet")


# -----------------------------------------------------------------------------
# The chunked loss: the value and gradients of the plain cross-entropy over every logit

@pytest.mark.parametrize("N, chunk", [(37, 8), (37, 2048), (32, 16), (150, 2048), (150, 100)])
def test_chunked_cross_entropy_equals_plain_cross_entropy_over_the_real_vocabulary(N, chunk):
    C, padded = 16, 50304
    g = torch.Generator().manual_seed(N + chunk)
    x = torch.randn(N, C, generator=g, requires_grad=True)
    weight = (0.1 * torch.randn(padded, C, generator=g)).requires_grad_()  # padded rows are not zero here
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:2] = torch.tensor([0, V - 1])
    loss = ChunkedCrossEntropy.apply(x, weight, targets, V, chunk)
    (3.0 * loss).backward()  # an upstream gradient other than 1
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss_ref = F.cross_entropy(x_ref @ w_ref[:V].T, targets)
    (3.0 * loss_ref).backward()
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-8)
    assert torch.allclose(weight.grad, w_ref.grad, rtol=1e-4, atol=1e-9)
    assert torch.count_nonzero(weight.grad[V:]) == 0  # padded rows: no gradient
    with torch.no_grad():  # evaluation's path: no autograd Function
        loss_no_grad = chunked_cross_entropy(x, weight, targets, V, chunk)
    assert loss_no_grad.item() == pytest.approx(loss.item(), rel=1e-6)


def test_plain_cross_entropy_over_all_logits_gives_the_chunked_loss_and_its_gradients():
    """--loss plain (F.cross_entropy over every position's logits) against the chunked loss: the same
    value and the same gradient for every parameter, the tied matrix's padded rows included (zero)."""
    x, y = random_tokens((3, 16), seed=14), random_tokens((3, 16), seed=15)
    models = {name: tiny_model(seed=6, loss=name) for name in ("chunked", "plain")}
    results = {}
    for name, model in models.items():
        logits, loss = model(x, y)
        loss.backward()
        results[name] = (logits, loss.item(), {n: p.grad for n, p in model.named_parameters()})
    assert results["chunked"][0] is None and results["plain"][0].shape == (3, 16, V)
    assert results["plain"][1] == pytest.approx(results["chunked"][1], rel=1e-6)
    for n, grad in results["chunked"][2].items():
        assert torch.allclose(results["plain"][2][n], grad, rtol=1e-4, atol=1e-7), n
    assert torch.count_nonzero(results["plain"][2]["transformer.wte.weight"][V:]) == 0


# -----------------------------------------------------------------------------
# GPT-2's BPE file: checked by its sha256, and not needed for training

def test_bpe_file_of_the_wrong_content_is_rejected_by_its_sha256(tmp_path, monkeypatch):
    bogus = tmp_path / "r50k_base.tiktoken"
    bogus.write_text("SGVsbG8= 0\n")
    monkeypatch.setenv(BPE_FILE_ENV, str(bogus))
    with pytest.raises(UserError, match="sha256"):
        get_tokenizer()
    monkeypatch.setenv(BPE_FILE_ENV, str(tmp_path / "missing.tiktoken"))
    with pytest.raises(UserError, match="no such file"):
        get_tokenizer()


def test_training_without_the_bpe_file_goes_on_without_samples(data_dir, reference, tmp_path, capsys, monkeypatch):
    """Training reads token shards only: on a machine without GPT-2's BPE (no internet, no $GPT2_BPE_FILE),
    it trains all the same, without the samples, and says so."""
    monkeypatch.setenv(BPE_FILE_ENV, str(tmp_path / "missing.tiktoken"))
    out = str(tmp_path / "run")
    rc, printed, err = run_cli(capsys, train_args(data_dir, out, "--max-steps", "2", "--lr-decay-steps", str(N_STEPS)))
    assert rc == 0, err
    assert "note: no samples at the evaluations: GPT2_BPE_FILE=" in printed and "sample:" not in printed
    metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["train_loss"] for m in metrics if "train_loss" in m] == \
        [m["train_loss"] for m in reference.metrics if "train_loss" in m][:2]
    assert not any("sample" in m for m in metrics)


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 in and out: load_hf, --init-from, --export-hf (weights, tokenizer, model card)

PROMPT = "Once upon a time there was a little girl"


@pytest.fixture(scope="module")
def transformers():
    import transformers  # a test dependency (README's test command installs it): never skipped
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_tiny_model(transformers, **config):
    """A random HF GPT-2 (2 layers, 2 heads, 32 channels, 64 positions) whose every tensor, LayerNorms and
    biases included, is random, so that a mix-up of any two tensors shows."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, **config)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def hf_model(transformers):
    return hf_tiny_model(transformers)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf"))
    hf_model.save_pretrained(d)
    return d


HF_STEP = ["--tokens-per-step", "512", "--eval-tokens", "512"]  # 2 micro-batches of 4 x 64: hf_dir's context


def our_model(config, state_dict):
    model = GPT(config)
    model.load_state_dict(state_dict)
    return model.eval()


def test_hf_gpt2_loaded_with_load_hf_gives_hf_logits_and_greedy_text(hf_model, hf_dir, enc):
    config, weights = load_hf(hf_dir)
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (2, 2, 32, 64, 50257)
    ours = our_model(config, weights)
    idx = torch.tensor([enc.encode_ordinary(PROMPT)])
    with torch.no_grad():
        diff = (every_logits(ours, idx) - hf_model(idx).logits).abs().max().item()
    print(f"max |logit difference| import: {diff:.3g}")
    assert diff < 1e-5
    n = 24
    ours_ids = generate(ours, idx, n, top_k=1, stop_at_eot=False)  # top-1 sampling = greedy
    hf_ids = hf_model.generate(idx, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=EOT)
    assert ours_ids.shape == (1, idx.size(1) + n)
    assert ours_ids.tolist() == hf_ids.tolist()
    assert enc.decode(ours_ids[0].tolist()) == enc.decode(hf_ids[0].tolist())


def test_load_hf_reads_a_pytorch_model_bin_and_a_hub_name_and_says_what_is_missing(
        hf_model, hf_dir, transformers, tmp_path, monkeypatch):
    """The other sources of --init-from give the same weights as model.safetensors: an older directory's
    pytorch_model.bin, and a hub name (transformers' from_pretrained, here without a network). A directory
    without config.json or weights, or a hub name that cannot be fetched, is one line that says so."""
    _, expected = load_hf(hf_dir)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    torch.save(hf_model.state_dict(), old / "pytorch_model.bin")
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", lambda name: hf_model)
    for source in (str(old), "gpt2"):
        _, weights = load_hf(source)
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    (old / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="has neither model.safetensors nor pytorch_model.bin"):
        load_hf(str(old))
    with pytest.raises(UserError, match="has no config.json: not a Hugging Face model directory"):
        load_hf(str(tmp_path))

    def offline(name):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.\nCheck ...")
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", offline)
    with pytest.raises(UserError, match=r"--init-from gpt2: not a directory, and the hub has no such model or "
                                        r"cannot be reached \(We couldn't connect"):
        load_hf("gpt2")


@pytest.mark.parametrize("option", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)],
                         ids=["scale_attn_by_inverse_layer_idx", "no_scale_attn_weights"])
def test_load_hf_refuses_gpt2_variants_it_would_compute_differently(option, transformers, tmp_path):
    """scale_attn_by_inverse_layer_idx (e.g. Stanford CRFM's GPT-2s) and scale_attn_weights=False change
    the attention: loading such a model as plain GPT-2 silently gives other logits. Refuse it, or match."""
    hf = hf_tiny_model(transformers, **option)
    hf.save_pretrained(str(tmp_path))
    try:
        config, weights = load_hf(str(tmp_path))
    except UserError:
        return
    idx = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        diff = (every_logits(our_model(config, weights), idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-5, f"load_hf accepted {option} but computes another model (max |diff| {diff:.3g})"


def test_every_hf_gpt2_124m_weight_name_and_shape_maps_both_ways(transformers, tmp_path, monkeypatch):
    """GPT(GPTConfig()) exported gives exactly HF GPT-2 124M's tensors (names and shapes; lm_head.weight is
    tied to wte), and HF's state_dict imported gives exactly ours. HF's model is built on the meta device;
    no file of 124M weights is written or read, and our init is skipped (only names and shapes count)."""
    monkeypatch.setattr(GPT, "_init_weights", lambda self, module, generator: None)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours = GPT(GPTConfig())
    written = {}
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save", lambda tensors, metadata=None: written.update(tensors) or b"")
    export_hf(ours, str(tmp_path / "export"))
    hf_shapes.pop("lm_head.weight")  # tied to wte: neither HF's files nor ours hold it
    assert {k: tuple(v.shape) for k, v in written.items()} == hf_shapes
    exported = transformers.GPT2Config.from_pretrained(str(tmp_path / "export"))
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                 "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings"):
        assert getattr(exported, name) == getattr(transformers.GPT2Config(), name), name
    # import: HF's (meta) tensors through load_hf's renaming, transposes and padding
    os.makedirs(tmp_path / "hf")
    json.dump(transformers.GPT2Config().to_dict(), open(tmp_path / "hf" / "config.json", "w"))
    open(tmp_path / "hf" / "model.safetensors", "wb").close()
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path: hf.state_dict())
    config, sd = load_hf(str(tmp_path / "hf"))
    assert config == GPTConfig()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_export_hf_of_a_trained_run_loads_in_transformers_with_the_same_logits(
        transformers, reference, enc, tmp_path, capsys):
    d = str(tmp_path / "export")
    rc, printed, _ = run_cli(capsys, ["--export-hf", d, "--out-dir", reference.out])
    assert rc == 0 and d in printed
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(d, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    hf.eval()
    ours = load_weights(GPT(GPTConfig(**reference.ckpt["config"]["model"])), reference.ckpt["model"], "ckpt").eval()
    idx = torch.tensor([enc.encode_ordinary(PROMPT)[:16]])
    with torch.no_grad():
        diff = (every_logits(ours, idx) - hf(idx).logits).abs().max().item()
    print(f"max |logit difference| export: {diff:.3g}")
    assert diff < 1e-5
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)


def test_hf_model_imported_with_init_from_and_exported_again_is_the_same_file(
        hf_dir, data_dir, tmp_path, capsys):
    """--init-from an HF directory, one step at learning rate 0 (weights unchanged, a ckpt.pt written),
    --export-hf: every tensor of HF's own model.safetensors comes back bit for bit (HF leaves out the
    tied lm_head.weight; if it is there, it equals wte)."""
    from safetensors.torch import load_file
    out, export = str(tmp_path / "run"), str(tmp_path / "export")
    args = ["--data-dir", data_dir, "--out-dir", out, "--init-from", hf_dir, *TRAIN_ARGS, *HF_STEP,
            "--max-steps", "1", "--max-lr", "0", "--min-lr", "0"]
    assert run_cli(capsys, args)[0] == 0
    assert run_cli(capsys, ["--export-hf", export, "--out-dir", out])[0] == 0
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = load_file(os.path.join(export, "model.safetensors"))
    if "lm_head.weight" in original:
        assert torch.equal(original.pop("lm_head.weight"), original["transformer.wte.weight"])
    assert_same(exported, original, "model.safetensors")


def test_a_zero_step_run_from_init_from_writes_the_checkpoint_it_reports(hf_dir, data_dir, tmp_path, capsys):
    """--init-from DIR --max-steps 0 evaluates an HF model on our data; its last line names a checkpoint
    (to --sample from, or to --resume with more steps), so that checkpoint must exist."""
    out = str(tmp_path / "run")
    args = ["--data-dir", data_dir, "--out-dir", out, "--init-from", hf_dir, *TRAIN_ARGS, *HF_STEP, "--max-steps", "0"]
    rc, printed, _ = run_cli(capsys, args)
    assert rc == 0 and f"checkpoint: {out}/ckpt.pt" in printed
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 0


def test_init_from_then_sample_prints_completions_of_the_prompt(hf_dir, tmp_path, capsys):
    args = ["--init-from", hf_dir, "--out-dir", str(tmp_path / "none"), "--sample", PROMPT,
            "--num-samples", "2", "--max-new-tokens", "8", "--device", "cpu"]
    rc, printed, err = run_cli(capsys, args)
    assert rc == 0, err
    samples = re.split(r"--- sample \d+ ---\n", printed)[1:]
    assert len(samples) == 2
    for text in samples:
        assert text.startswith(PROMPT) and len(text.strip()) > len(PROMPT)
    assert not os.path.exists(tmp_path / "none")  # sampling writes nothing


# Two stories of TinyStories itself (Eldan & Li 2023, CDLA-Sharing-1.0), one with curly quotes.
REAL_STORIES = [
    "Once upon a time, there was a girl named Sue. Sue had long hair that would remind her of a rainbow. She would "
    "play with her hair all day.\nOne day, Sue saw a slow snail in her garden. The snail had a pretty shell. Sue "
    "wanted to be friends with the snail. She named the snail Sam.\nSue and Sam played together every day. They "
    "would race, but Sam was always slow. Sue would laugh and clap her hands. Sue and Sam were very happy.",
    "Once there was a little chick. She was only three years old. She wanted to fly so bad, but she was still too "
    "young.\nOne day, her mommy encouraged her. She said \u201cyou can do it!\u201d The little chick was so excited. "
    "She flew up in the air.\nThe sky was so clear and blue."]
HARD_STRINGS = ["naïve café, Straße, 北京, مرحبا, Ελληνικά", "emoji 🐶🐱, 👩‍👩‍👧 and 🇫🇷, 👍🏽", "  two  spaces,\ttab\n\n\nlines\r\n",
                "I'M sure you'll don't 12345678 3.14", "a literal <|endoftext|> in the text", " leading space", "",
                "\u200bzero width\u00a0nbsp e\u0301 combining", "\x00\x07 control"]


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory):
    """The reference run exported with --export-hf: the directory."""
    d = str(tmp_path_factory.mktemp("export") / "model")
    assert main(["--export-hf", d, "--out-dir", reference.out]) == 0
    return d


def test_export_writes_gpt2s_own_tokenizer_files_and_the_samplers_defaults(exported, reference):
    """vocab.json and merges.txt, rebuilt from r50k_base's ranks, are byte for byte OpenAI's encoder.json
    and vocab.bpe (the sha256 that tiktoken pins for them in tiktoken_ext/openai_public.py)."""
    import hashlib
    assert sorted(os.listdir(exported)) == ["README.md", "config.json", "generation_config.json", "merges.txt",
                                            "model.safetensors", "special_tokens_map.json", "tokenizer_config.json",
                                            "vocab.json"]
    sha = {name: hashlib.sha256(open(os.path.join(exported, name), "rb").read()).hexdigest()
           for name in ("vocab.json", "merges.txt")}
    assert sha == {"vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                   "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
    generation = json.load(open(os.path.join(exported, "generation_config.json")))
    assert {k: generation[k] for k in ("do_sample", "top_k", "temperature", "eos_token_id", "max_length")} == \
        {"do_sample": True, "top_k": 50, "temperature": 1.0, "eos_token_id": EOT, "max_length": 16}


def test_exported_tokenizer_gives_tiktokens_ids_after_end_of_text_offline(exported, transformers, enc):
    """AutoTokenizer of the export, offline: exactly tiktoken's ids on real stories and hard strings, with
    <|endoftext|> first as --sample conditions a prompt; decode gives the text back."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    for text in REAL_STORIES + make_stories(5, seed=3) + HARD_STRINGS:
        ids = tokenizer(text)["input_ids"]
        assert ids == [EOT] + enc.encode_ordinary(text), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_pipeline_of_the_export_writes_what_sample_writes_and_init_from_gets_the_weights_back(
        exported, reference, transformers, capsys):
    """pipeline("text-generation") with greedy decoding continues a prompt exactly as --sample --top-k 1;
    --init-from the export gives back the checkpoint's weights, bit for bit."""
    prompt = "Once upon a time"
    generator = transformers.pipeline("text-generation", model=exported)
    hf_text = generator(prompt, do_sample=False, max_new_tokens=10)[0]["generated_text"]
    rc, printed, _ = run_cli(capsys, ["--out-dir", reference.out, "--sample", prompt, "--top-k", "1",
                                      "--num-samples", "1", "--max-new-tokens", "10", *CPU])
    assert rc == 0 and printed == f"--- sample 1 ---\n{hf_text}\n\n"
    _, weights = load_hf(exported)
    assert_same(weights, reference.ckpt["model"], "weights")


def test_model_card_says_what_the_run_was_and_its_final_validation_loss(exported, reference):
    card = open(os.path.join(exported, "README.md"), encoding="utf-8").read()
    front, body = card.split("---\n")[1:3]
    assert {"license: mit", "datasets: [roneneldan/TinyStories]", "pipeline_tag: text-generation", "language: [en]"} <= \
        set(front.splitlines())
    final = [m for m in reference.metrics if "val_loss" in m][-1]
    assert final["step"] == N_STEPS and f"**{final['val_loss']:.4f}**" in body and "1.24" in body
    assert f"steps of 128 tokens (micro-batches of 4 x 16): {N_STEPS * 128:,} tokens seen" in body
    assert re.search(r"^> Once upon a time", body, re.M)  # the export's own sample
    assert 'pipeline("text-generation"' in body and "## Limits" in body


def test_export_twice_gives_the_same_bytes_and_never_overwrites_other_files(exported, reference, tmp_path, capsys):
    again = str(tmp_path / "again")
    for _ in range(2):  # into a new directory, then into the same one again
        assert run_cli(capsys, ["--export-hf", again, "--out-dir", reference.out])[0] == 0
        for name in os.listdir(exported):
            assert open(os.path.join(again, name), "rb").read() == open(os.path.join(exported, name), "rb").read(), name
    other = tmp_path / "repo"
    other.mkdir()
    (other / "README.md").write_text("a project's own README")
    rc, _, err = run_cli(capsys, ["--export-hf", str(other), "--out-dir", reference.out])
    assert_one_line_error(rc, err, "holds other files (README.md)")
    assert (other / "README.md").read_text() == "a project's own README" and os.listdir(other) == ["README.md"]


# -----------------------------------------------------------------------------
# --plot

def colour_columns(image, hex_colour, tol=0.03):
    """Columns of an RGB(A) float image that hold a pixel of this colour."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    match = (np.abs(image[:, :, :3] - rgb) < tol).all(axis=2)
    return np.flatnonzero(match.any(axis=0))


def test_plot_draws_train_and_val_loss_to_a_png(reference, tmp_path, capsys):
    import matplotlib.image
    out = str(tmp_path / "run")
    copy_run(reference.out, out, ["metrics.jsonl"])
    rc, printed, _ = run_cli(capsys, ["--plot", "--out-dir", out])
    assert rc == 0 and "loss.png" in printed
    image = matplotlib.image.imread(os.path.join(out, "loss.png"))
    height, width = image.shape[:2]
    assert height > 300 and width > 500
    # The curves, not only the legend: each colour spans most of the plot's width. Matplotlib's first
    # two colours: C0 (train) and C1 (validation).
    for colour in ("#1f77b4", "#ff7f0e"):
        columns = colour_columns(image, colour)
        assert len(columns) and columns.max() - columns.min() > 0.6 * width, colour


def test_plot_without_training_steps_gives_a_one_line_error(reference, tmp_path, capsys):
    empty = str(tmp_path / "empty")
    assert_one_line_error(*run_cli(capsys, ["--plot", "--out-dir", empty])[::2], "metrics.jsonl: train first")
    val_only = str(tmp_path / "val_only")
    os.makedirs(val_only)
    with open(os.path.join(val_only, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val_loss": 10.8, "tokens": 0}) + "\n")
    assert_one_line_error(*run_cli(capsys, ["--plot", "--out-dir", val_only])[::2], "no training steps")
    assert not os.path.exists(os.path.join(val_only, "loss.png"))


# -----------------------------------------------------------------------------
# Data-parallel training under torchrun: 2 CPU processes with gloo. One uninterrupted run is shared by the
# comparison with a single process and by the kill-and-resume test.

DDP_ARGS = [*TINY_FLAGS, *CPU, "--no-compile", "--batch-size", "2", "--tokens-per-step", "128", "--max-steps", "8",
            "--warmup-steps", "2", "--max-lr", "3e-3", "--min-lr", "3e-4", "--eval-interval", "3",
            "--eval-tokens", "64", "--eval-sample-tokens", "8", "--ckpt-interval", "3"]


def torchrun_command(args, script=False):
    """`torchrun --standalone --nproc_per_node=2 train_gpt2.py ARGS`; unless `script`, each process runs
    main() with the fixed matmul timing instead of the script itself (the same code, minus seconds of
    timing)."""
    target = [SCRIPT] if script else ["--no-python", sys.executable, "-c", FIXED_TIMING_MAIN]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args]


def torchrun(args, env, script=False):
    return run_in_background(torchrun_command(args, script), env)


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


@background_job("test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch",
                "test_ddp_run_killed_after_a_checkpoint_resumes_under_torchrun_to_the_same_weights")
def ddp_uninterrupted(ctx):
    out = str(ctx.tmp / "ddp")
    return out, torchrun(["--data-dir", ctx.data_dir, "--out-dir", out, *DDP_ARGS], ctx.env)


def ddp_run(background):
    """The one uninterrupted run of DDP_ARGS under torchrun. Returns (out_dir, stdout)."""
    out, r = background.result("ddp_uninterrupted")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, r.stdout


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(background, data_dir, tmp_path):
    single_out = str(tmp_path / "single")  # (first, while the torchrun run may still be running)
    assert main(["--data-dir", data_dir, "--out-dir", single_out, *DDP_ARGS]) == 0
    ddp_out, stdout = ddp_run(background)
    assert stdout.count("step     4 | loss") == 1  # only rank 0 prints
    ddp_log = read_metrics(os.path.join(ddp_out, "metrics.jsonl"))
    one_log = read_metrics(os.path.join(single_out, "metrics.jsonl"))
    assert [m["step"] for m in ddp_log] == [m["step"] for m in one_log]
    for a, b in zip(ddp_log, one_log):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)
    wa, wb = final_weights(ddp_out), final_weights(single_out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


# Each process of the run below finds room for another micro-batch: 16 sequences on rank 0, 8 on rank 1.
OOM_PER_RANK_MAIN = ("import os, sys, torch, train_gpt2 as t; real = t.GPT.forward; "
                     "room = {'0': 16, '1': 8}[os.environ['RANK']]\n"
                     "def forward(self, idx, targets=None, kv_cache=None):\n"
                     "    if targets is not None and idx.size(0) > room: raise torch.cuda.OutOfMemoryError('CUDA out of memory')\n"
                     "    return real(self, idx, targets, kv_cache)\n"
                     "t.GPT.forward = forward; " + FIXED_TIMING_MAIN.removeprefix("import sys, torch, train_gpt2 as t; "))


DDP_AUTO_ARGS = [*DDP_ARGS, "--batch-size", "auto", "--tokens-per-step", "2048", "--eval-tokens", "256", "--max-steps", "1"]


@background_job("test_ddp_with_auto_micro_batch_takes_the_smallest_that_fits_on_every_process")
def ddp_auto_micro_batch(ctx):
    out = str(ctx.tmp / "ddp_auto")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
               sys.executable, "-c", OOM_PER_RANK_MAIN, *DDP_AUTO_ARGS, "--data-dir", ctx.data_dir, "--out-dir", out]
    return out, run_in_background(command, ctx.env)


def test_ddp_with_auto_micro_batch_takes_the_smallest_that_fits_on_every_process(background, data_dir, tmp_path):
    """Two processes whose devices fit 16 and 8 sequences (on a CPU each takes half, for headroom: 8 and 4):
    both run micro-batches of 4, the step keeps its 2,048 tokens, and the run equals one process given
    --batch-size 4 with the same step."""
    single = str(tmp_path / "single")  # (first, while the torchrun run may still be running)
    assert main([*DDP_AUTO_ARGS, "--data-dir", data_dir, "--out-dir", single, "--batch-size", "4"]) == 0
    ddp, r = background.result("ddp_auto_micro_batch")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2,048 tokens per step = 2 processes x 16 micro-batches of 4 x 16" in r.stdout
    ddp_log, one_log = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (ddp, single))
    assert [m["step"] for m in ddp_log] == [m["step"] for m in one_log]
    for a, b in zip(ddp_log, one_log):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)


def test_a_step_that_the_micro_batches_of_every_process_do_not_divide_is_refused_in_one_line(
        data_dir, tmp_path, capsys):
    """--tokens-per-step must be a multiple of micro-batch x block size x processes. train() says so before
    any collective (here as process 0 of 2, in this process: 96 tokens are 3 micro-batches of 2 x 16, which
    2 processes cannot share), and main() prints it as one line."""
    cfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "two"), batch_size=2, tokens_per_step=96,
                      compile=False)
    with pytest.raises(UserError, match=r"^--tokens-per-step 96 is not a multiple of 2 x 16 x 2 "):
        train(GPTConfig(**TINY), cfg, Runtime("cpu", torch.float32, rank=0, world=2))
    rc, _, err = run_cli(capsys, train_args(data_dir, str(tmp_path / "one"), "--tokens-per-step", "100"))
    assert_one_line_error(rc, err, "--tokens-per-step 100 is not a multiple of 4 x 16 x 1")


@background_job("test_ddp_run_killed_after_a_checkpoint_resumes_under_torchrun_to_the_same_weights")
def ddp_killed_and_resumed(ctx):
    """Returns (out_dir, a copy of the ckpt.pt that the kill left, the result of the resumed run)."""
    out = str(ctx.tmp / "ddp_cut")
    args = ["--data-dir", ctx.data_dir, "--out-dir", out, *DDP_ARGS]
    p = nice(subprocess.Popen(torchrun_command(args), cwd=REPO, env=ctx.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True))
    for line in p.stdout:  # wait for the first checkpoint (step 3), then kill every process of the run
        if line.startswith("step     4 | loss"):
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.wait()
    left = f"{out}.killed.pt"
    if os.path.exists(os.path.join(out, "ckpt.pt")):
        shutil.copy(os.path.join(out, "ckpt.pt"), left)
    return out, left, torchrun([*args, "--resume"], ctx.env)


def test_ddp_run_killed_after_a_checkpoint_resumes_under_torchrun_to_the_same_weights(background):
    out, left, r = background.result("ddp_killed_and_resumed")  # (the last job: none runs after this test)
    ddp_out, _ = ddp_run(background)
    assert load_checkpoint(left)["step"] in (3, 6)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wa, wb = final_weights(ddp_out), final_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# -----------------------------------------------------------------------------
# prepare_tinystories.py: a local HTTP server plays Hugging Face, serving small files in TinyStories'
# format; it supports Range requests and can be told to drop connections or to answer with an error status.

def messy_stories(n, seed):
    """n stories for the parser rather than the model: paragraphs, quotes, digits, non-ASCII text,
    spaces at line ends."""
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
    """The two files, as bytes, by name: 40 val stories and 300 train stories (more than one task)."""
    return {prep.FILES["val"]: tinystories_text(messy_stories(40, seed=1)).encode(),
            prep.FILES["train"]: tinystories_text(messy_stories(300, seed=2)).encode()}


@pytest.fixture
def local_source(tmp_path, texts, background):
    """A directory holding the two files, for --source DIR. (Its tests fork pools of workers: no other thread
    may run by then, so the background jobs must have ended.)"""
    background.join()
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


def run_prepare(source, out_dir, *flags):
    """prepare_tinystories.main, with small shards and no waiting between download retries."""
    argv = ["--source", str(source), "--out-dir", str(out_dir), "--workers", "1", "--shard-size", "3000",
            "--retry-wait", "0", *flags]
    return prep.main([str(a) for a in argv])


def split_tokens(out_dir, split):
    """All tokens of a split, found the way train_gpt2's DataLoader finds them."""
    return np.concatenate([read_shard(p) for p in tg.shard_paths(str(out_dir), split)])


def shards_by_name(out_dir):
    """Every shard in out_dir, name -> bytes."""
    paths = sorted(glob.glob(os.path.join(out_dir, "*.bin")))
    return {os.path.basename(p): open(p, "rb").read() for p in paths}


def last_line(err):
    return err.strip().splitlines()[-1]


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


def test_download_and_tokenize_gives_every_story_in_order_followed_by_eot(server, texts, enc, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_prepare(server.url, out) == 0
    printed = capsys.readouterr().out
    marker = json.load(open(out / "done.json"))
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


def test_every_progress_bar_ends_at_100_percent(server, tmp_path, capsys):
    """The download bars and one bar per shard, also for a shard that is not full (each split's last)."""
    assert run_prepare(server.url, tmp_path / "out") == 0
    bars = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n") if "|" in line]  # final states
    assert len([b for b in bars if " shard " in b]) > 2 and len(bars) > 4, bars
    assert all(re.match(r"[^:]+: 100%\|", b) for b in bars), bars


def test_shards_are_byte_identical_for_any_worker_count(local_source, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BLOCK_BYTES", 700)  # many small tasks, so the workers really interleave
    assert run_prepare(local_source, tmp_path / "w1", "--workers", 1) == 0
    assert run_prepare(local_source, tmp_path / "w3", "--workers", 3) == 0
    one, three = shards_by_name(tmp_path / "w1"), shards_by_name(tmp_path / "w3")
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
    assert run_prepare(server.url, tmp_path / "out") == 0
    assert (train, f"bytes={size // 2}-") in server.requests  # the retry asked only for the rest
    assert run_prepare(local_source, tmp_path / "clean") == 0
    assert shards_by_name(tmp_path / "out") == shards_by_name(tmp_path / "clean")
    assert open(tmp_path / "out" / train, "rb").read() == texts[train]


def test_server_without_range_support_gets_the_download_restarted(server, texts, tmp_path, capsys):
    server.ranges = False
    train = prep.FILES["train"]
    tries = []

    def drop_first_two_tries(name, start, size):
        tries.append(name)
        return size // 2 if name == train and tries.count(train) <= 2 else size
    server.stop_at = drop_first_two_tries
    assert run_prepare(server.url, tmp_path / "out") == 0  # the second try gains nothing, the third completes
    assert tries.count(train) == 3
    assert open(tmp_path / "out" / train, "rb").read() == texts[train]
    server.stop_at = lambda name, start, size: size // 2  # always cut: no try gains, it ends
    assert run_prepare(server.url, tmp_path / "out2", "--retries", 3) == 1
    assert last_line(capsys.readouterr().err).startswith("error: could not download")


def test_failed_download_is_resumed_by_the_next_run(server, texts, local_source, tmp_path, capsys):
    train = prep.FILES["train"]
    size = len(texts[train])
    server.stop_at = lambda name, start, size: max(start, size // 3) if name == train else size
    assert run_prepare(server.url, tmp_path / "out", "--retries", 2) == 1
    assert os.path.getsize(tmp_path / "out" / (train + ".part")) == size // 3
    server.stop_at = lambda name, start, size: size  # the network is back
    server.requests.clear()
    assert run_prepare(server.url, tmp_path / "out") == 0
    assert server.requests == [(train, f"bytes={size // 3}-")]  # val was finished: only the rest of train
    assert run_prepare(local_source, tmp_path / "clean") == 0
    assert shards_by_name(tmp_path / "out") == shards_by_name(tmp_path / "clean")


@pytest.mark.parametrize("split", ["val", "train"])
def test_truncated_download_fails_with_one_line_and_leaves_no_shards_of_it(server, texts, tmp_path, capsys,
                                                                           split):
    name = prep.FILES[split]
    server.stop_at = lambda n, start, size: max(start, size // 2) if n == name else size  # on every try
    out = tmp_path / "out"
    assert run_prepare(server.url, out, "--retries", 3) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(rf"error: could not download {server.url}/{name}: connection closed after "
                        rf"[\d,]+ of {len(texts[name]):,} bytes \(3 tries\); re-run to resume from .*\.part",
                        last_line(err))
    assert not os.path.exists(out / name) and os.path.exists(out / (name + ".part"))
    assert not glob.glob(str(out / tg.SHARD_NAME.format(split=split, index="*")))
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
    assert run_prepare(server.url, out, "--retries", 2) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert last_line(err).startswith(f"error: could not download {server.url}/{prep.FILES['val']}: "
                                     f"HTTP {status} ")
    assert len(server.requests) == (1 if status == 404 else 2)  # 5xx may pass: it is tried again
    assert not glob.glob(str(out / "*.bin")) and not os.path.exists(out / "done.json")


def test_text_without_separators_is_rejected(server, local_source, tmp_path, capsys):
    server.files[prep.FILES["val"]] = b"<html><body>Please log in</body></html>\n"  # a 200 that is no data
    assert run_prepare(server.url, tmp_path / "out") == 1
    assert re.fullmatch(r"error: .*TinyStories-valid.txt has no <\|endoftext\|> lines: not a TinyStories "
                        r"text file; delete it and re-run", last_line(capsys.readouterr().err))
    assert not glob.glob(str(tmp_path / "out" / "*.bin"))
    # The same with a pool of workers: the error comes through the pool, from the thread that reads blocks.
    server.shutdown()  # no other thread while the pool forks
    open(os.path.join(local_source, prep.FILES["val"]), "wb").write(b"<html>no stories</html>")
    assert run_prepare(local_source, tmp_path / "out2", "--workers", 2) == 1
    assert "has no <|endoftext|> lines" in last_line(capsys.readouterr().err)


def test_missing_local_source_fails_with_one_line(tmp_path, capsys):
    assert run_prepare(tmp_path / "nowhere", tmp_path / "out") == 1
    missing = tmp_path / "nowhere" / "TinyStories-valid.txt"
    assert last_line(capsys.readouterr().err).startswith(
        f"error: no {missing}: --source must be an http(s) URL or a directory")


def test_finished_dataset_is_skipped_and_force_redoes_it(server, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_prepare(server.url, out) == 0
    before = {p: os.stat(p) for p in glob.glob(str(out / "*.bin")) + [str(out / "done.json")]}
    contents = shards_by_name(out)
    for name in prep.FILES.values():
        os.remove(out / name)  # even without the text, a finished split needs nothing
    server.requests.clear()
    capsys.readouterr()
    assert run_prepare(server.url, out) == 0
    assert capsys.readouterr().out.count("already prepared") == 2
    assert server.requests == []
    assert {p: (s.st_ino, s.st_mtime_ns) for p, s in before.items()} == \
        {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in before}  # untouched
    for p in before:
        os.utime(p, ns=(0, 0))  # (not the inode: a file deleted first may give its number to the new one)
    assert run_prepare(server.url, out, "--force") == 0
    assert "already prepared" not in capsys.readouterr().out
    assert all(os.stat(p).st_mtime_ns != 0 for p in before)  # every file written anew
    assert shards_by_name(out) == contents


def test_rerun_with_another_shard_size_replaces_all_old_shards(local_source, tmp_path):
    out = tmp_path / "out"
    assert run_prepare(local_source, out, "--shard-size", 1000) == 0
    tokens = split_tokens(out, "train")
    assert len(tg.shard_paths(str(out), "train")) > 3
    assert run_prepare(local_source, out, "--shard-size", 100_000) == 0  # a new setting: redone without --force
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "*.bin"))) == \
        ["tinystories_train_000.bin", "tinystories_val_000.bin"]
    assert (split_tokens(out, "train") == tokens).all()


def test_failed_redo_leaves_the_previous_dataset_intact(local_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_prepare(local_source, out) == 0
    contents, marker = shards_by_name(out), open(out / "done.json").read()
    train = os.path.join(local_source, prep.FILES["train"])
    data = open(train, "rb").read()
    open(train, "wb").write(data[:len(data) // 2] + b"\xff\xfe" + data[len(data) // 2:])  # not UTF-8
    assert run_prepare(local_source, out, "--force", "--workers", 2) == 1  # the error comes through the pool
    assert re.fullmatch(r"error: .*TinyStories-train.txt is not UTF-8 text \(.*\); delete it and re-run to "
                        r"get it again", last_line(capsys.readouterr().err))
    assert shards_by_name(out) == contents and open(out / "done.json").read() == marker
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
    assert run_prepare(local_source, out, "--workers", 2, "--splits", "train") == 1
    assert re.fullmatch(r"error: \[Errno 28\] No space left on device: .*tinystories_train_002.bin'",
                        last_line(capsys.readouterr().err))
    assert multiprocessing.active_children() == []  # the pool was shut down, not left behind
    assert os.listdir(out) == []  # two shards were written, into the staging directory, now removed


def test_prepare_help_shows_every_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: the URL is not wrapped
    with pytest.raises(SystemExit):
        prep.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--source", prep.SOURCE), ("--out-dir", "data/tinystories"),
                          ("--splits", "['val', 'train']"), ("--shard-size", "100000000"),
                          ("--workers", str(os.cpu_count())), ("--retries", "5"), ("--retry-wait", "2.0")]:
        assert re.search(rf"{flag} .*?\(default: {re.escape(default)}\)", text), flag
    assert "--force redo the splits" in text and "(default: False)" not in text  # an on/off flag: no default shown
