"""Tests of train_gpt2.py for issue 4 (never lose a run: checkpoints, resume, signals, kill -9, bad
checkpoints, non-finite losses) and issue 5 (Hugging Face import and export, --init-from, --plot).

Everything runs offline on a CPU, with a tiny model (2 layers, 2 heads, 32 channels, 16 positions, GPT-2's
50,257 tokens) trained for 10 steps on token shards written here from synthetic stories. Two things are
pinned for the whole file, in this process and in the training subprocesses alike:
  - one CPU thread: on a busy 2-core machine, 2 threads make each tiny step ~10x slower;
  - matmul_flops, the timing that dtype "auto" and the MFU display are based on, is replaced by fixed
    numbers (fp32 "faster"): "auto" then always means float32, and no start-up spends seconds timing.
Needs GPT2_BPE_FILE (a local r50k_base.tiktoken), as CI sets it."""

import glob
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt2 as tg

REPO = os.path.dirname(os.path.abspath(__file__))
N_STEPS = 10  # every training run here: 10 steps of 2 micro-batches of 4 x 16 tokens
CKPT_INTERVAL = 2
MODEL_ARGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16"]
TRAIN_ARGS = ["--batch-size", "4", "--grad-accum", "2", "--max-steps", str(N_STEPS), "--warmup-steps", "3",
              "--eval-interval", "4", "--eval-batches", "2", "--ckpt-interval", str(CKPT_INTERVAL),
              "--device", "cpu", "--dtype", "float32", "--no-compile"]
TIMING_FIELDS = ("ms", "tok_per_sec")  # the metrics that differ between identical runs
PROMPT = "Once upon a time there was a little girl"


def fixed_matmul_flops(device, dtype, n=1024, reps=5):
    """Stands in for train_gpt2.matmul_flops (a timing): fp32 'twice as fast as bf16', at no cost."""
    return 1e11 if dtype == torch.float32 else 5e10


# A training process as `python train_gpt2.py ARGS` runs it, with the same fixed timing as in this process.
SUBPROCESS_MAIN = ("import sys, torch, train_gpt2 as t; "
                   "t.matmul_flops = lambda device, dtype, n=1024, reps=5: 1e11 if dtype == torch.float32 else 5e10; "
                   "sys.exit(t.main(sys.argv[1:]))")


def start_training(args):
    """Start a training process (stdout and stderr merged, line by line) on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", SUBPROCESS_MAIN, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


# -----------------------------------------------------------------------------
# fixtures: the machine, the data, an uninterrupted reference run

@pytest.fixture(scope="module", autouse=True)
def one_thread_fixed_timing():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "matmul_flops", fixed_matmul_flops)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


def story_tokens(enc, n, rng):
    words = ("Once upon a time there was a little girl named Lily who loved to play in the park with her "
             "dog Max . One day , they found a big red ball and laughed ! \"Look\" said Tom").split()
    tokens = []
    for _ in range(n):
        tokens += enc.encode_ordinary(" ".join(rng.choice(words, size=rng.integers(8, 30)))) + [tg.EOT]
    return tokens


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two train shards and a val shard. The train shards hold 69 windows of 17 tokens and a step reads 8,
    so step 8 (the 9th) reads the last windows of epoch 0 and the first of epoch 1."""
    d = tmp_path_factory.mktemp("data")
    enc, rng = tg.get_tokenizer(), np.random.default_rng(0)
    for name, n in (("ts_train_000.bin", 30), ("ts_train_001.bin", 30), ("ts_val_000.bin", 20)):
        tg.write_shard(str(d / name), story_tokens(enc, n, rng))
    return str(d)


def train_args(data_dir, out_dir, *extra):
    return ["--data-dir", data_dir, "--out-dir", out_dir, *MODEL_ARGS, *TRAIN_ARGS, *extra]


def clone_state(model, optimizer):
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": torch.utils._pytree.tree_map(
                lambda x: x.clone() if isinstance(x, torch.Tensor) else x, optimizer.state_dict())}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted run of N_STEPS, with the weights and optimizer state after every step."""
    out = str(tmp_path_factory.mktemp("reference"))
    after_step, real = {}, tg.train_step

    def train_step(model, optimizer, *args, **kwargs):
        result = real(model, optimizer, *args, **kwargs)
        after_step[len(after_step) + 1] = clone_state(model, optimizer)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "train_step", train_step)
        assert tg.main(train_args(data_dir, out)) == 0
    ckpt = tg.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == N_STEPS and len(after_step) == N_STEPS
    return SimpleNamespace(out=out, ckpt=ckpt, after_step=after_step,
                           metrics=tg.read_metrics(os.path.join(out, "metrics.jsonl")))


# -----------------------------------------------------------------------------
# helpers

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


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in metrics]


def assert_same_run(out_dir, reference):
    """The run in out_dir ended exactly as the reference: final weights, optimizer state, data position,
    and the logged losses, each train step exactly once and in order."""
    ckpt = tg.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert ckpt["step"] == N_STEPS
    assert_same(ckpt["model"], reference.ckpt["model"], "model")
    assert_same(ckpt["optimizer"], reference.ckpt["optimizer"], "optimizer")
    assert ckpt["loader"] == reference.ckpt["loader"]
    metrics = tg.read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    assert [m["step"] for m in metrics if "train_loss" in m] == list(range(N_STEPS))
    assert without_timing(metrics) == without_timing(reference.metrics)


def assert_state_after_step(ckpt, reference):
    """A checkpoint of step s holds exactly the reference run's weights and optimizer after s steps."""
    state = reference.after_step[ckpt["step"]]
    assert_same(ckpt["model"], state["model"], f"model at step {ckpt['step']}")
    assert_same(ckpt["optimizer"], state["optimizer"], f"optimizer at step {ckpt['step']}")


def run_cli(capsys, args):
    """main(args) in this process: (exit status, stdout, stderr)."""
    rc = tg.main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def resume_command(printed):
    """The arguments of the 'Continue with: python train_gpt2.py ...' line that a stopped run prints."""
    match = re.search(r"Continue with: python train_gpt2\.py (.+)", printed)
    assert match, printed
    args = shlex.split(match[1])
    assert "--resume" in args
    return args


@contextmanager
def signal_during_step(k, signum):
    """Deliver `signum` to this process while the k-th optimizer step (1-based) runs, as Ctrl-C or a
    cloud's preemption notice would, without changing any setting of the run (--max-steps and so the
    learning-rate schedule stay those of the uninterrupted run). A signal that arrives where training's
    handler is not installed fails the test instead of killing pytest."""
    real, calls = tg.train_step, []

    def train_step(*args, **kwargs):
        calls.append(k)
        if len(calls) == k:
            signal.raise_signal(signum)  # the Python-level handler runs before this returns
        return real(*args, **kwargs)

    def outside(signum, frame):
        raise AssertionError(f"signal {signum} arrived while training's handler was not installed")

    old = signal.signal(signum, outside)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tg, "train_step", train_step)
            yield
    finally:
        signal.signal(signum, old)


# -----------------------------------------------------------------------------
# Issue 4: never lose a run

@pytest.mark.parametrize("k, signum", [(1, signal.SIGTERM), (5, signal.SIGINT), (8, signal.SIGTERM),
                                       (9, signal.SIGTERM), (10, signal.SIGTERM)])
def test_resume_after_a_signal_at_step_k_is_bit_exact(k, signum, data_dir, reference, tmp_path, capsys):
    """Stopped during the k-th step (k = 8: just before the step that crosses into epoch 1; k = N: the last
    step), then resumed with the command the run printed (--resume --out-dir only, so every setting comes
    from the checkpoint): weights, optimizer and metrics exactly those of the uninterrupted run."""
    out = str(tmp_path / "run")
    with signal_during_step(k, signum):
        rc, printed, _ = run_cli(capsys, train_args(data_dir, out))
    assert rc == 128 + signum
    ckpt = tg.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == k
    assert_state_after_step(ckpt, reference)
    assert [m["step"] for m in tg.read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m] \
        == list(range(k))
    rc, printed, _ = run_cli(capsys, resume_command(printed))
    assert rc == 0
    assert f"resuming {out}/ckpt.pt at step {k}" in printed
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
            tg.main(train_args(data_dir, out))
    assert tg.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 6
    steps = [m["step"] for m in tg.read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in m]
    assert steps == list(range(7))  # step 6 was logged after the checkpoint of step 6: it is redone
    assert run_cli(capsys, ["--resume", "--out-dir", out])[0] == 0
    assert_same_run(out, reference)


def test_resume_survives_a_torn_last_line_in_metrics(data_dir, reference, tmp_path, capsys):
    """A crash in the middle of appending to metrics.jsonl (power loss, a full disk) leaves half a JSON
    line at its end. The run must still resume (that line belongs to a step after the checkpoint)."""
    out = str(tmp_path / "run")
    with signal_during_step(4, signal.SIGTERM):
        assert run_cli(capsys, train_args(data_dir, out))[0] == 128 + signal.SIGTERM
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "train_loss": 10.7')  # cut short
    rc, _, err = run_cli(capsys, ["--resume", "--out-dir", out])
    assert rc == 0, err
    assert_same_run(out, reference)


def kill_chain(data_dir, out, reference, capsys, seed, n_kills):
    """Start training, `kill -9` it, look at what is on disk, resume (or start afresh when no checkpoint
    was written yet), kill again, ... n_kills times; then resume to the end in this process.
    The first kill lands during start-up (0-0.5 s after the process starts: it is still importing
    torch), before any checkpoint. Each later one comes from random.Random(seed): wait until the
    process prints "step s | loss" for some s >= a target step, then sleep 0-150 ms more (a step takes
    ~80 ms here, a checkpoint write tens of ms), so kills land in steps, evaluations and checkpoint writes.
    Returns one record per kill."""
    rng, records = random.Random(seed), []
    ckpt_path = os.path.join(out, "ckpt.pt")
    targets = [-1] + sorted(rng.randrange(0, N_STEPS) for _ in range(n_kills - 1))
    for target in targets:
        delay = rng.uniform(0, 0.5) if target < 0 else rng.uniform(0, 0.15)
        resumed_from = tg.load_checkpoint(ckpt_path)["step"] if os.path.exists(ckpt_path) else None
        args = ["--resume", "--out-dir", out] if resumed_from is not None else train_args(data_dir, out)
        proc = start_training(args)
        if target >= 0:
            for line in proc.stdout:
                match = re.match(r"step\s+(\d+) \| loss", line)
                if match and int(match[1]) >= target:
                    break
        time.sleep(delay)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.communicate()
        leftovers = glob.glob(os.path.join(out, "*.tmp*"))  # of the files that atomic_write replaces
        record = dict(target=target, delay=round(delay, 3), returncode=proc.returncode, resumed_from=resumed_from,
                      tmp_files=sorted(os.path.basename(p).split(".tmp")[0] for p in leftovers))
        if os.path.exists(ckpt_path):
            ckpt = tg.load_checkpoint(ckpt_path)  # never torn: it loads after every kill
            assert_state_after_step(ckpt, reference)  # and holds exactly the state of its step
            record["ckpt_step"] = ckpt["step"]
        else:  # killed before the first checkpoint: --resume says there is none (and starts nothing)
            record["ckpt_step"] = None
            rc, _, err = run_cli(capsys, ["--resume", "--out-dir", out])
            assert_one_line_error(rc, err, "no checkpoint")
        records.append(record)
        if proc.returncode == 0:  # it finished before the kill
            break
    args = ["--resume", "--out-dir", out] if os.path.exists(ckpt_path) else train_args(data_dir, out)
    assert tg.main(args) == 0
    assert_same_run(out, reference)
    return records


def test_kill_9_at_random_moments_then_resume_is_bit_exact(data_dir, reference, tmp_path, capsys):
    """Five `kill -9` in one run: one during start-up, four at seeded moments in steps, evaluations and
    checkpoint writes. After each, ckpt.pt loads and holds exactly the state of its step (a leftover
    ckpt.pt.tmp* is never read); before the first checkpoint, --resume says there is none. Resumed
    after the last kill, the run ends bit-exactly as the uninterrupted one."""
    records = kill_chain(data_dir, str(tmp_path / "run"), reference, capsys, seed=4, n_kills=5)
    print(records)
    assert records[0]["returncode"] == -signal.SIGKILL and records[0]["ckpt_step"] is None
    assert any(r["ckpt_step"] is not None and r["returncode"] == -signal.SIGKILL for r in records)


def copy_run(reference_out, out, names=("ckpt.pt", "metrics.jsonl")):
    os.makedirs(out, exist_ok=True)
    for name in names:
        open(os.path.join(out, name), "wb").write(open(os.path.join(reference_out, name), "rb").read())


def test_leftover_temporary_files_are_never_read_as_a_checkpoint(data_dir, reference, tmp_path, capsys):
    """A kill during a checkpoint write leaves ckpt.pt.tmp<pid> next to ckpt.pt. Even when that file
    holds a newer, valid checkpoint, resume reads ckpt.pt only; with no ckpt.pt, there is none."""
    out = str(tmp_path / "run")
    with signal_during_step(4, signal.SIGTERM):
        assert run_cli(capsys, train_args(data_dir, out))[0] == 128 + signal.SIGTERM
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


def test_resume_removes_temporary_files_left_by_a_killed_run(data_dir, reference, tmp_path, capsys):
    """Each kill during a checkpoint write leaves a ckpt.pt.tmp<pid> as big as a checkpoint (1.5 GB for
    GPT-2 124M with AdamW's state); nothing ever removes them, so a preempted run that is resumed many
    times fills its disk. The resumed run (the only writer of out_dir) should delete them."""
    out = str(tmp_path / "run")
    with signal_during_step(4, signal.SIGTERM):
        assert run_cli(capsys, train_args(data_dir, out))[0] == 128 + signal.SIGTERM
    for name in ("ckpt.pt.tmp99999", "metrics.jsonl.tmp99999"):
        open(os.path.join(out, name), "wb").write(b"left by a killed process")
    assert run_cli(capsys, ["--resume", "--out-dir", out])[0] == 0
    assert glob.glob(os.path.join(out, "*.tmp*")) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_training_process_saves_prints_how_to_resume_and_exits_128_plus_signum(
        signum, data_dir, reference, tmp_path, capsys):
    out = str(tmp_path / "run")
    proc = start_training(train_args(data_dir, out))
    printed = ""
    for line in proc.stdout:
        printed += line
        if line.startswith("step     3 | loss"):
            break
    proc.send_signal(signum)
    printed += proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, printed
    stopped_after = int(re.search(r"stopped by signal \d+ after step (\d+)", printed)[1])
    ckpt = tg.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == stopped_after + 1
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
    ckpt = tg.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert_state_after_step(ckpt, reference)
    metrics = tg.read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in metrics if "train_loss" in m] == list(range(6))
    assert all(finite_if_float(v) for m in metrics for v in m.values())
    assert run_cli(capsys, ["--resume", "--out-dir", out])[0] == 0
    assert_same_run(out, reference)


def finite_if_float(x):
    return not isinstance(x, float) or np.isfinite(x)


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


def test_resume_keeps_the_dtype_the_run_was_started_with(data_dir, tmp_path, capsys):
    """A run started with --dtype bfloat16, resumed with the printed command (no --dtype), must go on in
    bfloat16, as it goes on with every other saved setting. (Here dtype "auto" means float32.)"""
    out = str(tmp_path / "run")
    with signal_during_step(1, signal.SIGTERM):
        rc, printed, _ = run_cli(capsys, train_args(data_dir, out, "--dtype", "bfloat16", "--max-steps", "2"))
    assert rc == 128 + signal.SIGTERM and "device cpu, bfloat16" in printed
    rc, printed, _ = run_cli(capsys, resume_command(printed))
    assert rc == 0
    assert "device cpu, bfloat16" in printed, printed.splitlines()[:2]


# -----------------------------------------------------------------------------
# Issue 5: Hugging Face GPT-2 in and out, --init-from, --plot

@pytest.fixture(scope="module")
def transformers():
    transformers = pytest.importorskip("transformers")
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


def our_model(config, state_dict):
    model = tg.GPT(config)
    model.load_state_dict(state_dict)
    return model.eval()


def test_hf_gpt2_loaded_with_load_hf_gives_hf_logits_and_greedy_text(hf_model, hf_dir):
    config, weights = tg.load_hf(hf_dir)
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (2, 2, 32, 64, 50257)
    ours, enc = our_model(config, weights), tg.get_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(PROMPT)])
    with torch.no_grad():
        diff = (ours(idx)[0] - hf_model(idx).logits).abs().max().item()
    print(f"max |logit difference| import: {diff:.3g}")
    assert diff < 1e-5
    n = 24
    ours_ids = tg.generate(ours, idx, n, top_k=1, stop_at_eot=False)  # top-1 sampling = greedy
    hf_ids = hf_model.generate(idx, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tg.EOT)
    assert ours_ids.shape == (1, idx.size(1) + n)
    assert ours_ids.tolist() == hf_ids.tolist()
    assert enc.decode(ours_ids[0].tolist()) == enc.decode(hf_ids[0].tolist())


@pytest.mark.parametrize("option", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)],
                         ids=["scale_attn_by_inverse_layer_idx", "no_scale_attn_weights"])
def test_load_hf_refuses_gpt2_variants_it_would_compute_differently(option, transformers, tmp_path):
    """scale_attn_by_inverse_layer_idx (e.g. Stanford CRFM's GPT-2s) and scale_attn_weights=False change
    the attention: loading such a model as plain GPT-2 silently gives other logits. Refuse it, or match."""
    hf = hf_tiny_model(transformers, **option)
    hf.save_pretrained(str(tmp_path))
    try:
        config, weights = tg.load_hf(str(tmp_path))
    except tg.UserError:
        return
    idx = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        diff = (our_model(config, weights)(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-5, f"load_hf accepted {option} but computes another model (max |diff| {diff:.3g})"


def test_every_hf_gpt2_124m_weight_name_and_shape_maps_both_ways(transformers, tmp_path, monkeypatch):
    """GPT(GPTConfig()) exported gives exactly HF GPT-2 124M's tensors (names and shapes; lm_head.weight is
    tied to wte), and HF's state_dict imported gives exactly ours. HF's model is built on the meta device;
    no file of 124M weights is written or read."""
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours = tg.GPT(tg.GPTConfig())
    written = {}
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata=None: written.update(tensors))
    tg.export_hf(ours, str(tmp_path / "export"))
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
    config, sd = tg.load_hf(str(tmp_path / "hf"))
    assert config == tg.GPTConfig()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_export_hf_of_a_trained_run_loads_in_transformers_with_the_same_logits(
        transformers, reference, tmp_path, capsys):
    d = str(tmp_path / "export")
    rc, printed, _ = run_cli(capsys, ["--export-hf", d, "--out-dir", reference.out])
    assert rc == 0 and d in printed
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(d, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    hf.eval()
    ours = tg.model_from_checkpoint(reference.ckpt, "cpu").eval()
    idx = torch.tensor([tg.get_tokenizer().encode_ordinary(PROMPT)[:16]])
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
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
    args = ["--data-dir", data_dir, "--out-dir", out, "--init-from", hf_dir, *TRAIN_ARGS,
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
    args = ["--data-dir", data_dir, "--out-dir", out, "--init-from", hf_dir, *TRAIN_ARGS, "--max-steps", "0"]
    rc, printed, _ = run_cli(capsys, args)
    assert rc == 0 and f"checkpoint: {out}/ckpt.pt" in printed
    assert tg.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 0


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
    assert_one_line_error(*run_cli(capsys, ["--plot", "--out-dir", empty])[::2], "no training steps")
    val_only = str(tmp_path / "val_only")
    os.makedirs(val_only)
    with open(os.path.join(val_only, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val_loss": 10.8, "tokens": 0}) + "\n")
    assert_one_line_error(*run_cli(capsys, ["--plot", "--out-dir", val_only])[::2], "no training steps")
    assert not os.path.exists(os.path.join(val_only, "loss.png"))
