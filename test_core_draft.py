"""Tests of train_gpt2.py's core: the model, the loss, the optimizer step, the data loader, the BPE,
sampling, the command line and the speed figures. Offline and on CPU: tiny models (2 layers, 32
channels, GPT-2's real 50,257-token vocabulary) and token shards written here from synthetic stories.

GPT-2's BPE comes from $GPT2_BPE_FILE (a local r50k_base.tiktoken), which the CI script sets:
    GPT2_BPE_FILE=.cache/r50k_base.tiktoken python -m pytest -q test_core_draft.py"""

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import train_gpt2 as tg
from train_gpt2 import (BPE_FILE_ENV, EOT, GPT, SHARD_HEADER_INTS, ChunkedCrossEntropy, DataLoader, GPTConfig,
                        KVCache, Runtime, SampleConfig, TrainConfig, UserError, chunked_cross_entropy,
                        choose_dtype, complete, configure_optimizer, device_peak_flops, flops_per_token,
                        generate, get_lr, get_tokenizer, load_checkpoint, main, model_from_checkpoint,
                        parse_args, read_metrics, read_shard, train, train_step, write_shard)

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, "train_gpt2.py")
V = 50257  # GPT-2's vocabulary; the embedding table is padded to 50,304 rows
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)
TINY_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16"]
CPU = ["--device", "cpu", "--dtype", "float32"]
RT = Runtime(device="cpu", dtype=torch.float32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with several threads the synchronisation costs more than the work (and the
    test machines are shared), so one thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, **overrides):
    return GPT(GPTConfig(**{**TINY, **overrides}), seed=seed)


def random_tokens(shape, seed):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# data: synthetic stories as token shards

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
    """Two train shards (60 stories) and one val shard (15 stories), named as prepare_tinystories.py names them."""
    d = tmp_path_factory.mktemp("tinystories")
    train_ids = story_tokens(enc, make_stories(60, seed=1))
    half = len(train_ids) // 2
    write_shard(str(d / "tinystories_train_000.bin"), train_ids[:half])
    write_shard(str(d / "tinystories_train_001.bin"), train_ids[half:])
    write_shard(str(d / "tinystories_val_000.bin"), story_tokens(enc, make_stories(15, seed=2)))
    return str(d)


# -----------------------------------------------------------------------------
# 1-4. the model

def test_gpt2_small_has_124m_parameters_with_and_without_vocab_padding(monkeypatch):
    # The count does not depend on the values: build on the meta device, with the init skipped (seconds saved).
    monkeypatch.setattr(GPT, "_init_weights", lambda self, module, generator: None)
    with torch.device("meta"):
        padded, unpadded = GPT(GPTConfig()), GPT(GPTConfig(vocab_pad_to=1))
    assert GPTConfig().padded_vocab_size == 50304 and padded.lm_head.weight.shape == (50304, 768)
    assert padded.num_params() == 124_475_904  # the tied wte/lm_head counted once
    assert unpadded.num_params() == 124_439_808  # OpenAI's GPT-2 small


def test_changing_a_token_changes_no_logit_before_it_and_every_logit_from_it_on():
    model = tiny_model().eval()
    idx = random_tokens((2, 16), seed=1)
    t = 7
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % V
    with torch.no_grad():
        logits, _ = model(idx)
        logits_changed, _ = model(changed)
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
    loaded = model_from_checkpoint(load_checkpoint(str(path)), "cpu")
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


# -----------------------------------------------------------------------------
# 5-7. training: overfitting, gradient accumulation, the chunked loss

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
        loss, _ = train_step(model, optimizer, lambda: (x, y), 1, RT, lr=1e-2, grad_clip=1.0)
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
    loss, _ = train_step(model, optimizer, lambda: next(it), accum, RT, lr=1e-3, grad_clip=0.0)
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


@pytest.mark.parametrize("N, chunk", [(37, 8), (37, 2048), (32, 16)])
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


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = tiny_model()
    x, y = random_tokens((3, 16), seed=6), random_tokens((3, 16), seed=7)
    _, loss = model(x, y)
    with torch.no_grad():
        logits, _ = model(x)
    assert logits.shape == (3, 16, V)  # the real vocabulary only: padded tokens cannot be sampled
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, V), y.view(-1)).item(), rel=1e-6)


def test_train_step_leaves_the_weights_alone_when_the_gradient_is_not_finite():
    """train() stops on a non-finite loss or gradient norm and says "the weights were not updated"; with a
    finite loss and an inf gradient, train_step() must not step either."""
    model = tiny_model()
    optimizer = configure_optimizer(model, TrainConfig(), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.transformer.wpe.weight.register_hook(lambda g: g * float("inf"))  # e.g. an overflow in backward
    x, y = random_tokens((2, 16), seed=8), random_tokens((2, 16), seed=9)
    loss, norm = train_step(model, optimizer, lambda: (x, y), 1, RT, lr=1e-3, grad_clip=1.0)
    assert torch.isfinite(loss) and not torch.isfinite(norm)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == []


# -----------------------------------------------------------------------------
# 8. learning-rate schedule

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
    warmup = [get_lr(s, cfg) for s in range(100)]
    cosine = [get_lr(s, cfg) for s in range(100, 3001)]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert all(a > b for a, b in zip(cosine, cosine[1:]))


# -----------------------------------------------------------------------------
# 9-10. data loader and shards

B_L, T_L = 4, 8
SHARD_STARTS = (0, 2000)  # the token value at the start of each train shard


@pytest.fixture
def counting_dir(tmp_path):
    """Token i of a shard is start + i, so a window shows where it came from. 124 + 68 = 192 windows of 8
    (a multiple of 2 x 4) in two train shards, and a val shard whose tokens the train loader must never see."""
    write_shard(str(tmp_path / "toy_train_000.bin"), np.arange(0, 1000))  # (1000 - 1) // 8 = 124 windows
    write_shard(str(tmp_path / "toy_train_001.bin"), np.arange(2000, 2549))  # 548 // 8 = 68 windows
    write_shard(str(tmp_path / "toy_val_000.bin"), np.arange(5000, 5200))
    return str(tmp_path)


def all_window_starts():
    return {0 + w * T_L for w in range(124)} | {2000 + w * T_L for w in range(68)}


def starts(x):
    return x[:, 0].tolist()


def test_targets_are_the_inputs_shifted_by_one_within_one_shard(counting_dir):
    loader = DataLoader(counting_dir, "train", B_L, T_L, seed=0)
    for _ in range(loader.batches_per_epoch):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B_L, T_L) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, -1], x[:, -1] + 1)  # the next token of the shard
        assert torch.equal(x, x[:, :1] + torch.arange(T_L))  # consecutive tokens: no window crosses shards
        assert set(starts(x)) <= all_window_starts()


def test_an_epoch_visits_every_window_exactly_once(counting_dir):
    loader = DataLoader(counting_dir, "train", B_L, T_L, seed=0)
    assert loader.n_windows == 192 and loader.batches_per_epoch == 192 // B_L
    seen = [s for _ in range(loader.batches_per_epoch) for s in starts(loader.next_batch()[0])]
    assert sorted(seen) == sorted(all_window_starts())
    assert loader.state() == {"epoch": 1, "window": 0}
    second = [s for _ in range(loader.batches_per_epoch) for s in starts(loader.next_batch()[0])]
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
    assert ranks[0].batches_per_epoch * 2 == single.batches_per_epoch
    for step in range(single.batches_per_epoch // (2 * accum)):  # one epoch
        per_rank = [step_windows([loader], accum) for loader in ranks]
        assert not per_rank[0] & per_rank[1], step
        assert per_rank[0] | per_rank[1] == step_windows([single], 2 * accum), step


def test_two_ranks_match_one_process_with_double_accumulation_across_epochs(tmp_path):
    """The docstring's promise ("together, per step, exactly the windows that a single process with world
    times the accumulation would read") for a whole run, where an epoch has an odd number of micro-batches
    (as TinyStories has: ~462,700 windows of 1024 // 64 = 7,229): then the two processes skip a different remainder
    at the end of each epoch than the single process does, and from the second epoch on they read other
    windows than the single-process run."""
    write_shard(str(tmp_path / "toy_train_000.bin"), np.arange(21 * B_L * T_L + 1))  # 84 windows: 21 micro-batches
    single = DataLoader(str(tmp_path), "train", B_L, T_L, seed=5)
    ranks = [DataLoader(str(tmp_path), "train", B_L, T_L, seed=5, rank=r, world=2) for r in range(2)]
    for step in range(25):  # a little over two epochs of 2 x 2 micro-batches per step
        assert step_windows(ranks, 1) == step_windows([single], 2), f"step {step}"


def test_fixed_batches_are_the_same_on_every_call(counting_dir):
    loader = DataLoader(counting_dir, "val", B_L, T_L, seed=0)
    first = loader.fixed_batches(3)
    assert len(first) == 3
    loader.next_batch()
    assert_same_batches(first, loader.fixed_batches(3))
    assert_same_batches(first, DataLoader(counting_dir, "val", B_L, T_L, seed=99).fixed_batches(3))
    assert all(x.min() >= 5000 for x, _ in first)  # val tokens only
    ranks = [DataLoader(counting_dir, "val", B_L, T_L, seed=0, rank=r, world=2).fixed_batches(3) for r in range(2)]
    assert_same_batches(first, [ranks[0][0], ranks[1][0], ranks[0][1]])  # a strided share each


def shard_bytes(tokens):
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    return header, np.asarray(tokens, dtype="<u2").tobytes()


@pytest.mark.parametrize("defect, message", [
    ("magic", "bad magic"), ("version", "version 2"), ("truncated", "truncated"), ("extra", "truncated"),
    ("short header", "bad magic"), ("header cut inside an int", "bad magic")])
def test_bad_shard_raises_user_error_naming_the_file(tmp_path, defect, message):
    header, body = shard_bytes(np.arange(100))
    if defect == "magic":
        header[0] = 1234
    if defect == "version":
        header[1] = 2
    data = header.tobytes() + body
    data = {"truncated": data[:-2], "extra": data + b"\0\0", "short header": data[:1000],
            "header cut inside an int": data[:1023]}.get(defect, data)
    path = tmp_path / "x_train_000.bin"
    path.write_bytes(data)
    with pytest.raises(UserError, match=message) as e:
        read_shard(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(UserError):  # the loader reports it the same way
        DataLoader(str(tmp_path), "train", 2, 8, seed=0)


def test_too_few_tokens_for_one_batch_is_a_user_error(tmp_path):
    write_shard(str(tmp_path / "x_train_000.bin"), np.arange(30))  # 3 windows of 8
    with pytest.raises(UserError, match="too few for one batch") as e:
        DataLoader(str(tmp_path), "train", 4, 8, seed=0)
    assert str(tmp_path) in str(e.value)
    DataLoader(str(tmp_path), "train", 3, 8, seed=0)  # 3 windows make one batch of 3


def test_missing_data_points_to_prepare_tinystories(tmp_path):
    with pytest.raises(UserError, match="prepare_tinystories.py"):
        DataLoader(str(tmp_path / "nowhere"), "train", 4, 8, seed=0)
    with pytest.raises(UserError, match=r"no train shards.*prepare_tinystories.py"):
        DataLoader(str(tmp_path), "train", 4, 8, seed=0)  # a directory without shards


# -----------------------------------------------------------------------------
# 11. GPT-2's BPE

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


def test_bpe_file_of_the_wrong_content_is_rejected_by_its_sha256(tmp_path, monkeypatch):
    bogus = tmp_path / "r50k_base.tiktoken"
    bogus.write_text("SGVsbG8= 0\n")
    monkeypatch.setenv(BPE_FILE_ENV, str(bogus))
    with pytest.raises(UserError, match="sha256"):
        get_tokenizer()
    monkeypatch.setenv(BPE_FILE_ENV, str(tmp_path / "missing.tiktoken"))
    with pytest.raises(UserError, match="no such file"):
        get_tokenizer()


# -----------------------------------------------------------------------------
# 12. command line

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
            if f.default is not None:
                assert f"(default: {f.default})" in " ".join(entry.group(1).split()), (flag, entry.group(0))


def test_flags_set_the_config_fields():
    model_cfg, cfg, sample_cfg, given = parse_args(
        ["--n-layer", "3", "--max-lr", "1e-3", "--no-compile", "--resume", "--top-k", "0", "--dtype", "bfloat16"])
    assert (model_cfg.n_layer, model_cfg.n_head) == (3, 12)
    assert (cfg.max_lr, cfg.compile, cfg.resume, cfg.dtype, cfg.batch_size) == (1e-3, False, True, "bfloat16", 64)
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
    (["--dtype", "float16"], "invalid choice"),
    (["--n-layer", "two"], "invalid int value"),
])
def test_invalid_settings_exit_with_status_2_and_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], err


def test_missing_data_exits_with_status_1_and_points_to_prepare_tinystories(tmp_path, capsys):
    status = main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out"), *TINY_FLAGS, *CPU])
    assert status == 1
    err = capsys.readouterr().err
    assert "prepare_tinystories.py" in err and "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# 13. end to end: train with the command line, then sample from the checkpoint

@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """`python train_gpt2.py ...` on the synthetic shards: 40 steps of a tiny model. Returns out_dir."""
    out = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, SCRIPT, "--data-dir", data_dir, "--out-dir", out, *TINY_FLAGS, *CPU, "--no-compile",
           "--batch-size", "4", "--grad-accum", "1", "--max-steps", "40", "--warmup-steps", "5",
           "--max-lr", "1e-2", "--min-lr", "1e-3", "--eval-interval", "20", "--eval-batches", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
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
    ckpt = load_checkpoint(os.path.join(trained_run, "ckpt.pt"))
    assert ckpt["step"] == 40 and ckpt["config"]["model"]["n_layer"] == 2


def cli_samples(capsys, out_dir, seed, prompt="Once upon a time"):
    status = main(["--out-dir", out_dir, "--sample", prompt, "--seed", str(seed), "--num-samples", "2",
                   "--max-new-tokens", "20", *CPU])
    assert status == 0
    out = capsys.readouterr().out
    chunks = re.split(r"^--- sample \d+ ---\n", out, flags=re.M)
    assert chunks[0] == "" and len(chunks) == 3, out
    return [c[:-2] for c in chunks[1:]]  # print() adds "\n" after each "text\n"


def test_cli_samples_start_with_the_prompt_and_repeat_with_the_seed(trained_run, capsys):
    first = cli_samples(capsys, trained_run, seed=7)
    assert all(text.startswith("Once upon a time") and len(text) > len("Once upon a time") for text in first)
    assert cli_samples(capsys, trained_run, seed=7) == first
    assert cli_samples(capsys, trained_run, seed=8) != first


# -----------------------------------------------------------------------------
# 14. sampling

def test_sampling_stops_at_end_of_text(overfit, enc):
    model, _ = overfit
    prompt = torch.tensor([enc.encode_ordinary("Once upon a time")] * 2)
    out = generate(model, prompt, 40, top_k=1)
    assert out.shape == (2, len(enc.encode_ordinary(STORY)) + 1) and (out[:, -1] == EOT).all()
    assert generate(model, prompt, 40, top_k=1, stop_at_eot=False).shape == (2, 4 + 40)
    cfg = SampleConfig(num_samples=2, max_new_tokens=40, top_k=1)
    assert complete(model, enc, "Once upon a time", cfg, RT, seed=0) == [STORY, STORY]


def test_empty_prompt_starts_a_new_story_after_end_of_text(overfit, enc, monkeypatch):
    model, _ = overfit
    prompts = []

    def generate_spy(model, idx, *args, **kwargs):
        prompts.append(idx.tolist())
        return generate(model, idx, *args, **kwargs)

    monkeypatch.setattr(tg, "generate", generate_spy)
    cfg = SampleConfig(num_samples=2, max_new_tokens=40, top_k=1)
    assert complete(model, enc, "", cfg, RT, seed=0) == [STORY, STORY]
    assert prompts == [[[EOT], [EOT]]]


def test_kv_cache_gives_the_logits_of_the_full_forward():
    model = tiny_model().eval()
    idx = random_tokens((2, 16), seed=10)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model, 2)
        steps = [model(idx[:, :5], kv_cache=cache)[0]]  # prefill
        steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 16)]  # one token at a time
    assert cache.length == 16
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_continued_by_several_tokens_at_once_gives_the_logits_of_the_full_forward():
    """forward(idx, kv_cache=...) accepts any T. For T > 1 after cached positions, SDPA's is_causal mask is
    aligned top-left (query i sees keys 0..i), not bottom-right (keys 0..T_past + i): generate() never does
    this (prefill, then one token at a time), but a caller of forward() gets wrong logits."""
    model = tiny_model().eval()
    idx = random_tokens((2, 16), seed=11)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model, 2)
        model(idx[:, :5], kv_cache=cache)
        chunk, _ = model(idx[:, 5:9], kv_cache=cache)
    assert torch.allclose(chunk, full[:, 5:9], atol=1e-5, rtol=1e-5)


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


# -----------------------------------------------------------------------------
# 15-17. dtype choice, peak FLOP/s, MFU, --bench

def fake_matmul_flops(fp32, bf16):
    def matmul_flops(device, dtype, n=1024, reps=5):
        assert device == "cpu"
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]
    return matmul_flops


def test_choose_dtype_honours_explicit_values_and_times_bf16_against_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1e11, 5e11))
    for device in ("cpu", "cuda", "mps"):
        assert choose_dtype("float32", device) == torch.float32
        assert choose_dtype("bfloat16", device) == torch.bfloat16
    assert choose_dtype("auto", "cpu") == torch.bfloat16  # bf16 measured 5x faster
    assert choose_dtype("auto", "mps") == torch.float32
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1e11, 2e10))
    assert choose_dtype("auto", "cpu") == torch.float32  # emulated bf16: the fallback is fp32
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1e11, 1.1e11))
    assert choose_dtype("auto", "cpu") == torch.float32  # not clearly faster


def test_peak_flops_of_a_cpu_is_measured_never_a_gpu_datasheet_value(monkeypatch):
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1.5e11, 4e11))
    assert device_peak_flops(Runtime("cpu", torch.float32)) == 4e11  # either dtype could have been used
    assert device_peak_flops(Runtime("cpu", torch.bfloat16)) == 4e11
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1.5e11, 1e10))
    assert device_peak_flops(Runtime("cpu", torch.bfloat16)) == 1.5e11


MEASURED = 77e12  # what the faked matmul_flops measures


@pytest.mark.parametrize("name, dtype, allowed", [
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, {312e12}), ("NVIDIA A100-SXM4-40GB", torch.float32, {156e12}),
    ("NVIDIA H100 PCIe", torch.bfloat16, {756e12}), ("NVIDIA H100 80GB HBM3", torch.bfloat16, {989e12}),
    ("NVIDIA L40S", torch.bfloat16, {362e12}), ("NVIDIA A10G", torch.bfloat16, {70e12}),
    ("NVIDIA RTX A6000", torch.bfloat16, {MEASURED}),
    ("NVIDIA L40", torch.bfloat16, {MEASURED, 181e12})])  # measured, or the L40's own datasheet; not the L4's
def test_gpu_peak_flops_come_from_the_datasheet_of_that_gpu_only(monkeypatch, name, dtype, allowed):
    """Known GPUs: their datasheet's peak. Any other GPU is measured: the peak of a GPU whose name is only
    part of this one's (the L4's 121 TFLOP/s for an L40) would be wrong."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(tg, "matmul_flops", lambda device, dtype, n=1024, reps=5: MEASURED)
    assert device_peak_flops(Runtime("cuda:0", dtype)) in allowed


@pytest.mark.parametrize("world", [1, 2])
def test_logged_mfu_is_the_flops_per_second_of_one_device_over_its_peak(world, data_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """MFU = achieved FLOP/s over the peak FLOP/s of the hardware that achieved them. Under torchrun a step's
    tokens (batch_size x block_size x grad_accum) are shared by `world` devices, so the step's FLOPs are
    measured against world x one device's peak. world=2 runs in this process, as rank 0 of a gloo group
    of one: it then does its share of the step, and the logged MFU must be that share over one peak."""
    peak = 1e9
    monkeypatch.setattr(tg, "device_peak_flops", lambda rt: peak)
    model_cfg = GPTConfig(**TINY)
    cfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=2, max_steps=3,
                      warmup_steps=1, eval_interval=100, eval_batches=1, compile=False)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        train(model_cfg, cfg, Runtime("cpu", torch.float32, rank=0, world=world))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    logged = [float(m) for m in re.findall(r"MFU ([\d.]+)%", capsys.readouterr().out)]
    steps = [m for m in read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl")) if "train_loss" in m]
    step_flops = flops_per_token(model_cfg) * cfg.batch_size * model_cfg.block_size * cfg.grad_accum
    expected = [100 * step_flops / (m["ms"] / 1000) / (world * peak) for m in steps]
    assert len(logged) == len(expected) == 3
    assert logged == pytest.approx(expected, rel=0.01, abs=0.06)


def test_bench_reports_training_speed_mfu_memory_compile_and_sampling_speed(monkeypatch, capsys):
    monkeypatch.setattr(tg, "matmul_flops", fake_matmul_flops(1e11, 2e11))
    status = main(["--bench", *TINY_FLAGS, *CPU, "--no-compile", "--batch-size", "2", "--max-new-tokens", "8"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()

    def line(prefix):
        found = [x for x in lines if x.startswith(prefix)]
        assert len(found) == 1, (prefix, lines)
        return found[0]

    assert re.search(r"[\d,]+ tok/s .* MFU [\d.]+% of 0.20 TFLOP/s", line("train:"))
    assert re.search(r"peak memory: [\d.]+ GiB \| compile: -?[\d.]+ s", line("peak memory"))
    assert re.search(r"[\d,]+ tok/s \(batch 1, 8 new tokens\)", line("sample (KV cache):"))
    assert re.search(r"[\d,]+ tok/s \(batch 1, 8 new tokens\)", line("sample (no cache):"))
