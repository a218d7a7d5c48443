"""
GPT-2 (124M) trained from scratch on TinyStories, in one file that reads top to bottom as a lesson.

    python prepare_tinystories.py                      # download TinyStories, write GPT-2 token shards (once)
    python train_gpt2.py                               # train GPT-2 124M: 3000 steps x 524,288 tokens
    python train_gpt2.py --sample "Tommy had a puppy"  # write stories with the trained model
    torchrun --nproc_per_node=8 train_gpt2.py          # the same run, data-parallel over 8 GPUs
    python train_gpt2.py --bench                       # tokens/s, MFU and memory (on a CPU: README, Speed)

The defaults are the source run's setup; it reported a validation loss of 1.24 after 3000 steps (3.3 epochs
of TinyStories), 3 h 45 min on one A100. `python train_gpt2.py --help` lists every flag.

Sections, in order: 1. Config, 2. Model, 3. BPE encoding, 4. Data loader, 5. Training loop, 6. Sampling: the
lesson, all of GPT-2 and how it is trained. 7. Command line and machinery: you may stop reading before it.

References:
    GPT-2 paper: "Language Models are Unsupervised Multitask Learners", Radford et al. 2019
    OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
    Hugging Face GPT-2: transformers/models/gpt2/modeling_gpt2.py
    GPT-3 paper (batch size, LR schedule): "Language Models are Few-Shot Learners", Brown et al. 2020
    TinyStories: "How Small Can Language Models Be and Still Speak Coherent English?", Eldan & Li 2023
    Karpathy's build-nanogpt, nanoGPT and llm.c, whose shape this file follows.
"""

import argparse
import ctypes
import dataclasses
import functools
import glob
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import regex  # installed with tiktoken; Python's own re lacks the \p{L} classes of GPT-2's split pattern
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_base, r50k_pat_str


class UserError(Exception):
    """A mistake the user can fix. main() prints its one-line message, without a traceback."""


# -----------------------------------------------------------------------------
# 1. Config
# Three dataclasses hold every setting, with the source run's defaults. Each field is also a flag (section 7),
# its help text the flag's --help, so the defaults live here and nowhere else.

def arg(default, help, **kwargs):
    """A dataclass field whose metadata becomes an argparse flag (min: the smallest value it accepts)."""
    return field(default=default, metadata=dict(help=help, **kwargs))


def micro_batch(text):
    """The value of --batch-size: "auto" or a number of sequences."""
    try:
        return text if text == "auto" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, not {text!r}") from None


@dataclass
class GPTConfig:
    n_layer: int = arg(12, "number of transformer blocks", min=1)
    n_head: int = arg(12, "attention heads per block; must divide --n-embd", min=1)
    n_embd: int = arg(768, "width of the residual stream (channels C)", min=1)
    block_size: int = arg(1024, "context length T: the longest sequence the model sees", min=1)
    # 50,000 BPE merges + 256 byte tokens + 1 <|endoftext|> token = 50,257 (GPT-2's vocabulary).
    vocab_size: int = arg(50257, "number of real tokens (GPT-2's BPE has 50,257)", min=50257)
    # The embedding table is padded to a multiple of 64 rows (50,257 -> 50,304): GPU matmul kernels tile by 64 or
    # 128, and a ragged last tile runs a slow path. Extra rows are never an input, a target or sampled (GPT.forward).
    vocab_pad_to: int = arg(64, "pad the embedding table to a multiple of this, for speed (1 = no padding)", min=1)
    # How the model computes, not what: the textbook version or the fast one, same values (tests check it).
    attention: str = arg("sdpa", "sdpa: PyTorch's fused attention kernel (FlashAttention on recent GPUs); manual: "
                         "written out, the textbook (slower, stores the T x T matrix)", choices=["sdpa", "manual"])
    loss: str = arg("chunked", "chunked: the loss in row chunks, never all logits at once; plain: F.cross_entropy "
                    "over all (B*T, V) logits, the textbook (more memory)", choices=["chunked", "plain"])

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.vocab_pad_to) * self.vocab_pad_to


@dataclass
class TrainConfig:
    data_dir: str = arg("data/tinystories", "directory of token shards written by prepare_tinystories.py")
    out_dir: str = arg("log", "where ckpt.pt, metrics.jsonl and loss.png are written")
    # A step is 2**19 = 524,288 tokens, GPT-3 small's 0.5M batch: 64 sequences x 1024 tokens x 8 micro-
    # batches. 3000 steps x 524,288 = 1.57B tokens = 3.3 epochs of TinyStories' 473.8M train tokens.
    tokens_per_step: int = arg(524288, "tokens per optimizer step, all processes together (64 sequences x 1024 "
                                       "tokens x 8 micro-batches)", min=1)
    batch_size: int | str = arg("auto", "micro-batch B (sequences per forward pass, per process); auto: the "
                                "largest of 64, 32, 16, ... that divides the step and whose probe step fits in "
                                "memory", type=micro_batch, metavar="auto|INT", min=1)
    max_steps: int = arg(3000, "optimizer steps to train for", min=0)
    warmup_steps: int = arg(100, "steps of linear learning-rate warmup", min=0)
    # The schedule's length is fixed when a run starts: a run extended later with a larger --max-steps
    # goes on at --min-lr instead of stretching the cosine again (which would raise the LR mid-run).
    lr_decay_steps: int = arg(0, "step at which the cosine decay reaches --min-lr, the LR after it; 0: this "
                                 "run's --max-steps, kept on --resume", min=0)
    max_lr: float = arg(6e-4, "peak learning rate (GPT-3 small's)")
    min_lr: float = arg(6e-5, "learning rate at the end of the cosine decay (10% of the default max_lr)", min=0)
    weight_decay: float = arg(0.001, "AdamW weight decay on 2-D weights (the source run's; GPT-3 used 0.1)", min=0)
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)", min=0)
    eval_interval: int = arg(250, "evaluate the validation loss every this many steps", min=1)
    eval_tokens: int = arg(1310720, "tokens of the fixed validation set (20 x 64 sequences x 1024 tokens)", min=1)
    eval_prompt: str = arg("Once upon a time", "at every evaluation, continue this prompt (with a fixed seed) "
                                               "to watch the model learn")
    eval_sample_tokens: int = arg(64, "tokens of that continuation (0 = no sample)", min=0)
    ckpt_interval: int = arg(250, "write out_dir/ckpt.pt every this many steps (and at the end)", min=1)
    ckpt_minutes: float = arg(30, "also write it when this many minutes have passed since the last one: a session "
                                  "that ends loses at most that much work (0 = never)", min=0)
    seed: int = arg(1337, "seed for the weight init, the data order and sampling")
    device: str = arg("auto", "cuda (or cuda:N), mps or cpu; auto picks the first that is available")
    dtype: str = arg("auto", "float32, or bfloat16 or float16 (autocast; float16 with loss scaling); auto: "
                     "bfloat16 on GPUs with bf16 units (compute capability 8.0+), float16 on 7.x (T4, V100), "
                     "bfloat16 on CPUs with AMX or AVX512-BF16, else float32 (older GPUs, other CPUs, mps)",
                     choices=["auto", "float32", "bfloat16", "float16"])
    compile: bool = arg(None, "torch.compile the model (default: on for GPUs of compute capability 7.0+, else off)")
    resume: bool = arg(False, "continue the run saved in out_dir/ckpt.pt exactly where it stopped")
    init_from: str = arg("", "start from a Hugging Face GPT-2: a local directory or a hub name like gpt2")
    export_hf: str = arg("", "write out_dir/ckpt.pt here as a Hugging Face model directory (weights, tokenizer, "
                             "generation defaults, model card) that works offline", mode=True)
    plot: bool = arg(False, "plot out_dir/metrics.jsonl to out_dir/loss.png", mode=True)
    bench: bool = arg(False, "measure tokens/s, MFU, memory and sampling speed on random tokens (on a CPU, give "
                             "it a small model: see README.md, Speed)", mode=True)


@dataclass
class SampleConfig:
    sample: str = arg(None, "write completions of this prompt with out_dir/ckpt.pt, or with the --init-from "
                            "model (\"\" = a new story)")
    num_samples: int = arg(2, "completions to write", min=1)
    max_new_tokens: int = arg(256, "longest completion, in tokens (a story may end earlier)", min=1)
    temperature: float = arg(1.0, "divide the logits by this before sampling (lower = more predictable)")
    top_k: int = arg(50, "sample only among the k most likely tokens (0 = all)", min=0)


# -----------------------------------------------------------------------------
# 2. Model
# Shapes: B batch, T time (sequence position), C channels (n_embd), nh heads, hs head size (C // nh), V vocabulary
# (padded). Bottom-up: attention, MLP, the Block that joins them, then GPT.

class CausalSelfAttention(nn.Module):
    """Every position looks at itself and the positions before it, in n_head independent heads."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd, self.manual = config.n_head, config.n_embd, config.attention == "manual"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads' outputs back into C
        self.c_proj.RESIDUAL_SCALE = True  # init: writes into the residual stream (see GPT._init_weights)

    def forward(self, x, kv_cache=None, layer=0):  # kv_cache, layer: for sampling; ignore them until section 6
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # Sampling: keep the keys and values of earlier positions, so a new token costs one position.
            k, v = kv_cache.update(layer, k, v)  # (B, nh, Tk, hs), Tk = cached positions + T
        if self.manual:
            # The textbook (Vaswani et al. 2017): how well each query matches each key, scaled by
            # 1/sqrt(hs) so that the scores' variance does not grow with the head size.
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk)
            # Causal mask: query t (the last T of Tk positions) sees keys 0..t only, never the future.
            # Without a cache Tk = T and this is triu(1): True above the diagonal, the future.
            Tk = k.size(2)
            future = torch.ones(T, Tk, dtype=torch.bool, device=x.device).triu(Tk - T + 1)  # (T, Tk)
            att = att.masked_fill(future, float("-inf")).softmax(dim=-1)  # each row: weights summing to 1
            y = att @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs): a weighted mean of the values
        else:
            # The same in one fused kernel, FlashAttention (Dao et al. 2022) on recent GPUs and CPUs: the (T, Tk)
            # matrix is never stored: less memory, much less time. A single new query (T == 1) sees every key: no mask.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """Each position on its own: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2's tanh approximation of GELU (Hendrycks & Gimpel 2016), so that OpenAI's weights give OpenAI's outputs.
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

    def forward(self, x, kv_cache=None, layer=0):  # layer: this block's index, for its slot in the cache
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """The whole model: token + position embeddings -> n_layer Blocks -> final LayerNorm -> logits, with
    the output layer tied to the token embedding. No dropout: 3.3 epochs of TinyStories are too few to
    overfit, so model.train() and model.eval() change nothing here."""

    def __init__(self, config, seed=0):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),  # token embedding, (V, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding, (T, C)
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # GPT-2 added a final LayerNorm after the last block
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)  # weight (V, C): (B, T, C) -> (B, T, V)
        # Weight tying (Press & Wolf 2017): the output layer reuses the token embedding matrix. Tokens alike in meaning
        # should be near each other going in and coming out; tying saves V x C = 38.6M parameters, 31% of GPT-2 124M.
        self.transformer.wte.weight = self.lm_head.weight
        # Initialise from our own generator, so that the weights depend on `seed` alone.
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            self._init_weights(module, generator)

    def _init_weights(self, module, generator):
        # Every weight ~ N(0, 0.02), biases 0, LayerNorm at identity (its own default). (OpenAI's code gives wpe
        # std 0.01; HF's GPT-2 and nanoGPT use 0.02 for all, as we do.) This matters most for the tied matrix.
        # Were it N(0, 1), nn.Embedding's default (which a tie the other way round, lm_head.weight = wte.weight,
        # would keep), every logit x @ wte^T would be a sum of 768 products of size ~1, and since the residual
        # stream still carries the input token's own embedding e, that token's logit would be ~|e|^2 = C = 768:
        # the model would start out sure that every token repeats itself. The source run reported a first loss
        # of 114 (its setup is not known to us); this model with the tied matrix set to N(0, 1) starts at 739-746
        # (4 x 1024 real tokens, three seeds). With std 0.02 every logit starts near 0, and so does the loss at
        # -ln(1/50257) = 10.8, a uniform guess (ours, 124M: 10.98-11.04).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # Each block adds twice to the residual stream, whose variance then grows with depth; the
                # GPT-2 paper (section 2.3; not its released code) scales these by 1/sqrt(2 n_layer).
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
        return sum(p.numel() for p in self.parameters())  # the tied wte/lm_head counted once

    def forward(self, idx, targets=None, kv_cache=None):
        """idx: (B, T) token ids. Returns (logits, loss): without targets, the last position's logits
        (B, 1, vocab_size), all that sampling needs, and loss None; with targets (B, T), loss is the mean
        cross-entropy (logits: every position's with --loss plain, None with the chunked loss)."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0  # position of idx[:, 0]
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if kv_cache is not None:  # advanced here, once per forward: every layer's update() saw the same T
            kv_cache.length += T
        # Logits over the real vocabulary only: the padded rows are never sampled, never take probability.
        n_real = self.config.vocab_size  # the first 50,257 of V = 50,304 rows
        if targets is None:  # sampling: the last position's logits only, the ones that score the next token
            w = self.lm_head.weight[:n_real]  # (n_real, C); bf16 when sampling on a CPU (see for_sampling)
            return F.linear(x[:, -1:].to(w.dtype), w), None  # (B, 1, C) @ (C, n_real) -> (B, 1, n_real)
        if self.config.loss == "plain":
            # The textbook: every position's logits, then the mean of -log softmax(logits)[target].
            logits = self.lm_head(x)[..., :n_real]  # (B, T, C) -> (B, T, n_real)
            return logits, F.cross_entropy(logits.reshape(B * T, n_real), targets.reshape(-1))
        # The same loss without ever holding all (B*T, V) logits, which at 64 x 1024 are 13 GB in fp32 and
        # as much again for their gradient: computed in chunks of rows, in section 7.
        x, targets = x.reshape(B * T, -1), targets.reshape(-1)  # (B*T, C), (B*T,)
        return None, chunked_cross_entropy(x, self.lm_head.weight, targets, n_real)


# -----------------------------------------------------------------------------
# 3. BPE encoding
# GPT-2 reads text as tokens from a byte-pair encoding (Sennrich et al. 2016) learned on WebText: 256 byte tokens,
# 50,000 merges of frequent pairs, and the special token <|endoftext|> (id 50256). prepare_tinystories.py writes
# it after every story, so every story but the first comes right after one: the model learns where a story ends
# and how one starts (which is why a prompt is fed after it too).
# Encoding a text takes two steps:
#   1. split it into pieces with a regex: words with their leading space, numbers, punctuation, spaces;
#   2. in each piece, starting from its single bytes, merge adjacent pairs, the earliest-learned merge
#      (lowest rank) first, until no two adjacent parts join into a token; each part left is one token id.
#     "Once upon a time, Tommy had a puppy."
#       1. 'Once' ' upon' ' a' ' time' ',' ' Tommy' ' had' ' a' ' puppy' '.'
#       2. ' puppy': ' |p|u|p|p|y -> ' p|u|p|p|y -> ' p|u|pp|y -> ' p|upp|y -> ' pupp|y -> ' puppy'
#       -> [7454, 2402, 257, 640, 11, 19919, 550, 257, 26188, 13]: one token per common word.
#     A rare word takes several: 'Rumpelstiltskin' -> 'R' 'ump' 'el' 'st' 'ilts' 'kin'. No text is ever
#     out of the vocabulary: in the worst case it is spelled out byte by byte.
# bpe_encode() below is those two steps in Python; tiktoken (Rust) does the same thousands of times faster.

EOT = 50256  # <|endoftext|>


def bpe_encode(text, ranks):
    """GPT-2's token ids of `text`, written out: the same ids as tiktoken's encode_ordinary (tests check
    it), slowly. ranks: {token bytes: id}, an id being also the merge's rank (its order of learning)."""
    ids = []
    for piece in regex.findall(r50k_pat_str, text):  # step 1: the pieces
        parts = [bytes([b]) for b in piece.encode("utf-8")]  # step 2: from single bytes...
        while len(parts) > 1:
            # ...the rank of each adjacent pair's merge (inf: the pair is not a token)...
            pair_ranks = [ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:])]
            if min(pair_ranks) == math.inf:
                break  # no two adjacent parts join into a token: done
            i = pair_ranks.index(min(pair_ranks))  # ...and merge the pair learned first
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[part] for part in parts]
    return ids


def get_tokenizer():
    """GPT-2's BPE as a tiktoken Encoding: encode_ordinary(text) -> ids, decode(ids) -> text (merges: bpe_ranks())."""
    return tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=bpe_ranks(),
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


# -----------------------------------------------------------------------------
# 4. Data loader
# prepare_tinystories.py writes the tokens of every story, each followed by <|endoftext|>, into shards in llm.c's
# format: a header of 256 little-endian int32 (magic 20240520, version 1, token count, then zeros), then the
# tokens as uint16 (every id < 65,536). TinyStories gives 473,804,270 train tokens and 4,550,817 validation
# tokens. We memory-map the shards: the operating system pages tokens in as they are read, and a 1 GB dataset
# costs no RAM of ours.
# Batches, as in the source run: cut the token stream into consecutive windows of T + 1 tokens, window i starting
# at token i*T. Its first T tokens are the input x, its last T the targets y (x shifted by one: y[t] is the token
# that follows x[0..t]). Each epoch visits every window once, in a shuffled order that depends only on (seed,
# epoch), so the loader's whole position is two integers: (epoch, window). Windows ignore story boundaries: one
# of 1024 tokens holds several short stories, and attention reads across the <|endoftext|> between them (no mask
# stops it), as GPT-3's training did (its paper, appendix B); the model learns that what comes before
# <|endoftext|> says little about what comes after.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_NAME = "tinystories_{split}_{index}.bin"  # index: 000, 001, ... (prepare_tinystories.py writes them)


def shard_paths(data_dir, split):
    """The shards of one split ("train" or "val") in data_dir, in order; a clear error if there are none."""
    if not os.path.isdir(data_dir):
        raise UserError(f"no data directory {data_dir}: run python prepare_tinystories.py first, or point "
                        f"--data-dir at the directory it wrote")
    pattern = SHARD_NAME.format(split=split, index="[0-9][0-9][0-9]")  # e.g. tinystories_train_[0-9][0-9][0-9].bin
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), pattern)))
    if not paths:
        raise UserError(f"no {split} shards ({SHARD_NAME.format(split=split, index='NNN')}) in {data_dir}: "
                        f"run python prepare_tinystories.py first")
    return paths


def read_shard(path):
    """Memory-map a shard's tokens as a uint16 array, after checking its header against its size."""
    again, size = "re-run python prepare_tinystories.py --force", os.path.getsize(path)
    with open(path, "rb") as f:  # a file cut short inside its header reads as zeros there
        header = np.frombuffer(f.read(SHARD_HEADER_INTS * 4).ljust(SHARD_HEADER_INTS * 4, b"\0"), dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise UserError(f"{path}: not a token shard (bad magic number); {again}")
    if header[1] != SHARD_VERSION and size >= SHARD_HEADER_INTS * 4:  # (a cut header: truncated, below)
        raise UserError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}; {again}")
    n = int(header[2])
    if size != SHARD_HEADER_INTS * 4 + 2 * n:
        raise UserError(f"{path}: header says {n} tokens ({SHARD_HEADER_INTS * 4 + 2 * n} bytes) but the file has "
                        f"{size} bytes (truncated?); {again}")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,)) if n else np.zeros(0, "<u2")


class DataLoader:
    """Shuffled (B, T) batches from the shards of one split ("train" or "val") in data_dir.

    The epochs' shuffled orders, one after another, form one endless list of windows, read B at a time:
    micro-batch j is list[j*B : (j+1)*B] (one may span the end of an epoch; no window is ever skipped).
    With several processes (DDP, section 5), process `rank` of `world` takes micro-batches rank,
    rank + world, rank + 2*world, ...: a strided slice, so the processes read disjoint windows, and
    together, per step, exactly the windows that one process with world times the accumulation reads."""

    def __init__(self, data_dir, split, B, T, seed, rank=0, world=1):
        self.B, self.T, self.seed, self.rank, self.world = B, T, seed, rank, world
        self.shards = [read_shard(p) for p in shard_paths(data_dir, split)]
        # Window w of shard s covers tokens [w*T, w*T + T + 1): (n - 1) // T whole windows per shard. Windows
        # never cross a shard boundary; the few tokens at each shard's end are left out.
        counts = [max(len(s) - 1, 0) // T for s in self.shards]
        self.first_window = np.cumsum([0] + counts)  # global index of each shard's first window
        self.n_windows = int(self.first_window[-1])
        if self.n_windows < B * world:
            raise UserError(f"the {split} shards in {data_dir} hold {sum(map(len, self.shards)):,} tokens: too "
                            f"few for {world} x {B} sequences of {T + 1} tokens (processes x --batch-size, "
                            f"--block-size + 1); use a smaller --batch-size or --block-size, or prepare more data")
        self.position = 0  # windows read by all processes together, over all epochs
        self._order = None  # (epoch, its permutation), computed when first needed

    def state(self):
        """The position as (epoch, windows of this epoch read by all processes together)."""
        return {"epoch": self.position // self.n_windows, "window": self.position % self.n_windows}

    def load_state(self, state):
        position = state["epoch"] * self.n_windows + state["window"]
        if position % (self.world * self.B):
            raise UserError(f"cannot resume the data order at window {state['window']} with "
                            f"{self.world} x {self.B} windows per micro-batch: keep --tokens-per-step as it was")
        self.position = position

    def windows(self, window_ids):
        """Stack the given windows into inputs x and targets y, both (len(window_ids), T) int64."""
        # Which shard holds each window: the last shard whose first window is <= the window's index.
        shard_ids = np.searchsorted(self.first_window, window_ids, side="right") - 1
        rows = []
        for s, w in zip(shard_ids, window_ids):
            start = (w - self.first_window[s]) * self.T  # windows start every T tokens, and overlap by one
            rows.append(self.shards[s][start:start + self.T + 1])  # reads only these T + 1 tokens from disk
        # int64: the id type nn.Embedding and cross_entropy take (uint16 saves disk, not compute).
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        return buf[:, :-1], buf[:, 1:]  # x: (B, T), y: (B, T), y shifted left by one

    def next_batch(self):
        start = self.position + self.rank * self.B
        x, y = self.windows(np.array([self._window(p) for p in range(start, start + self.B)]))
        self.position += self.world * self.B
        return x, y

    def _window(self, p):
        """The window at position p of the endless list: entry i of epoch e's shuffled order."""
        epoch, i = divmod(p, self.n_windows)
        if self._order is None or self._order[0] != epoch:  # a new epoch's order: the same on every process, every run
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._order[1][i]

    def fixed_batches(self, n_windows):
        """The same micro-batches every time, n_windows windows in all (whole micro-batches, at least one per
        process, at most the split): the validation set. A permutation with its own fixed seed spreads them
        over the whole split, whatever B is. Process `rank` takes its strided share."""
        order = np.random.default_rng(0).permutation(self.n_windows)
        n = max(min(n_windows, self.n_windows) // self.B, self.world)  # micro-batches (the split has >= world)
        return [self.windows(order[j * self.B:(j + 1) * self.B]) for j in range(self.rank, n, self.world)]


# -----------------------------------------------------------------------------
# 5. Training loop
# One optimizer step = tokens_per_step tokens (524,288 by default) in micro-batches of B x T, whose gradients are
# summed before AdamW updates the weights. With torchrun, `world` processes (one per GPU) each run their share of
# the micro-batches, and DistributedDataParallel (DDP) averages their gradients. First, the process.

@dataclass(frozen=True)
class Runtime:
    """Where this process runs (made by setup_process), passed explicitly: never a global."""
    device: str  # "cuda:0", "mps" or "cpu"
    dtype: torch.dtype  # of autocast: torch.bfloat16 or torch.float16, or torch.float32 (no autocast)
    rank: int = 0  # this process's index under torchrun; process 0 prints, logs and writes the files
    world: int = 1  # number of processes

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """Mixed precision (Micikevicius et al. 2018): in this context the matmuls run in 16-bit floats on the
        tensor cores, while the weights, AdamW and the sensitive ops (softmax, LayerNorm, the loss) stay fp32.
        bf16 has fp32's range, so nothing else changes; fp16 needs loss scaling (see train())."""
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @functools.cached_property
    def peak_flops(self):  # the device's peak FLOP/s, for MFU (section 7): looked up or measured once
        return device_peak_flops(self)

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)


def setup_process(cfg):
    """This process's device and dtype, and the process group under torchrun (main() calls this, then train())."""
    device = cfg.device if cfg.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # the GPU that a bare "cuda" means from now on
    if world > 1:
        # NCCL moves gradients GPU to GPU; gloo does the same job for CPU tensors.
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")  # main() destroys it at exit
    if device.startswith("cuda"):
        # TF32: fp32 matmuls (those outside autocast) run on the tensor cores with a 10-bit mantissa
        # (Ampere and newer): several times faster, and precise enough for training.
        torch.set_float32_matmul_precision("high")
    # bf16 where the hardware has it, fp16 on T4 and V100, fp32 elsewhere (choose_dtype, section 7).
    return Runtime(device=device, dtype=choose_dtype(cfg.dtype, device), rank=rank, world=world)


def get_lr(step, cfg):
    """Linear warmup to max_lr, cosine decay to min_lr at lr_decay_steps, then min_lr (GPT-3 paper,
    appendix B). A pure function of (step, config): a resumed run gets the same LR at the same step."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps  # 0: not fixed yet (train() fixes it at the start)
    if step < cfg.warmup_steps:  # warmup: lr ramps up from max_lr / warmup_steps
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:  # after the schedule (a run extended with a larger --max-steps): the floor
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)  # cosine


def configure_optimizer(model, cfg, device_type):
    """AdamW with GPT-3's betas. Weight decay pulls weights towards 0; it goes on the 2-D tensors (the
    matmul weights and embeddings) only: decaying biases and LayerNorm gains brings no benefit."""
    params = [p for p in model.parameters() if p.requires_grad]  # lists the tied wte/lm_head once: one update per step
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel (CUDA; CPU since PyTorch 2.4) updates all parameters, not a dozen small ops per tensor.
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8, fused=device_type in ("cuda", "cpu"))


def train_step(runner, optimizer, scaler, next_batch, grad_accum, rt, lr, grad_clip, stop=lambda: False):
    """One optimizer step over grad_accum micro-batches from next_batch(). `runner` is the model as it runs
    (in train(): compiled, and wrapped by DDP under torchrun). Returns (mean loss, gradient norm) as tensors;
    the weights are left alone when either is inf or nan. (None, None): stop() asked to stop mid-step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        if stop():  # Ctrl-C or SIGTERM: drop the step's gradients; the run is saved as at its start
            optimizer.zero_grad(set_to_none=True)
            return None, None
        x, y = next_batch()
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        # DDP all-reduces the gradients at every backward(); in between we only add them up locally,
        # so we skip the sync until the last micro-batch (no_sync) and pay for one all-reduce per step.
        # no_sync must wrap the forward pass: DDP decides there whether the coming backward() syncs.
        sync_now = rt.world == 1 or micro == grad_accum - 1
        with nullcontext() if sync_now else runner.no_sync(), rt.autocast():  # torch.autocast (see Runtime)
            loss = runner(x, y)[1]  # (logits, loss): the logits, if any, are not kept
        # The loss is a mean over a micro-batch; dividing by grad_accum makes the summed gradients those
        # of the mean over the whole step, as if it were one big batch. (fp16: times the loss scale.)
        scaler.scale(loss / grad_accum).backward()
        loss_sum += loss.detach()
    if rt.world > 1:  # the loss of the whole step, averaged over processes, for the log
        dist.all_reduce(loss_sum)  # a sum (gloo averages only in recent PyTorch), divided below
        loss_sum /= rt.world
    scaler.unscale_(optimizer)  # fp16: the true gradients again, before they are clipped
    # Clip the global gradient norm: a rare bad batch then cannot throw the weights far off.
    norm = torch.nn.utils.clip_grad_norm_(runner.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    loss = loss_sum / grad_accum
    if torch.isfinite(loss + norm):  # a nan/inf would poison the weights: skip the update (waits for the device)
        scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
    scaler.update()  # fp16: halve the scale after an inf gradient, double it after 2000 good steps
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


@torch.no_grad()
def evaluate(model, batches, rt, stop=lambda: False):
    """Mean loss over fixed batches (averaged over all processes): comparable between steps and runs."""
    model.eval()
    total = torch.zeros(2, device=rt.device)  # (loss sum, count), on the device: one sync at the end, not per batch
    for x, y in batches:
        if rt.world == 1 and stop():  # Ctrl-C: no val loss. Not under torchrun: stop() is collective, shares can differ
            return None
        with rt.autocast():
            loss = model(x.to(rt.device), y.to(rt.device))[1]
        total += torch.stack([loss.float(), torch.ones((), device=rt.device)])
    if rt.world > 1:  # add up every process's (sum, count), so all of them return the same mean
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def progress_sample(model, enc, cfg, rt):
    """cfg.eval_prompt continued, same seed at every evaluation: watch stories take shape (process 0; None if off)."""
    if enc is None:
        return None
    model.eval()
    sampler = SampleConfig(num_samples=1, max_new_tokens=cfg.eval_sample_tokens)  # top-k 50, temperature 1
    with rt.autocast():  # the training weights as they are, in the training precision
        texts, _ = complete(model, enc, cfg.eval_prompt, sampler, rt, cfg.seed)  # (section 6)
    model.train()
    return texts[0]


def train(model_cfg, cfg, rt, ckpt=None, init_weights=None):
    """Train (or continue ckpt's run) into cfg.out_dir. Returns {"step", "val_loss", "signal" (if stopped)}."""
    if not cfg.lr_decay_steps:  # a new run fixes its schedule's length (saved in its checkpoints)
        cfg = dataclasses.replace(cfg, lr_decay_steps=cfg.max_steps)
    model = GPT(model_cfg, seed=cfg.seed)  # a random init from the seed, or --init-from's weights
    if init_weights is not None:
        load_weights(model, init_weights, cfg.init_from)
    model.to(rt.device)
    optimizer = configure_optimizer(model, cfg, rt.device_type)
    # fp16 (GPUs before Ampere have no bf16 units) has 5 exponent bits: gradients below 6e-8 would round to
    # 0. So fp16 training multiplies the loss by a large "loss scale" before backward() and the gradients
    # by its inverse after; when a gradient overflows to inf, the step is skipped and the scale halved.
    # For bf16 and fp32 the scaler is off: scale(), unscale_() and update() do nothing, step() is optimizer.step().
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    # torch.compile traces the model into fused kernels (Triton on GPUs): the many small elementwise ops
    # between the matmuls run as a few kernels, which saves most of their memory traffic. `compiled` shares
    # the weights of `model`, the plain module that checkpoints and sampling use.
    compiled = torch.compile(model) if use_compile(cfg, rt) else model  # by default on GPUs of capability 7.0+

    # A step is tokens_per_step = B x T x grad_accum x world. The micro-batch B (--batch-size, or auto: the
    # largest that fits, section 7) only splits it: 16 x 1024 x 32 on a 16 GB GPU is the same update.
    T = model_cfg.block_size
    B = cfg.batch_size if cfg.batch_size != "auto" else fit_micro_batch(compiled, model, cfg, rt)
    grad_accum = cfg.tokens_per_step // (B * T * rt.world)  # 524,288 // (64 x 1024 x 1) = 8
    if grad_accum * B * T * rt.world != cfg.tokens_per_step:
        raise UserError(f"--tokens-per-step {cfg.tokens_per_step:,} is not a multiple of {B} x {T} x {rt.world} "
                        f"(micro-batch x --block-size x processes): change one of them")
    train_loader = DataLoader(cfg.data_dir, "train", B, T, cfg.seed, rt.rank, rt.world)
    val_batches = DataLoader(cfg.data_dir, "val", B, T, cfg.seed, rt.rank, rt.world) \
        .fixed_batches(cfg.eval_tokens // T)  # the same windows for any B that divides their number
    rt.log(f"model: {model.num_params():,} parameters | {cfg.tokens_per_step:,} tokens per step = "
           f"{f'{rt.world} processes x ' if rt.world > 1 else ''}{grad_accum} micro-batches of {B} x {T}, "
           f"{train_loader.n_windows * T / cfg.tokens_per_step:.1f} steps per epoch | device {rt.device}, "
           f"{str(rt.dtype).removeprefix('torch.')}")
    run = TrainingRun(model_cfg, cfg, rt, model, optimizer, scaler, train_loader, ckpt)  # files, log, signals
    runner = compiled  # what runs the steps: under torchrun, wrapped by DDP
    if rt.world > 1:
        runner = DDP(compiled, device_ids=[rt.device] if rt.device_type == "cuda" else None)
    enc = sample_tokenizer(cfg, rt)  # for the samples at each evaluation (process 0; None: no samples)

    with run.signals():  # Ctrl-C or SIGTERM: stop at the next micro-batch, save a checkpoint, exit
        for step in range(run.start_step, cfg.max_steps):
            if step % cfg.eval_interval == 0:  # before update `step`: the val loss after `step` updates
                val_loss = evaluate(compiled, val_batches, rt, stop=run.stop_requested)
                if val_loss is None:  # Ctrl-C or SIGTERM during the evaluation
                    return run.stopped(step)
                run.log_eval(step, val_loss, progress_sample(model, enc, cfg, rt))
            # One optimizer step, timed. The loss is the mean over the step's tokens.
            t0 = time.perf_counter()
            lr = get_lr(step, cfg)
            loss, norm = train_step(runner, optimizer, scaler, train_loader.next_batch, grad_accum, rt, lr,
                                    cfg.grad_clip, stop=run.stop_requested)
            if loss is None:  # stopped in the middle of the step: its micro-batches are dropped
                return run.stopped(step)
            loss, norm = loss.item(), norm.item()
            if not math.isfinite(loss + norm):  # then the weights were not updated: after an fp16 overflow
                run.skip_or_stop(step, loss, norm)  # the step is skipped; anything else is a divergence
            run.log_step(step, loss, lr, norm, time.perf_counter() - t0)
            # Checkpoints come between optimizer steps, when the state is complete and consistent.
            if (step + 1) % cfg.ckpt_interval == 0 or step + 1 == cfg.max_steps or run.checkpoint_due():
                run.save(step + 1)
            if run.stop_requested():
                return run.stopped(step + 1)
    val_loss = evaluate(compiled, val_batches, rt)  # after the last update
    return run.finish(val_loss, progress_sample(model, enc, cfg, rt))


# -----------------------------------------------------------------------------
# 6. Sampling
# The model gives a probability for every possible next token; we draw one, append it, and repeat. top-k keeps
# the k likeliest (nonsense lives in the long tail); temperature sharpens (< 1) or flattens (> 1) them.

class KVCache:
    """Keys and values of the positions seen, (B, nh, block_size, hs) each per layer; the first `length` filled."""

    def __init__(self, model, batch_size):
        c = model.config
        self.shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        self.layers = [None] * c.n_layer  # (keys, values) of each layer, allocated by its first update()
        self.length = 0

    def update(self, layer, k, v):
        """Store layer's k, v (B, nh, T, hs) after the cached positions; return all its keys and values."""
        # After the prefill, one token at a time: several would need a causal mask offset by the cache length.
        assert self.length == 0 or k.size(2) == 1, "after the prefill the cache takes one token at a time"
        if self.layers[layer] is None:  # in the dtype and on the device the keys come in
            self.layers[layer] = (k.new_empty(self.shape), v.new_empty(self.shape))
        k_all, v_all = self.layers[layer]
        end = self.length + k.size(2)
        k_all[:, :, self.length:end] = k
        v_all[:, :, self.length:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]  # (B, nh, end, hs)


@torch.inference_mode()  # no autograd bookkeeping at all: less overhead per op than no_grad
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True,
             stop_at_eot=True):
    """Extend each row of idx (B, T0) by up to max_new_tokens sampled tokens; returns (B, T0 + n). Stops early
    once every row has produced <|endoftext|> (unless stop_at_eot is False).

    With use_cache, the prompt goes through the model once ("prefill"), then each step feeds only the newest token,
    attending to the cached keys and values: one position of work per token, not the whole context. Once the text
    outgrows block_size, the oldest tokens are dropped; with learned absolute positions every remaining token then
    moves to a new position, so the cache is of no use: we recompute the last block_size tokens each step."""
    T_max = model.config.block_size
    idx = idx[:, -T_max:]  # a prompt longer than the context keeps its end
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache or idx.size(1) > T_max:
            logits, _ = model(idx[:, -T_max:])  # (B, 1, vocab_size)
        elif cache is None:  # prefill: the whole prompt at once
            cache = KVCache(model, idx.size(0))
            logits, _ = model(idx, kv_cache=cache)
        else:  # one new position: the token after the cached ones
            logits, _ = model(idx[:, cache.length:], kv_cache=cache)
        logits = logits[:, -1, :].float()  # (B, 1, vocab_size) -> (B, vocab_size): the next token's scores
        if top_k:  # draw among the k largest only: (B, k) values and their token ids
            logits, token_ids = torch.topk(logits, min(top_k, logits.size(-1)))
        # Dividing by a temperature > 0 keeps the order, so it can come after top-k (k values, not V).
        probs = F.softmax(logits / temperature, dim=-1)  # (B, k) or (B, vocab_size)
        next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        if top_k:
            next_id = token_ids.gather(1, next_id)  # position among the k -> token id
        idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        done |= next_id.squeeze(1) == EOT
        if stop_at_eot and done.all():
            break
    return idx


def complete(model, enc, prompt, cfg, rt, seed, use_cache=True):
    """cfg.num_samples completions of the string `prompt`, each cut at its first <|endoftext|>: (texts, tokens made)."""
    ids = [EOT] + enc.encode_ordinary(prompt)  # a story's start, as in training (section 3); "": a new story
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=rt.device)  # (num_samples, T0)
    generator = torch.Generator(device=rt.device).manual_seed(seed)  # sampling never touches training RNG
    out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator, use_cache)
    texts, kept = [], min(len(ids), model.config.block_size)  # generate() keeps at most block_size of the prompt
    for row in out.tolist():
        new = row[kept:]
        new = new[:new.index(EOT)] if EOT in new else new  # a story ended
        texts.append(prompt + enc.decode(new))
    return texts, out[:, kept:].numel()


# -----------------------------------------------------------------------------
# 7. Command line and machinery
# You may stop reading here: sections 1-6 are the whole of GPT-2 and how it is trained. What follows serves the
# machine and the user: the flags and main(), devices and their peak FLOP/s, a run's bookkeeping, memory, the
# chunked loss, GPT-2's BPE file, Hugging Face import and export, --bench and --plot.

CONFIGS = (GPTConfig, TrainConfig, SampleConfig)
COMPUTE_FIELDS = ("attention", "loss")  # GPTConfig fields that change how the model computes, not its weights


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line that says what is wrong, not argparse's usage block first
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    """(model, train, sample configs, the names of the flags given). Each dataclass field is a flag: --n-layer."""
    parser = ArgumentParser(allow_abbrev=False,  # --lr must not pass for --lr-decay-steps
        description="Train GPT-2 on TinyStories, sample from it, benchmark it.",
        epilog="examples:\n" + __doc__[__doc__.index("    python prepare"):__doc__.index("\nThe defaults")],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = [parser.add_argument_group(title) for title in ("model", "training", "sampling")]
    modes = parser.add_argument_group("modes (each does its job, then exits)")
    for cls, group in zip(CONFIGS, groups):
        for f in dataclasses.fields(cls):
            help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
            if f.default is not None and f.default is not False and f.default != "":  # (0 is a default to show)
                help_text += f" (default: {str(f.default).replace('%', '%%')})"
            # SUPPRESS: flags not on the command line stay out of the namespace, so we know which were given.
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
            if f.type is bool:  # --resume (off unless given), or a three-way switch: --compile, --no-compile, auto
                kwargs["action"] = argparse.BooleanOptionalAction if f.default is None else "store_true"
            elif "type" in f.metadata:  # a field that parses its own values: --batch-size takes auto or a number
                kwargs.update(type=f.metadata["type"], metavar=f.metadata["metavar"])
            else:  # choices, if any, are listed by --help
                kwargs.update(type=f.type, choices=f.metadata.get("choices"),
                              metavar=None if "choices" in f.metadata else f.type.__name__.upper())
            (modes if f.metadata.get("mode") else group).add_argument("--" + f.name.replace("_", "-"), **kwargs)
    given = vars(parser.parse_args(argv))  # only the flags on the command line (default=SUPPRESS)
    configs = [cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}) for cls in CONFIGS]
    if error := validate(*configs):
        parser.error(error)  # prints the message, exits with status 2
    return (*configs, set(given))


def validate(model_cfg, cfg, sample_cfg):
    """The first problem with the settings, as a message for the user, or None (smallest values: metadata's min)."""
    for config in (model_cfg, cfg, sample_cfg):
        for f in dataclasses.fields(config):
            value, low = getattr(config, f.name), f.metadata.get("min")
            if low is not None and value != "auto" and value < low:
                must = {0: "cannot be negative", 1: "must be positive"}.get(low, f"must be at least {low}")
                return f"--{f.name.replace('_', '-')} {must}, not {value}"
    if model_cfg.n_embd % model_cfg.n_head:
        return f"--n-embd {model_cfg.n_embd} must be divisible by --n-head {model_cfg.n_head}"
    if cfg.min_lr > cfg.max_lr:
        return f"need --min-lr <= --max-lr (got {cfg.min_lr} and {cfg.max_lr})"
    if sample_cfg.temperature <= 0:
        return "--temperature must be positive"
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        return f"--device {cfg.device}: unknown; use auto, cpu, cuda (or cuda:N) or mps"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available() or cfg.device == "mps" and not \
            torch.backends.mps.is_available():
        return f"--device {cfg.device}: not available on this machine; use --device cpu or leave it at auto"
    return None


def continued_config(source_cfg, model_cfg, given, source):
    """The config of a model from `source` (checkpoint, HF model): its shape, and --attention/--loss if given."""
    for f in dataclasses.fields(GPTConfig):
        asked, have = getattr(model_cfg, f.name), getattr(source_cfg, f.name)
        if f.name in given and f.name not in COMPUTE_FIELDS and asked != have:
            raise UserError(f"--{f.name.replace('_', '-')} {asked} differs from {have} in {source}: the model "
                            f"shape comes from there; drop the flag (or start a new run in another --out-dir)")
    return dataclasses.replace(source_cfg, **{k: getattr(model_cfg, k) for k in COMPUTE_FIELDS if k in given})


def saved_settings(ckpt):
    """A checkpoint's training settings; an old one's (counted in micro-batches, cosine to max_steps) converted."""
    saved = {"lr_decay_steps": ckpt["config"]["train"]["max_steps"], **ckpt["config"]["train"]}
    if "grad_accum" in saved:
        tokens = (64 if saved["batch_size"] == "auto" else saved["batch_size"]) * ckpt["config"]["model"]["block_size"]
        saved.update(tokens_per_step=saved.pop("grad_accum") * tokens, eval_tokens=saved.pop("eval_batches") * tokens)
    return saved


def preflight(model_cfg, cfg, rt, start_step):
    """Checks before the model is built and probed (minutes on a CPU): the data, a CPU's RAM, a CPU's time."""
    for split in ("train", "val"):
        shard_paths(cfg.data_dir, split)
    check_cpu_memory(model_cfg, cfg.batch_size, rt)
    flops = flops_per_token(model_cfg) * cfg.tokens_per_step * (cfg.max_steps - start_step)
    eta = flops / (0.5 * rt.peak_flops * rt.world)  # at half the device's peak FLOP/s
    if rt.device_type != "cuda" and eta > 12 * 3600:  # (GPT-2 124M on a CPU: years)
        rt.log(f"note: on {rt.device} this run will take roughly {eta / 86400:,.1f} days. For one that "
               f"finishes within an hour or two, see 'Train on a CPU' in README.md (Ctrl-C stops and saves).")


def load_weights(model, state_dict, source):
    """model.load_state_dict(state_dict), with one clear line if the weights do not fit the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"the weights of {source} do not fit its config: {str(e).splitlines()[0]}") from e
    return model


def run(model_cfg, cfg, sample_cfg, given):
    """Dispatch to the mode asked for; returns the process's exit status."""
    ckpt_path, ckpt = os.path.join(cfg.out_dir, "ckpt.pt"), None
    if cfg.plot or cfg.export_hf:  # the modes that need no device: they read files and exit
        return plot_metrics(cfg.out_dir) if cfg.plot else export_run(ckpt_path, cfg.export_hf)
    if cfg.resume and sample_cfg.sample is None and not cfg.bench:  # training: continue a checkpoint
        if cfg.init_from:
            raise UserError("--resume continues out_dir's run and --init-from starts a new one: pick one")
        ckpt = load_checkpoint(ckpt_path)
        model_cfg = continued_config(GPTConfig(**ckpt["config"]["model"]), model_cfg, given, ckpt_path)
        # Its saved settings, device and dtype included (so before setup_process); flags given now override them.
        saved = saved_settings(ckpt)
        changed = sorted(k for k in given & saved.keys() if getattr(cfg, k) != saved[k] and k != "resume")
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in given if k in saved}})
        if error := validate(model_cfg, cfg, sample_cfg):  # e.g. the saved --device is not on this machine
            raise UserError(f"{ckpt_path}: {error}")
    rt = setup_process(cfg)
    if ckpt is not None:
        rt.log(f"resuming {ckpt_path} at step {ckpt['step']}" + (f"; changed: {', '.join(changed)}" if changed else ""))
    if sample_cfg.sample is not None:  # under torchrun, process 0 samples
        return sample(model_cfg, cfg, sample_cfg, given, rt) if rt.master else 0
    if cfg.bench:
        return bench(model_cfg, cfg, sample_cfg, rt)
    if ckpt is None and os.path.exists(ckpt_path):  # a new run, from scratch or --init-from, never overwrites one
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or train into another --out-dir")
    init_weights = None
    if cfg.init_from:
        hf_cfg, init_weights = load_hf(cfg.init_from)
        model_cfg = continued_config(hf_cfg, model_cfg, given, cfg.init_from)
    preflight(model_cfg, cfg, rt, ckpt["step"] if ckpt else 0)
    result = train(model_cfg, cfg, rt, ckpt, init_weights)
    return 128 + result["signal"] if result["signal"] else 0


def sample(model_cfg, cfg, sample_cfg, given, rt):
    """--sample: completions of the prompt by out_dir's checkpoint, or by the --init-from model."""
    source = cfg.init_from or os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None if cfg.init_from else load_checkpoint(source)
    source_cfg, weights = load_hf(source) if ckpt is None else (GPTConfig(**ckpt["config"]["model"]), ckpt["model"])
    model = load_weights(GPT(continued_config(source_cfg, model_cfg, given, source)), weights, source)
    model = for_sampling(model.to(rt.device), rt)
    generate(model, torch.tensor([[EOT]], device=rt.device), 2)  # warm-up: a device's first calls are slow
    t0 = time.perf_counter()  # (generate() waits for the device: it reads each new token)
    texts, n = complete(model, get_tokenizer(), sample_cfg.sample, sample_cfg, rt, cfg.seed)
    dt = time.perf_counter() - t0
    print("".join(f"--- sample {i + 1} ---\n{text}\n\n" for i, text in enumerate(texts)), end="", flush=True)
    print(f"({n} tokens in {dt:.1f} s: {n / dt:.0f} tokens/s)", file=sys.stderr)
    return 0


def main(argv=None):
    model_cfg, cfg, sample_cfg, given = parse_args(argv)
    try:
        return run(model_cfg, cfg, sample_cfg, given)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: quit without saving (the last checkpoint, if any, is kept)", file=sys.stderr)
        return 130
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or a CPU's failed allocation
        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory ({str(e).strip().splitlines()[0][:120]}): use --batch-size auto, or a smaller "
              f"--batch-size; the last checkpoint, if any, is kept", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- Devices and precision: the dtype of training and of sampling, the device's peak FLOP/s for MFU

def choose_dtype(requested, device):
    """autocast's dtype by the hardware: bf16 on GPUs of compute capability 8.0+ and CPUs with AMX or AVX512-BF16;
    fp16 (loss scaling) on 7.x (T4, V100: bf16 emulated); fp32 below 7.0, other CPUs (bf16 emulated), mps, the rest."""
    if device.startswith("cuda"):
        check_cuda_build(device)
        cc = torch.cuda.get_device_capability(device)
        auto = torch.bfloat16 if cc >= (8, 0) else torch.float16 if cc >= (7, 0) else torch.float32
    else:
        bf16_units = device == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        auto = torch.bfloat16 if bf16_units else torch.float32
    return auto if requested == "auto" else getattr(torch, requested)


def check_cuda_build(device):
    """One line, not "no kernel image is available" from deep inside, when this PyTorch has no kernels for the GPU
    (the default wheels start at 7.5: a P100 or V100 needs cu126). sm_XY runs on X.Y-X.9; compute_XY on X.Y+."""
    major, minor = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()  # e.g. ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_120'] (ROCm: 'gfx90a')
    built = [(m[1], int(m[2]), int(m[3])) for m in (re.fullmatch(r"(sm|compute)_(\d+)(\d)\w*", a) for a in archs) if m]
    if torch.version.hip or not built or any(
            (x, y) <= (major, minor) and (kind == "compute" or x == major) for kind, x, y in built):
        return
    fix = ('pip install "torch<2.15" --index-url https://download.pytorch.org/whl/cu126' if (major, minor) < (7, 5)
           else "pip install --upgrade torch")  # older than every kernel: cu126; newer: a newer build
    raise UserError(f"PyTorch {torch.__version__} has no kernels for {torch.cuda.get_device_name(device)} (compute "
                    f"capability {major}.{minor}; it has {' '.join(archs)}): {fix} (README: 'Which GPU?')")


def for_sampling(model, rt):
    """The model in eval mode, in the dtype that samples fastest: at batch 1 a token reads every weight for little
    arithmetic, so bytes are the cost. A GPU's 16-bit dtype halves them; on a CPU the biggest matrix, the (V, C)
    lm_head, goes to bf16 (which pays even where bf16 is emulated: README, Speed), the rest stays fp32."""
    if rt.device_type != "cpu":
        return model.to(rt.dtype).eval()
    model.float().eval().lm_head.to(torch.bfloat16)  # and the token embedding, which is the same matrix
    return model


def use_compile(cfg, rt):
    """--compile/--no-compile, else on for GPUs that Triton runs on (7.0+); off on CPUs (no faster: README, Speed)."""
    auto = rt.device_type == "cuda" and torch.cuda.get_device_capability(rt.device) >= (7, 0)
    return auto if cfg.compile is None else cfg.compile


def flops_per_token(config):
    """Training FLOPs per token (PaLM, appendix B): 6 per matmul weight (2 forward, 4 backward), + attention's."""
    L, C, T, V = config.n_layer, config.n_embd, config.block_size, config.vocab_size
    return 6 * (12 * L * C * C + C * V) + 12 * L * T * C  # the last term: q @ k^T and att @ v, which grow with T


# Dense TFLOP/s from NVIDIA's datasheets (SXM unless named; GeForce at fp32 accumulation): (16-bit tensor cores,
# fp32: TF32 from Ampere on, else fp32 units, also bf16's rate on T4/V100). Whole words, most specific first.
GPU_PEAKS = {"H[12]00 NVL": (835, 418), "H100 PCIe": (756, 378), "G?H[12]00": (989, 495), "A100": (312, 156),
             "L40S": (362, 183), "L4": (121, 60), "A10G": (70, 35), "A10": (125, 62.5), "RTX 4090 D": (147, 73.5),
             "RTX 4090": (165, 82.6), "RTX 4070 Ti": (80.2, 40.1), "RTX 4070": (58, 29), "RTX 4060 Ti": (44, 22),
             "RTX 3090 Ti": (80, 40), "RTX 3090": (71, 35.6), "RTX 3060": (25.5, 12.7), "V100-PCIE": (112, 14),
             "V100": (125, 15.7), "T4": (65, 8.1), "P100": (9.3, 9.3)}  # (P100: fp16 at 2x needs fp16 sums)


def device_peak_flops(rt):
    """MFU's divisor: a known GPU's datasheet peak for the dtype in use, else the best measured matmul FLOP/s."""
    name = torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda" else ""
    for key, (half, single) in GPU_PEAKS.items():
        if "MIG" not in name and re.search(rf"\b{key}\b(?! (Ti|SUPER|Laptop|D)\b)", name):  # not L4 in L40S
            tensor_cores = rt.dtype == torch.float16 or (
                rt.dtype == torch.bfloat16 and torch.cuda.get_device_capability(rt.device) >= (8, 0))
            return (half if tensor_cores else single) * 1e12
    n = 8192 if rt.device_type == "cuda" else 2048  # long enough to dwarf the launch (GPU) and the caches (CPU)
    return max(matmul_flops(rt.device, dt, n=n) for dt in {torch.float32, rt.dtype})


def matmul_flops(device, dtype, n=1024, reps=3):
    """FLOP/s of an n^3 matmul: the best of `reps` after a warm-up, fewer after 1 s (an emulated dtype: 100x slower)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    times, start = [], time.perf_counter()
    while len(times) < reps + 1 and (len(times) < 2 or time.perf_counter() - start < 1):
        times.append(seconds(device, lambda: a @ a))
    return 2 * n ** 3 / min(times[1:])


def seconds(device, work):
    """How long work() takes, the device's queue included (a GPU's calls return before the work is done)."""
    sync(device)
    t0 = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - t0


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)  # this device's queue (not the current device's)
    elif str(device) == "mps":
        torch.mps.synchronize()


# --- The bookkeeping of a training run: resume, run directory, log lines, checkpoints, signals

class TrainingRun:
    """train()'s bookkeeping: --resume, ckpt.pt, metrics.jsonl, log lines, Ctrl-C/SIGTERM. Process 0 writes, prints."""
    MAX_SKIPS = 20  # fp16 overflows in a row: the scale has fallen 2**20-fold, so the gradients really are inf

    def __init__(self, model_cfg, cfg, rt, model, optimizer, scaler, loader, ckpt):
        self.cfg, self.rt, self.model, self.optimizer, self.scaler, self.loader = \
            cfg, rt, model, optimizer, scaler, loader
        self.configs = {"model": model_cfg, "train": cfg}  # saved in each checkpoint
        self.ckpt_path, self.metrics_path = (os.path.join(cfg.out_dir, n) for n in ("ckpt.pt", "metrics.jsonl"))
        self.start_step = self.restore(ckpt) if ckpt is not None else 0
        self.first_position = loader.position  # where the loader stood at start_step
        self.last_ckpt = self.start_step if ckpt is not None else None  # the step of the newest ckpt.pt
        self.saved_at, self.val_loss, self.step_times, self.skips, self.signum = time.time(), None, [], 0, None
        if rt.master:
            self.clean_run_directory()
        measured = "" if rt.device_type == "cuda" else " (measured just now: it moves with the machine's load)"
        rt.log(f"MFU below: against {rt.peak_flops / 1e12:.2f} TFLOP/s per device{measured}")
        if self.start_step >= cfg.max_steps > 0:
            rt.log(f"already at --max-steps {cfg.max_steps}: pass a larger --max-steps to train further")
        elif 0 < cfg.max_steps <= cfg.warmup_steps:  # the settings of this run, after a --resume merged them
            rt.log(f"note: --warmup-steps {cfg.warmup_steps} >= --max-steps {cfg.max_steps}: the learning rate "
                   f"never reaches --max-lr; pass a smaller --warmup-steps")
        elif cfg.max_steps > cfg.lr_decay_steps:  # a run extended with --resume --max-steps
            rt.log(f"note: steps {max(self.start_step, cfg.lr_decay_steps)}-{cfg.max_steps - 1} run at --min-lr "
                   f"{cfg.min_lr:g}: the cosine ended at step {cfg.lr_decay_steps} (--lr-decay-steps stretches it)")

    def restore(self, ckpt):
        """--resume: all the next step depends on (weights, AdamW, loss scale, data position, RNG); returns the step.
        The run then goes on bit for bit on a CPU (tested), as close as two runs are on a GPU."""
        load_weights(self.model, ckpt["model"], self.ckpt_path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and self.scaler.is_enabled():  # fp16 (empty when saved by a bf16/fp32 run)
            self.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and self.rt.device_type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.rt.device)
        return ckpt["step"]

    def clean_run_directory(self):
        """Remove a killed process's half-written files; keep the log lines of the steps before start_step only."""
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        for path in (self.ckpt_path, self.metrics_path):
            for stale in glob.glob(glob.escape(path) + ".tmp*"):
                os.remove(stale)
        kept = [m for m in read_metrics(self.metrics_path) if m["step"] < self.start_step]
        atomic_write(self.metrics_path, lambda f: f.write("".join(json.dumps(m) + "\n" for m in kept).encode()))

    def log(self, line, **entry):  # a line for the user, and its numbers for metrics.jsonl
        self.rt.log(line)
        if self.rt.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def log_eval(self, step, val_loss, sample):
        self.val_loss, extra = val_loss, {} if sample is None else {"sample": sample}
        self.log(f"step {step:5d} | val loss {val_loss:.4f}" + (f"\nstep {step:5d} | sample: {' '.join(sample.split())}"
                 if extra else ""), step=step, val_loss=val_loss, tokens=step * self.cfg.tokens_per_step, **extra)

    def log_step(self, step, loss, lr, norm, dt):
        finite, scale = math.isfinite(norm), self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.skips = 0 if finite else self.skips  # skip_or_stop counts the fp16 skips in a row
        self.step_times.append(dt)
        times = self.step_times[1:] or [dt]  # the ETA from the mean step time, without the first (compilation)
        eta = timedelta(seconds=round((self.cfg.max_steps - step - 1) * sum(times) / len(times)))
        tok_s = self.cfg.tokens_per_step / dt
        mfu = flops_per_token(self.configs["model"]) * tok_s / (self.rt.peak_flops * self.rt.world)  # all devices
        self.log(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | {dt * 1000:.0f} ms | "
                 f"{tok_s:,.0f} tok/s | MFU {mfu:.1%} | ETA {eta}"
                 + (f" | scale {scale:g}" if scale else "") + ("" if finite else " | skipped: fp16 overflow"),
                 step=step, train_loss=loss, lr=lr, grad_norm=norm if finite else None, ms=dt * 1000,
                 tok_per_sec=tok_s, tokens=step * self.cfg.tokens_per_step,  # trained on before this step, as its loss
                 **({"loss_scale": scale} if scale else {}))

    def save(self, step):
        """ckpt.pt: all a run needs to continue exactly, as plain data (for weights_only=True), and what it ran with
        (for the card). self.model: the plain module, not the compiled one (`_orig_mod.` keys) or DDP's (`module.`)."""
        if self.rt.master:
            rng = {"torch": torch.get_rng_state()}
            if self.rt.device_type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
            ran_with = {"dtype": str(self.rt.dtype).removeprefix("torch."), "device": self.rt.device,
                        "processes": self.rt.world, "micro_batch": self.loader.B}
            atomic_write(self.ckpt_path, lambda f: torch.save({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "scaler": self.scaler.state_dict(), "loader": self.loader.state(), "rng": rng, "ran_with": ran_with,
                "config": {k: dataclasses.asdict(c) for k, c in self.configs.items()}}, f))
        self.last_ckpt, self.saved_at = step, time.time()

    def checkpoint_due(self):
        """--ckpt-minutes (0: never) have passed since the last checkpoint, on any process: all decide alike."""
        minutes = self.cfg.ckpt_minutes
        return bool(minutes) and bool(over_processes(time.time() - self.saved_at > 60 * minutes, self.rt))

    def skip_or_stop(self, step, loss, norm):
        """After a step with an inf/nan loss or gradient norm (not applied): an fp16 overflow at a finite loss is a
        step skipped (the scaler lowers the scale); anything else, or too many skips in a row, is a divergence."""
        self.skips = self.skips + 1 if self.scaler.is_enabled() and math.isfinite(loss) else self.MAX_SKIPS + 1
        if self.skips > self.MAX_SKIPS:
            kept = f"the last good checkpoint is {self.ckpt_path} (step {self.last_ckpt})" \
                if self.last_ckpt is not None else "no checkpoint was written yet"
            raise UserError(f"stopped: the loss became {loss} (grad norm {norm}) at step {step}; the weights were "
                            f"not updated, {kept}; try a lower --max-lr")

    def finish(self, val_loss, sample):
        """The end of the run: the last evaluation, and a checkpoint even if no step ran (--max-steps 0)."""
        if self.last_ckpt is None:
            self.save(self.start_step)
        step = max(self.cfg.max_steps, self.start_step)
        self.log_eval(step, val_loss, sample)
        self.rt.log(f"checkpoint: {self.ckpt_path}")
        return {"step": step, "val_loss": val_loss, "signal": None}

    @contextmanager
    def signals(self):
        """A context in which Ctrl-C or SIGTERM (a cloud's, before it preempts a machine) stops the run at the next
        micro-batch, with a checkpoint. More SIGTERMs are the same request; a second Ctrl-C quits without saving."""
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def on_signal(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping at the next micro-batch, then saving a checkpoint "
                  f"(Ctrl-C again to quit without saving)", flush=True)

    def stop_requested(self):
        """True when a signal asked to stop, on any process, so that all of them stop after the same step."""
        if over_processes(self.signum is not None, self.rt):
            self.signum = self.signum or signal.SIGTERM
        return self.signum is not None

    def stopped(self, step):
        """After a signal: the checkpoint of `step` (the loader back at that step's start), and how to continue."""
        steps = step - self.start_step  # each reads tokens_per_step / T windows
        self.loader.position = self.first_position + steps * self.cfg.tokens_per_step // self.loader.T
        if self.last_ckpt != step:
            self.save(step)
        if self.rt.world > 1:  # the others wait for process 0's save: torchrun stops all once one exits
            dist.barrier()
        self.rt.log(f"stopped by {signal.Signals(self.signum).name}: checkpoint of step {step} saved to "
                    f"{self.ckpt_path}. Continue with: python train_gpt2.py --resume --out-dir {self.cfg.out_dir}")
        return {"step": step, "val_loss": self.val_loss, "signal": self.signum}


def over_processes(value, rt, op="MAX"):
    """The largest (op="MIN": smallest) of `value` on all processes of the run, each of which must call it."""
    if rt.world > 1:
        tensor = torch.tensor(float(value), device=rt.device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        value = tensor.item()
    return value


def load_checkpoint(path):
    """torch.load(weights_only=True): data only, so a checkpoint someone sent you cannot run code (a pickle can)."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first with python train_gpt2.py "
                        f"(or point --out-dir at the run's directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {path}: not a checkpoint of this script, truncated, or unsafe ({type(e).__name__}"
                        f": {(str(e).strip().splitlines() or ['empty or cut short'])[0][:200]})") from e
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by train_gpt2.py")
    return ckpt


def atomic_write(path, write):
    """write(f) to a temporary file, made durable, then renamed over `path`: a crash leaves the old or the new."""
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
        os.fsync(fd)
        os.close(fd)


def read_metrics(path):
    """The entries of a metrics.jsonl file (none if it does not exist)."""
    entries = []
    with open(path) if os.path.exists(path) else nullcontext([]) as f:
        for line in f:
            with suppress(json.JSONDecodeError):  # blank, or cut short by a crash (power loss, full disk)
                entries.append(json.loads(line))
    return entries


# --- Memory: the micro-batch that fits (--batch-size auto), a CPU's RAM, out-of-memory errors, the chunked loss

def memory_needed(config, B, dtype=torch.float32):
    """A rough count of the memory of training at micro-batch B: 16 bytes per parameter (fp32 weights, gradients,
    AdamW's moments) plus ~100 bytes per activation value in fp32, ~60 under 16-bit autocast (from --bench)."""
    L, C, T = config.n_layer, config.n_embd, config.block_size
    params = 12 * L * C * C + (config.padded_vocab_size + T) * C  # matrices; biases and gains are few
    return 16 * params + (100 if dtype == torch.float32 else 60) * L * B * T * C


def room_for_training(rt):
    """The memory a run may fill: 95% of a GPU's free memory (as probe_step asks), a CPU's RAM, or None."""
    if rt.device_type == "cuda":
        return 0.95 * torch.cuda.mem_get_info(rt.device)[0]
    with suppress(ValueError, OSError, AttributeError):  # (sysconf is POSIX only)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if rt.device_type == "cpu" else None


def check_cpu_memory(config, B, rt):
    """Refuse a --batch-size that cannot fit in the RAM, rather than be killed mid-step; else keep freed memory."""
    if rt.device_type != "cpu" or B == "auto":  # (with auto, fit_micro_batch decides)
        return
    need, have = memory_needed(config, B), room_for_training(rt)
    if have is not None and need > have:
        raise UserError(f"micro-batch {B} x {config.block_size} needs ~{need / 2**30:.0f} GiB, this computer has "
                        f"{have / 2**30:.0f} GiB of RAM: use --batch-size auto or smaller (README: 'Train on a CPU')")
    keep_freed_memory()


def keep_freed_memory():
    """On Linux (glibc), stop malloc from handing freed memory back to the OS: a CPU step frees and reallocates
    the same big buffers every time, and memory given back returns as zeroed pages, a fault each. Did it work?"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc (macOS, Windows, musl): nothing to do
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # keep up to 1 GiB free; big blocks from the heap, not mmap()
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30) and libc.mallopt(M_MMAP_THRESHOLD, 2**30))


def is_out_of_memory(error):
    """A failed allocation: CUDA's OutOfMemoryError, a CPU's "can't allocate memory", MPS's, or Python's."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or any(
        text in str(error) for text in ("can't allocate memory", "out of memory", "std::bad_alloc"))


def fit_micro_batch(runner, model, cfg, rt):
    """--batch-size auto: the largest of 64, 32, ..., 1 that divides a process's share of the step and whose probe
    fits, on every process. It starts at memory_needed()'s guess: on a GPU the probe confirms it, compiled once."""
    T, B, room = model.config.block_size, 64, room_for_training(rt)  # the source run's micro-batch first
    if cfg.tokens_per_step % (T * rt.world):
        return 1  # no micro-batch divides the step: train() says so
    while B > 1 and (cfg.tokens_per_step % (B * T * rt.world) or
                     room and memory_needed(model.config, B, rt.dtype) > room):
        B //= 2
    first = B
    while B:  # down to 0: nothing fits (every process hears it below)
        rt.log(f"probing micro-batch {B} x {T}: a training step's memory ...")
        t0 = time.perf_counter()
        error, room = probe_step(runner, model, B, rt)
        if error is None:  # without an allocator that reports the peak, the probe's time hints at a step's
            rt.log(f"micro-batch {B} x {T} fits ({room or f'its probe took {time.perf_counter() - t0:.1f} s'})")
            break
        if runner is not model:  # compiled: drop the graphs of this size (torch.compile keeps at most 8)
            torch._dynamo.reset()
        rt.log(f"micro-batch {B} x {T} does not fit ({error})" + (f"; trying {B // 2}" if B > 1 else ""))
        B //= 2
    if rt.device_type == "cpu" and B == first:  # memory is not tight: trade some of it for speed
        keep_freed_memory()  # (where it is, malloc keeps the defaults under which the probes measured)
    elif rt.device_type == "cpu" and B > 1:
        # 2B did not fit, so B may fit only just (later steps need a little more; a CPU reports no peak).
        rt.log(f"micro-batch {B} x {T} fits, maybe only just: taking {B // 2}, for headroom")
        B //= 2
    B = int(over_processes(B, rt, "MIN"))  # every process takes part, also one that found nothing
    if B == 0:
        raise UserError(f"this model does not fit in memory even at micro-batch 1 x {T}: use a smaller model "
                        f"(--n-layer, --n-embd) or --block-size")
    return B


def probe_step(runner, model, B, rt):
    """A step's memory at micro-batch B: two forward-backward passes of `runner` and an evaluation's forward on
    random tokens, AdamW's moments held as zeros. Returns (None or what ran out, a GPU's memory taken, as text)."""
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        free, total = torch.cuda.mem_get_info(rt.device)
        others = total - free - torch.cuda.memory_reserved(rt.device)  # CUDA's context, other processes
    error = room = None
    try:
        moments = [torch.zeros_like(p) for p in model.parameters() for _ in range(2)]
        x = torch.randint(0, model.config.vocab_size, (B, model.config.block_size),
                          generator=torch.Generator().manual_seed(0)).to(rt.device)
        with rt.autocast():
            for _ in range(2):  # two micro-batches: the second adds to the gradients of the first
                runner(x, x)[1].backward()
            with torch.no_grad():
                runner(x, x)  # and an evaluation's forward pass, which holds other tensors
        del moments, x
        if rt.device_type == "cuda":  # too tight is too big: the allocator's state moves, DDP adds gradient buckets
            need = others + torch.cuda.max_memory_reserved(rt.device) + (4 * model.num_params() if rt.world > 1 else 0)
            room = f"{need / 2**30:.1f} of {total / 2**30:.1f} GiB"
            if need > 0.95 * total:
                error = f"{need / 2**30:.1f} GiB would leave less than 5% of {total / 2**30:.1f} GiB free"
    except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        error = str(e).strip().splitlines()[0][:120]
    model.zero_grad(set_to_none=True)  # (the tensors of a failed try go with the exception, here)
    if rt.device_type in ("cuda", "mps"):  # give the blocks of the probe back
        getattr(torch, rt.device_type).empty_cache()
    return error, room


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk=2048):
    """Mean cross-entropy of the logits x @ weight^T (x: (N, C), weight: (V, C), targets: (N,)), `chunk` rows at a
    time, so that all N x V logits (13 GB in fp32 at 64 x 1024) never exist at once: 2048 rows are 412 MB, enough
    for full-speed matmuls. Columns past vocab_size are -inf: the loss is exactly that over GPT-2's tokens."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, chunk)
    return ChunkedCrossEntropy.forward(None, x, weight, targets, vocab_size, chunk)  # the loss alone


class ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and gradients in one pass over the chunks (as "fused linear cross-entropy" kernels do). Since
    d loss / d logits = (softmax(logits) - onehot(target)) / N, each chunk's logits become its gradients for x
    and the weight at once, then go. forward() does all 3 matmuls per chunk; backward() only scales."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk):
        # ctx None: the loss alone (evaluation). Under autocast, x and the weight are cast once, not per matmul.
        N, device = x.size(0), x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xs, w = x.to(dtype), weight.to(dtype)
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x) if ctx is not None else None  # (N, C)
        grad_w = None  # (V, C), summed over the chunks in fp32
        with torch.autocast(device, enabled=False):
            for i in range(0, N, chunk):
                xc, t = xs[i:i + chunk], targets[i:i + chunk]
                logits = (xc @ w.T).float()  # (chunk, C) @ (C, V) -> (chunk, V), fp32 for a stable softmax
                logits[:, vocab_size:] = float("-inf")  # the padded columns: probability exactly 0
                logp = torch.log_softmax(logits, dim=1)  # (chunk, V)
                loss_sum -= logp.gather(1, t[:, None]).sum()  # sum of -log p(target)
                if ctx is not None:
                    dlogits = logp.exp_()  # p = softmax(logits), computed in place
                    dlogits[torch.arange(len(t), device=x.device), t] -= 1  # p - onehot(target)
                    dlogits = dlogits.to(dtype)  # (chunk, V), in the matmuls' dtype
                    grad_x[i:i + chunk] = dlogits @ w  # (chunk, V) @ (V, C) -> (chunk, C)
                    gw = (dlogits.T @ xc).float()  # (V, chunk) @ (chunk, C) -> (V, C)
                    grad_w = gw if grad_w is None else grad_w.add_(gw)
        if ctx is not None:
            ctx.save_for_backward(grad_x, grad_w)
            ctx.N, ctx.weight_dtype = N, weight.dtype
        return loss_sum / N

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.N
        return grad_x * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None


# --- GPT-2's BPE file, and Hugging Face GPT-2 weights in and out

BPE_FILE_ENV = "GPT2_BPE_FILE"  # path to a local r50k_base.tiktoken, for machines without internet
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # of r50k_base.tiktoken


def sample_tokenizer(cfg, rt):
    """Process 0's tokenizer for the samples at the evaluations, if on; without the BPE file, training goes on."""
    try:
        return get_tokenizer() if rt.master and cfg.eval_sample_tokens else None
    except UserError as e:
        rt.log(f"note: no samples at the evaluations: {e}")


def bpe_ranks():
    """GPT-2's merges {token bytes: rank}: tiktoken's (cached) download, or the file $GPT2_BPE_FILE names."""
    path = os.environ.get(BPE_FILE_ENV)
    if not path:
        try:
            return r50k_base()["mergeable_ranks"]
        except Exception as e:  # no network: tiktoken raises whatever its HTTP client raised
            raise UserError(f"could not download GPT-2's BPE ({type(e).__name__}); without internet, set "
                            f"{BPE_FILE_ENV} to a copy of r50k_base.tiktoken (README: 'Offline use')") from e
    if not os.path.isfile(path):
        raise UserError(f"{BPE_FILE_ENV}={path}: no such file (README: 'Offline use')")
    try:
        return load_tiktoken_bpe(path, expected_hash=BPE_SHA256)
    except ValueError as e:  # tiktoken's "Hash mismatch"
        raise UserError(f"{BPE_FILE_ENV}={path} is not GPT-2's BPE (its sha256 is not {BPE_SHA256})") from e


# Our parameter names are GPT-2's, so OpenAI's weights map one to one. Only OpenAI's TF code (so HF's GPT-2) keeps
# each linear layer as a "Conv1D" with weight (in, out), where nn.Linear has (out, in): these four are transposed.

HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf(name_or_path):
    """(GPTConfig, state_dict) of an HF GPT-2: a directory (config.json, its weights) or a hub name such as gpt2."""
    path = functools.partial(os.path.join, name_or_path)
    if os.path.isfile(path("config.json")):
        with open(path("config.json")) as f:
            hf_config = json.load(f)
        if os.path.exists(path("model.safetensors")):
            from safetensors.torch import load_file
            hf_sd = load_file(path("model.safetensors"))
        elif os.path.exists(path("pytorch_model.bin")):
            hf_sd = torch.load(path("pytorch_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{name_or_path} has neither model.safetensors nor pytorch_model.bin")
    elif os.path.isdir(name_or_path):
        raise UserError(f"{name_or_path} has no config.json: not a Hugging Face model directory")
    else:
        try:
            from transformers import GPT2LMHeadModel
            hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
        except ImportError as e:
            raise UserError(f"--init-from {name_or_path}: not a directory; a hub name needs transformers "
                            f"(pip install transformers)") from e
        except OSError as e:
            raise UserError(f"--init-from {name_or_path}: not a directory, and the hub has no such model "
                            f"or cannot be reached ({str(e).splitlines()[0][:200]})") from e
        hf_config, hf_sd = hf_model.config.to_dict(), hf_model.state_dict()
    gpt2 = dict(model_type="gpt2", activation_function="gelu_new", n_inner=None, layer_norm_epsilon=1e-5,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
    unsupported = {k: hf_config[k] for k, ok in gpt2.items() if hf_config.get(k, ok) != ok}
    if unsupported:
        raise UserError(f"{name_or_path}: not a GPT-2 this script can run ({unsupported})")
    config = GPTConfig(n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
                       block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"])
    sd = {}
    for k, v in hf_sd.items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the tied copy of wte, and old versions' causal-mask buffers
        sd["transformer." + k] = v.t() if k.endswith(HF_TRANSPOSED) else v
    if "transformer.wte.weight" in sd:  # add the padding rows (zeros; never used), and tie lm_head to it
        wte = sd["transformer.wte.weight"]
        sd["transformer.wte.weight"] = sd["lm_head.weight"] = F.pad(wte, (0, 0, 0, config.padded_vocab_size - len(wte)))
    return config, sd  # (names that do not fit GPT's are reported by load_weights)


def export_run(ckpt_path, out_dir):
    """--export-hf: the checkpoint at ckpt_path as a Hugging Face model directory, with its model card."""
    ckpt = load_checkpoint(ckpt_path)
    model = load_weights(GPT(GPTConfig(**ckpt["config"]["model"])), ckpt["model"], ckpt_path)
    written = export_hf(model, out_dir, ckpt, read_metrics(os.path.join(os.path.dirname(ckpt_path), "metrics.jsonl")))
    print(f"wrote {out_dir}: {', '.join(written)}. Use it with transformers.pipeline(\"text-generation\", "
          f"model=\"{out_dir}\"), offline; README.md is its model card")
    return 0


def export_hf(model, out_dir, ckpt=None, metrics=()):
    """`model` as a Hugging Face GPT-2 directory that works offline, the same bytes every time: weights, config,
    tokenizer, the sampler's defaults and, given the checkpoint and its metrics, a model card (README.md)."""
    from safetensors.torch import save as safetensors_bytes
    c = model.config
    tensors = {k: (v.t() if k.endswith(HF_TRANSPOSED) else v[:c.vocab_size] if k.endswith("wte.weight") else v)
               .contiguous().cpu() for k, v in model.state_dict().items()  # wte without its padding rows
               if k != "lm_head.weight"}  # tied to wte: HF ties them again on load
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                 "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
                 "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
                 "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                 "attn_pdrop": 0.0, "bos_token_id": EOT, "eos_token_id": EOT, "tie_word_embeddings": True}
    # SampleConfig's defaults, a story ends at <|endoftext|>, no text beyond the context (HF does not slide it).
    generation_config = {"do_sample": True, "top_k": SampleConfig.top_k, "temperature": SampleConfig.temperature,
                         "bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT, "max_length": c.block_size}
    files = {"config.json": hf_config, "generation_config.json": generation_config,
             "model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt"}),
             **hf_tokenizer_files(bpe_ranks(), c.block_size)}
    if ckpt is not None:  # (after the weights are taken: its sample turns the model's lm_head to bf16 on a CPU)
        files["README.md"] = model_card(model, ckpt, metrics)
    # Into a new or empty directory, or over an earlier export; never over other files (such as our README.md).
    present = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    others = sorted(present - set(files) if "config.json" in present else present)  # (an earlier export has one)
    if others:
        raise UserError(f"--export-hf {out_dir} holds other files ({', '.join(others[:3])}): export into a new or "
                        f"empty directory")
    os.makedirs(out_dir, exist_ok=True)
    for name, content in files.items():  # (safetensors' save_file would make the weights private: 0600)
        if isinstance(content, dict):  # as transformers writes its own config files
            content = json.dumps(content, indent=2, sort_keys=True) + "\n"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    return sorted(files)


def hf_tokenizer_files(ranks, context):
    """GPT-2's tokenizer as HF's files {name: content}, from the BPE ranks: vocab.json and merges.txt byte for
    byte as OpenAI published them (encoder.json, vocab.bpe)."""
    # GPT-2's bytes_to_unicode(): a token's bytes as printable characters. The 188 printable bytes stand for
    # themselves; the other 68 (space, newline, control bytes) get chr(256), chr(257), ...: ' the' is 'Ġthe'.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}

    def text(token):
        return "".join(char[b] for b in token)

    def merged_pair(token, rank):
        # The two tokens whose merge made `token`: BPE on its own bytes with only the merges learned before it
        # stops at exactly that pair (a split into two known tokens is ambiguous: ' t' + 'he' or ' th' + 'e').
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = pair_ranks.index(min(pair_ranks))
            assert pair_ranks[i] < rank, f"no merge makes token {rank}"
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    tokens = sorted(ranks, key=ranks.get)  # in id order: ids 0-255 are the bytes, 256 + i is merge i
    vocab = {text(t): i for i, t in enumerate(tokens)} | {"<|endoftext|>": EOT}
    merges = [" ".join(map(text, merged_pair(t, i))) for i, t in enumerate(tokens) if len(t) > 1]
    special = {name: "<|endoftext|>" for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tokenizer_config = {
        **special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": context, "add_prefix_space": False,
        "add_bos_token": True,  # a prompt starts after <|endoftext|>, as every story in training and --sample
        "split_special_tokens": True,  # as encode_ordinary: "<|endoftext|>" typed in a prompt is only text
        "clean_up_tokenization_spaces": False,  # decode() gives back the text exactly ("a ," stays)
        "padding_side": "left"}  # batched generation: padding before the prompt, not inside the story
    return {"vocab.json": json.dumps(vocab), "merges.txt": "\n".join(["#version: 0.2", *merges]) + "\n",
            "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}


def model_card(model, ckpt, metrics):
    """An export's README.md (the hub's format): the model, its training, validation loss, a sample, use, limits."""
    m, t, step, n = ckpt["config"]["model"], saved_settings(ckpt), ckpt["step"], model.num_params()
    ran = ckpt.get("ran_with", {"dtype": t["dtype"], "micro_batch": t["batch_size"]})
    val = [e for e in metrics if "val_loss" in e and e["step"] <= step]
    loss = (f"**{val[-1]['val_loss']:.4f}** (nats per token on the run's validation windows"
            f"{'' if val[-1]['step'] == step else ', at step ' + str(val[-1]['step'])})" if val else "not measured")
    rt = Runtime("cpu", torch.float32)
    texts, _ = complete(for_sampling(model, rt), get_tokenizer(), "Once upon a time",
                        SampleConfig(num_samples=1, max_new_tokens=min(120, m["block_size"])), rt, t["seed"])
    story = "\n".join("> " + line for line in texts[0].splitlines())
    return f"""---
license: mit
datasets: [roneneldan/TinyStories]
language: [en]
pipeline_tag: text-generation
library_name: transformers
tags: [gpt2, tinystories]
---

# GPT-2 ({n / 1e6:.0f}M) trained from scratch on TinyStories

A GPT-2 ({n:,} parameters: {m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} wide, a context of \
{m['block_size']} tokens, GPT-2's BPE) trained from random weights on [TinyStories](https://huggingface.co/\
datasets/roneneldan/TinyStories), short stories in the words of a three-year-old, by `train_gpt2.py` of \
gpt2-tinystories.

- **Training:** {step:,} of {t['max_steps']:,} steps of {t['tokens_per_step']:,} tokens (micro-batches of \
{ran['micro_batch']} x {m['block_size']}): {step * t['tokens_per_step']:,} tokens seen; AdamW (0.9, 0.95), \
weight decay {t['weight_decay']}, LR {t['max_lr']:g} after {t['warmup_steps']} warmup steps, cosine to \
{t['min_lr']:g} at step {t['lr_decay_steps']:,}, gradient clipping at {t['grad_clip']}; precision {ran['dtype']}, \
seed {t['seed']}.
- **Validation loss** after step {step:,}: {loss}. The source run that this project rebuilds reached 1.24.
- **Use:** `transformers.pipeline("text-generation", model="PATH/TO/THIS/DIRECTORY")("Once upon a time")`. \
The tokenizer puts `<|endoftext|>` before every prompt, as in training; a story ends at the next one.
- **A sample** (top-k 50, temperature 1.0):

{story}

## Limits

It knows TinyStories' world only (simple English, children's stories), follows no instructions, and loses the
thread after a few hundred tokens. Its data, by GPT-3.5 and GPT-4 (CDLA-Sharing-1.0), carry their biases; the
model was not evaluated for safety or facts.
"""


# --- --bench and --plot

def bench(model_cfg, cfg, sample_cfg, rt, steps=5):
    """Training and sampling speed on random tokens (no dataset needed), for this config and device."""
    T, model = model_cfg.block_size, GPT(model_cfg, seed=cfg.seed).to(rt.device)
    optimizer = configure_optimizer(model, cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    compiled = torch.compile(model) if use_compile(cfg, rt) else model
    check_cpu_memory(model_cfg, cfg.batch_size, rt)
    auto_cfg = dataclasses.replace(cfg, tokens_per_step=64 * T)  # (one micro-batch is timed, not a whole step)
    B = cfg.batch_size if cfg.batch_size != "auto" else fit_micro_batch(compiled, model, auto_cfg, rt)
    x = torch.randint(0, model_cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(cfg.seed))
    rt.log(f"bench: {model.num_params():,} parameters, micro-batch {B} x {T}, device {rt.device}, "
           f"{str(rt.dtype).replace('torch.', '')}, compile {'on' if compiled is not model else 'off'}")
    times = [seconds(rt.device, lambda: train_step(compiled, optimizer, scaler, lambda: (x, x), 1, rt, cfg.max_lr,
                                                   cfg.grad_clip)) for _ in range(steps + 2)]
    dt = sorted(times[2:])[steps // 2]  # the median step (the first compiles, the second still warms up)
    rt.log(f"train: {B * T / dt:,.0f} tok/s | {dt * 1000:.0f} ms per micro-batch | "
           f"MFU {flops_per_token(model_cfg) * B * T / dt / rt.peak_flops:.1%} of {rt.peak_flops / 1e12:.2f} TFLOP/s")
    import resource  # a CPU's peak: the process's peak resident memory (kilobytes on Linux)
    memory = torch.cuda.max_memory_allocated(rt.device) if rt.device_type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rt.log(f"peak memory: {memory / 2**30:.2f} GiB | compile: " +
           (f"{times[0] - dt:.1f} s (first step minus a later one)" if compiled is not model else "off"))
    n, prompt = min(sample_cfg.max_new_tokens, T - 4), torch.tensor([[7454, 2402, 257, 640]], device=rt.device)
    model = for_sampling(model, rt)  # the prompt: "Once upon a time"
    for use_cache in (True, False):
        generate(model, prompt, 8, use_cache=use_cache)  # warm-up
        dt = seconds(rt.device, lambda: generate(model, prompt, n, use_cache=use_cache, stop_at_eot=False))
        rt.log(f"sample ({'KV cache' if use_cache else 'no cache'}): {n / dt:,.0f} tok/s (batch 1, {n} new tokens)")
    return 0


def plot_metrics(out_dir):
    """out_dir/metrics.jsonl -> out_dir/loss.png: train and validation loss against the tokens seen."""
    try:
        from matplotlib.figure import Figure  # draws into a file: no pyplot, so no backend and no display
    except ImportError as e:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from e
    metrics = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    if not any("train_loss" in m for m in metrics):
        raise UserError(f"no training steps in {out_dir}/metrics.jsonl: train first (python train_gpt2.py), or "
                        f"point --out-dir at the run")
    ax = Figure(figsize=(8, 5)).subplots()
    for key, label, style in (("train_loss", "train loss", "-"), ("val_loss", "validation loss", "o-")):
        points = [(m["tokens"] / 1e6, m[key]) for m in metrics if key in m]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="tokens (millions)", ylabel="cross-entropy loss (nats per token)", title="GPT-2 on TinyStories")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.figure.savefig(os.path.join(out_dir, "loss.png"), dpi=120, bbox_inches="tight")
    print(f"wrote {os.path.join(out_dir, 'loss.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
