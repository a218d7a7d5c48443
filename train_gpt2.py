"""
GPT-2 (124M) trained from scratch on TinyStories, in one file that reads top to bottom as a lesson.

    python prepare_tinystories.py                  # download TinyStories, write GPT-2 token shards (once)
    python train_gpt2.py                           # train GPT-2 124M: 3000 steps x 524,288 tokens
    python train_gpt2.py --sample "Tommy had a puppy"   # write stories with the trained model
    torchrun --nproc_per_node=8 train_gpt2.py      # the same run, data-parallel over 8 GPUs
    python train_gpt2.py --bench                   # tokens/s, MFU and memory on this machine

The defaults reproduce the source run: validation loss about 1.24 after 3000 steps (~3 epochs of
TinyStories), 3 h 45 min on one A100. `python train_gpt2.py --help` lists every flag.

Sections, in order:
    1. Config          GPTConfig (the model), TrainConfig (the run), SampleConfig (the sampler)
    2. Model           CausalSelfAttention, MLP, Block, then GPT, which assembles them
    3. BPE encoding    GPT-2's byte-pair encoding through tiktoken, <|endoftext|> between stories
    4. Data loader     token shards on disk -> shuffled (B, T) batches of inputs and targets
    5. Training loop   AdamW, cosine schedule, gradient accumulation, bf16/TF32, torch.compile, DDP,
                       checkpoints that resume exactly
    6. Sampling        top-k sampling with a KV cache
    7. Command line    argparse generated from the config dataclasses; the modes

References:
    GPT-2 paper: "Language Models are Unsupervised Multitask Learners", Radford et al. 2019
    OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
    Hugging Face GPT-2: transformers/models/gpt2/modeling_gpt2.py
    GPT-3 paper (batch size, LR schedule): "Language Models are Few-Shot Learners", Brown et al. 2020
    TinyStories: "How Small Can Language Models Be and Still Speak Coherent English?", Eldan & Li 2023
    Karpathy's build-nanogpt, nanoGPT and llm.c, whose shape this file follows.
"""

import argparse
import dataclasses
import glob
import hashlib
import inspect
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A mistake the user can fix. main() prints its one-line message, without a traceback."""


# -----------------------------------------------------------------------------
# 1. Config
# Three dataclasses hold every setting. Each field's help text is the --help of its flag (section 7),
# so the defaults live here and nowhere else. The defaults reproduce the source run.

def arg(default, help, **kwargs):
    """A dataclass field whose metadata becomes an argparse flag."""
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class GPTConfig:
    n_layer: int = arg(12, "number of transformer blocks")
    n_head: int = arg(12, "attention heads per block; must divide n_embd")
    n_embd: int = arg(768, "width of the residual stream (channels C)")
    block_size: int = arg(1024, "context length T: the longest sequence the model sees")
    # 50,000 BPE merges + 256 byte tokens + 1 <|endoftext|> token = 50,257 (GPT-2's vocabulary).
    vocab_size: int = arg(50257, "number of real tokens (GPT-2's BPE has 50,257)")
    # The embedding table gets rows up to a multiple of 64 (50,257 -> 50,304): GPU matmul kernels tile
    # in multiples of 64 or 128, and an odd width leaves a ragged last tile that runs a slow path.
    # The extra rows are never an input, never a target and never sampled (see GPT.forward).
    vocab_pad_to: int = arg(64, "pad the embedding table to a multiple of this, for speed (1 = no padding)")

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.vocab_pad_to) * self.vocab_pad_to


@dataclass
class TrainConfig:
    data_dir: str = arg("data/tinystories", "directory of token shards written by prepare_tinystories.py")
    out_dir: str = arg("log", "where ckpt.pt, metrics.jsonl and loss.png are written")
    # 64 x 1024 tokens x 8 accumulation steps = 524,288 (2**19) tokens per optimizer step, GPT-3 small's
    # 0.5M batch. 3000 steps x 524,288 = 1.57B tokens = 3.3 epochs of TinyStories' 473.8M train tokens.
    batch_size: int = arg(64, "micro-batch size B (sequences per forward pass, per process)")
    grad_accum: int = arg(8, "micro-batches per optimizer step, summed over all processes")
    max_steps: int = arg(3000, "optimizer steps to train for")
    warmup_steps: int = arg(100, "steps of linear learning-rate warmup")
    max_lr: float = arg(6e-4, "peak learning rate (GPT-3 small's)")
    min_lr: float = arg(6e-5, "learning rate at the end of the cosine decay (10%% of max_lr)")
    weight_decay: float = arg(0.001, "AdamW weight decay on 2-D weights (GPT-3 used 0.1)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = arg(250, "evaluate the validation loss every this many steps")
    eval_batches: int = arg(20, "micro-batches of the fixed validation set per evaluation")
    ckpt_interval: int = arg(250, "write out_dir/ckpt.pt every this many steps (and at the end)")
    seed: int = arg(1337, "seed for the weight init and the data order")
    device: str = arg("auto", "cuda, mps or cpu; auto picks the first that is available")
    dtype: str = arg("auto", "float32 or bfloat16 (autocast); auto picks the faster one on this device",
                     choices=["auto", "float32", "bfloat16"])
    compile: str = arg("auto", "torch.compile the model: on, off, or auto (on for GPUs and long CPU runs)",
                       choices=["auto", "on", "off"])
    resume: bool = arg(False, "continue the run saved in out_dir/ckpt.pt exactly where it stopped")
    init_from: str = arg("", "start from a Hugging Face GPT-2: a local directory or a hub name like gpt2")
    export_hf: str = arg("", "write out_dir/ckpt.pt as a Hugging Face GPT-2 directory here, then exit")
    plot: bool = arg(False, "plot out_dir/metrics.jsonl to out_dir/loss.png, then exit")
    bench: bool = arg(False, "measure tokens/s, MFU, memory and sampling speed on synthetic data, then exit")


@dataclass
class SampleConfig:
    sample: str = arg(None, "write completions of this prompt with out_dir/ckpt.pt (\"\" = a new story)")
    num_samples: int = arg(2, "completions to write")
    max_new_tokens: int = arg(256, "longest completion, in tokens (a story may end earlier)")
    temperature: float = arg(1.0, "divide the logits by this before sampling (lower = more predictable)")
    top_k: int = arg(50, "sample only among the k most likely tokens (0 = all)")


# -----------------------------------------------------------------------------
# 2. Model
# Shapes: B batch, T time (sequence position), C channels (n_embd), nh heads, hs head size (C // nh),
# V vocabulary (padded). Bottom-up: attention, MLP, the Block that joins them, then GPT.

class CausalSelfAttention(nn.Module):
    """Every position looks at itself and the positions before it, in n_head independent heads."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads' outputs back into C
        self.c_proj.RESIDUAL_SCALE = True  # init: writes into the residual stream (see GPT._init_weights)

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # Sampling: keep the keys and values of earlier positions, so a new token costs one position.
            k, v = kv_cache.update(self, k, v)  # (B, nh, T_past + T, hs)
        # softmax(q k^T / sqrt(hs)) v with a causal mask, in one fused kernel: FlashAttention on recent
        # GPUs (Dao et al. 2022), a memory-efficient kernel on CPUs; the (T, T) matrix is never stored.
        # A single new query (T == 1) may see every cached key, so it needs no mask.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """Each position on its own: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 used the tanh approximation of GELU (Hendrycks & Gimpel 2016); we keep it so that OpenAI's
        # weights give OpenAI's outputs.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 moved LayerNorm to each sub-block's input): the residual
    stream x passes through untouched, and attention ("communicate") and the MLP ("compute") add to it."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config, seed=1337):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),  # token embedding, (V, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding, (T, C)
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # GPT-2 added a final LayerNorm after the last block
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)  # (C, V): residual stream -> logits
        # Weight tying (Press & Wolf 2017): the output layer reuses the token embedding matrix. Tokens
        # that mean similar things should be near each other both going in and coming out, and it saves
        # V x C = 38.6M parameters, a third of GPT-2 small.
        self.transformer.wte.weight = self.lm_head.weight
        # Initialise from our own generator, so that the weights depend on `seed` alone.
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            self._init_weights(module, generator)

    def _init_weights(self, module, generator):
        # GPT-2's init: every weight ~ N(0, 0.02), biases 0, LayerNorm at identity (its own default).
        # This matters most for the tied matrix. nn.Embedding initialises with N(0, 1): the logits
        # x @ wte^T then have a standard deviation of about sqrt(C) = 28, the model starts out very sure
        # of random tokens, and the first loss is ~114 instead of -ln(1/50257) = 10.8, the loss of a
        # uniform guess. With std 0.02 every logit starts near 0, so the start loss is ~10.8.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # Each block adds twice to the residual stream, whose variance then grows with depth;
                # GPT-2 scales these projections by 1/sqrt(number of residual layers) = 1/sqrt(2 n_layer).
                std *= (2 * self.config.n_layer) ** -0.5
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
                if module is self.lm_head:
                    module.weight[self.config.vocab_size:].zero_()  # padded rows: never used
        elif isinstance(module, nn.Embedding) and module is not self.transformer.wte:  # wte = lm_head
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)

    def num_params(self):
        # Parameters are counted once even when shared (the tied wte/lm_head).
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache=None):
        """idx: (B, T) token ids. Returns (logits, loss): with targets (B, T), logits is None and loss is
        the mean cross-entropy; without, logits (B, T, vocab_size) and loss None."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0  # position of idx[:, 0]
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length += T
        if targets is None:
            # Sampling: the real vocabulary only, so the padded rows can never be drawn.
            logits = x @ self.lm_head.weight[: self.config.vocab_size].T  # (B, T, vocab_size)
            return logits, None
        loss = chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                     self.config.vocab_size)
        return None, loss


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk=2048):
    """Mean cross-entropy of the logits x @ weight^T (x: (N, C), weight: (V, C), targets: (N,)),
    computed `chunk` rows at a time so that all N x V logits never exist at once.

    Why: the lm_head is the biggest matmul of GPT-2 small (C x V = 768 x 50,304), and its logits are the
    biggest tensor by far: one micro-batch of 64 x 1024 has 64 x 1024 x 50,304 x 4 bytes = 13 GB of them.
    Reading and writing that much memory costs more time than the matmul itself on many machines.
    Columns past vocab_size (the padding) are set to -inf: they take no probability and get no gradient,
    so the loss is exactly the loss over GPT-2's 50,257 tokens."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, chunk)
    loss_sum = sum(F.cross_entropy(_masked_logits(x[i:i + chunk], weight, vocab_size), targets[i:i + chunk],
                                   reduction="sum") for i in range(0, x.size(0), chunk))
    return loss_sum / x.size(0)


def _masked_logits(x, weight, vocab_size):
    logits = (x @ weight.T).float()  # (rows, C) @ (C, V) -> (rows, V); fp32 for a stable softmax
    logits[:, vocab_size:] = float("-inf")  # the padded columns: probability exactly 0
    return logits


class ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and gradients in one pass over the chunks (the idea of "fused linear cross-entropy" kernels).
    With p = softmax(logits), d loss / d logits = (p - onehot(target)) / N. So as soon as a chunk's
    logits exist we turn them into that chunk's gradients for x and for the weight, and drop them.
    forward() does the matmuls of both passes (3 per chunk, as autograd would); backward() only scales."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk):
        N = x.size(0)
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)  # (V, C)
        for i in range(0, N, chunk):
            xc, tc = x[i:i + chunk], targets[i:i + chunk]
            logits = _masked_logits(xc, weight, vocab_size)  # (rows, V)
            lse = torch.logsumexp(logits, dim=1)  # (rows,)
            loss_sum += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()  # -log p(target)
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(len(tc), device=x.device), tc] -= 1  # p - onehot(target)
            grad_x[i:i + chunk] = dlogits @ weight  # (rows, V) @ (V, C) -> (rows, C)
            grad_w += dlogits.T @ xc  # (V, rows) @ (rows, C) -> (V, C)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.N, ctx.weight_dtype = N, weight.dtype
        return loss_sum / N

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.N
        return grad_x * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None


class KVCache:
    """Keys and values of the positions already seen, one pair of (B, nh, block_size, hs) tensors per
    attention layer, filled left to right. `length` is how many positions are filled."""

    def __init__(self, model, batch_size, device, dtype):
        c = model.config
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        self.layers = {id(b.attn): (torch.empty(shape, device=device, dtype=dtype),
                                    torch.empty(shape, device=device, dtype=dtype))
                       for b in model.transformer.h}
        self.length = 0

    def update(self, attn, k, v):
        """Store k, v (B, nh, T, hs) after the cached positions; return all keys and values so far."""
        k_all, v_all = self.layers[id(attn)]
        end = self.length + k.size(2)
        k_all[:, :, self.length:end] = k
        v_all[:, :, self.length:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]  # (B, nh, end, hs)


# -----------------------------------------------------------------------------
# 3. BPE encoding
# GPT-2 reads text as tokens from a byte-pair encoding (Sennrich et al. 2016) learned on WebText: 256 byte
# tokens, 50,000 merges of frequent pairs, and the special token <|endoftext|> (id 50256), which we put
# after every story, so the model learns where a story ends. tiktoken has the same BPE under two names:
# "gpt2" (downloads vocab.bpe and encoder.json) and "r50k_base" (one file, r50k_base.tiktoken). We use
# r50k_base, because its one file is easy to carry to a machine without internet:
#     enc.encode("Hello world") -> [15496, 995];  enc.decode([15496, 995]) -> "Hello world"

EOT = 50256  # <|endoftext|>
BPE_FILE_ENV = "GPT2_BPE_FILE"  # path to a local r50k_base.tiktoken, for machines without internet
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # of r50k_base.tiktoken


def get_tokenizer():
    """GPT-2's BPE as a tiktoken Encoding: from the file named by $GPT2_BPE_FILE if set, else tiktoken's
    own download (cached after the first use)."""
    path = os.environ.get(BPE_FILE_ENV)
    if not path:
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:  # no network: tiktoken raises whatever its HTTP client raised
            raise UserError(f"could not download GPT-2's BPE ({type(e).__name__}); without internet, set "
                            f"{BPE_FILE_ENV} to a copy of r50k_base.tiktoken (README: 'Offline use')") from e
    if not os.path.isfile(path):
        raise UserError(f"{BPE_FILE_ENV}={path}: no such file (README: 'Offline use')")
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != BPE_SHA256:
            raise UserError(f"{BPE_FILE_ENV}={path} is not GPT-2's BPE (sha256 differs from {BPE_SHA256})")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str  # the regex that splits text before BPE
    return tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, explicit_n_vocab=50257,
                             mergeable_ranks=load_tiktoken_bpe(path),
                             special_tokens={"<|endoftext|>": EOT})


# -----------------------------------------------------------------------------
# 4. Data loader
# prepare_tinystories.py writes the tokens of every story, each followed by <|endoftext|>, into shards in
# llm.c's format: a header of 256 little-endian int32 (magic 20240520, version 1, token count, then
# zeros), then the tokens as uint16 (every id < 65,536). TinyStories gives 473,804,270 train tokens and
# 4,550,817 validation tokens. We memory-map the shards, so the operating system pages tokens in as they
# are read and a 1 GB dataset costs no RAM of ours.
#
# Batches, as in the source run: cut the token stream into consecutive windows of T + 1 tokens, window i
# starting at token i*T. Its first T tokens are the input x, its last T the targets y (x shifted by one:
# y[t] is the token that follows x[0..t]). Each epoch visits every window once, in a shuffled order that
# depends only on (seed, epoch), so the loader's whole position is two integers: (epoch, batch).

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def atomic_write(path, write):
    """Call write(f) on a temporary file next to `path`, make it durable, then rename it over `path`.
    A crash at any moment leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_shard(path, tokens):
    """Write a 1-D array of token ids as an llm.c shard, atomically."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16)), \
        "token ids must fit in uint16"
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    atomic_write(path, lambda f: (f.write(header.tobytes()), f.write(tokens.astype("<u2").tobytes())))


def read_shard(path):
    """Memory-map a shard's tokens as a uint16 array, after checking its header against its size."""
    again = "re-run python prepare_tinystories.py --force"
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(SHARD_HEADER_INTS * 4), dtype="<i4")
    if len(header) < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC:
        raise UserError(f"{path}: not a token shard (bad magic number); {again}")
    if header[1] != SHARD_VERSION:
        raise UserError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}; {again}")
    expected = SHARD_HEADER_INTS * 4 + 2 * int(header[2])
    if os.path.getsize(path) != expected:
        raise UserError(f"{path}: header says {header[2]} tokens ({expected} bytes) but the file has "
                        f"{os.path.getsize(path)} bytes (truncated?); {again}")
    if header[2] == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(int(header[2]),))


class DataLoader:
    """Shuffled (B, T) batches from the shards of one split ("train" or "val") in data_dir.

    Windows are grouped into micro-batches of B: micro-batch j of an epoch is windows
    order[j*B : (j+1)*B] of that epoch's permutation `order`. With several processes (DDP, section 5),
    process `rank` of `world` takes micro-batches rank, rank + world, rank + 2*world, ...: a strided
    slice, so the processes read disjoint windows, and together, per step, exactly the windows that a
    single process with world times the accumulation would read."""

    def __init__(self, data_dir, split, B, T, seed, rank=0, world=1):
        self.B, self.T, self.seed, self.rank, self.world = B, T, seed, rank, world
        if not os.path.isdir(data_dir):
            raise UserError(f"no data directory {data_dir}: run python prepare_tinystories.py first")
        self.paths = sorted(glob.glob(os.path.join(data_dir, f"*{split}*.bin")))
        if not self.paths:
            raise UserError(f"no {split} shards (*{split}*.bin) in {data_dir}: "
                            f"run python prepare_tinystories.py first")
        self.shards = [read_shard(p) for p in self.paths]
        # Window w of shard s covers tokens [w*T, w*T + T + 1): (n - 1) // T whole windows per shard.
        # Windows never cross a shard boundary; the few tokens at each shard's end are left out.
        counts = [(len(s) - 1) // T if len(s) > 0 else 0 for s in self.shards]
        self.first_window = np.cumsum([0] + counts)  # global index of each shard's first window
        self.n_windows = int(self.first_window[-1])
        self.batches_per_epoch = self.n_windows // (B * world)  # per process; the remainder is skipped
        if self.batches_per_epoch == 0:
            raise UserError(f"{split} shards in {data_dir} hold {sum(map(len, self.shards))} tokens, too "
                            f"few for one batch of {world} x {B} x {T + 1}; use a smaller --batch-size "
                            f"or --block-size, or prepare more data")
        self.epoch, self.batch = 0, 0
        self._order = None  # the permutation of the current epoch, computed when first needed

    def state(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state(self, state):
        self.epoch, self.batch, self._order = state["epoch"], state["batch"], None

    def order(self, epoch):
        """The shuffled order of all windows in `epoch`, the same on every process and every run."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def windows(self, window_ids):
        """Stack the given windows into inputs x and targets y, both (len(window_ids), T) int64."""
        shard_ids = np.searchsorted(self.first_window, window_ids, side="right") - 1
        rows = []
        for s, w in zip(shard_ids, window_ids):
            start = (w - self.first_window[s]) * self.T
            rows.append(self.shards[s][start:start + self.T + 1])
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        return buf[:, :-1], buf[:, 1:]  # x: (B, T), y: (B, T), y shifted left by one

    def next_batch(self):
        if self._order is None:
            self._order = self.order(self.epoch)
        j = self.batch * self.world + self.rank  # this process's micro-batch, in the epoch's order
        x, y = self.windows(self._order[j * self.B:(j + 1) * self.B])
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        return x, y

    def fixed_batches(self, n_batches):
        """The same n_batches micro-batches every time: the validation set. A permutation with its own
        fixed seed spreads them over the whole split. Process `rank` takes its strided share."""
        order = np.random.default_rng(0).permutation(self.n_windows)
        n = min(n_batches, self.n_windows // self.B)
        return [self.windows(order[j * self.B:(j + 1) * self.B]) for j in range(self.rank, n, self.world)]
