#!/usr/bin/env python3
"""Train m3's built-in model: a ~12M-parameter model of the exact MiniMax-M3 architecture, its
MTP module and a one-layer EAGLE3 draft, on text found on the machine (Python sources and
documentation), in one run of a few minutes on one GPU.

  tokenizer  byte-level BPE (HF `tokenizers`) with M3's pre-tokenizer regex and decoder, vocabulary
             4096 = 4035 learned + M3's 61 added tokens (ids 4035..4095, in M3's order)
  model      transformers 5.17 `MiniMaxM3SparseForConditionalGeneration` (the official class), every
             M3 layer kind: full and MSA (lightning indexer, 16-token blocks, top 4 of up to 32)
             attention, dense and MoE (8 experts top-2 + shared, sigmoid router + correction bias,
             SwiGLU-OAI), partial NeoX RoPE, Gemma norms, per-head QK-norm, GQA 8/2
  training   next-token cross-entropy; the router's correction bias by the auxiliary-loss-free
             balancing rule (bias += rate * sign(mean load - load) after each step); the lightning
             indexer, which the LM loss cannot reach (top-k selection has no gradient), distilled
             towards the full attention distribution of its layer (mean over the heads of each KV
             group), as MSA trains it
  MTP        one module (m3_text_spec.md §8.1) on the frozen model: enorm, hnorm, eh_proj over
             [embedding of x_{p+1}; final hidden at p after model.norm], a sparse MoE decoder layer
             (the official class, built as an extra layer), final_layernorm, the shared lm_head;
             trained to the target's distribution of x_{p+2}
  EAGLE3     vLLM llama_eagle3 layout: fc over the residual streams entering layers 2, 4 and 5,
             Llama norms, attention over [embedding; hidden] (2H wide), SiLU MLP, own lm_head;
             trained to the target's distribution with two chained steps unrolled (a chained row
             attends to the first step's rows before it and to its own chain, as in decoding)

Written (all under --out):
  m3-small/          config.json (text-only layout, MiniMaxM3SparseForCausalLM), two safetensors
                     shards + model.safetensors.index.json (BF16; router weight and correction
                     bias F32 as the official BF16 release;
                     `model.mtp.layers.0.*`), tokenizer.json
  m3-small-eagle3/   config.json, model.safetensors (BF16)
  reference/         heldout.txt, reference.json (token ids of heldout.txt, per-chunk NLL and the
                     perplexity transformers computes in float32 eager on the CPU on the stored weights,
                     chunks of 512), logits.f32 (rows of chunk 0 at positions 0, 16, 32, ...)
  train.json         loss curves, timings, sizes, data description

Usage: train_small.py --out DIR [--minutes-main M | --main-steps N] [--minutes-draft M] [--m3-attention]
                      [--smoke]
"""

import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

from make_text_fixtures import rope_prefix   # NeoX rotation of a head prefix, as transformers does

FULL, SPARSE, DENSE, MOE = "full_attention", "minimax_m3_sparse", "dense", "sparse"
# M3's pre-tokenizer regex (m3_vision_chat_spec.md §6.2) and added tokens, in M3's order.
M3_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ADDED = [
    "]!p~[", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<reponame>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>",
    "<commit_msg>", "<commit_after>", "]~b]", "[e~[", "]!d~[", "<function_call>",
    "<code_interpreter>", "]<]speech[>[", "]<]image[>[", "]<]video[>[", "]<]start of speech[>[",
    "]<]end of speech[>[", "]<]start of image[>[", "]<]end of image[>[", "]<]start of video[>[",
    "]<]end of video[>[", "]<]vision pad[>[", "]~!b[", "<jupyter_error>", "<add_file>",
    "<delete_file>", "<rename_file>", "<edit_file>", "<commit_message>", "<empty_source_file>",
    "<repo_struct>", "<code_context>", "<file_content>", "<source_files>", "<pr_start>",
    "<review_comment>", "<filepath>", "<file_sep>", "<think>", "</think>", "<tool_call>",
    "</tool_call>", "]<]frame[>[", "]<]start of frame[>[", "]<]end of frame[>[",
    "<|content_altered_placeholder|>", "]<]minimax[>[", "<mm:think>", "</mm:think>",
]
VOCAB = 4096
CTX = 512
EVAL_CHUNK = 512
LOGIT_ROW_STEP = 16

# The architecture. Layers: <attention><mlp> as in `m3 tiny --layers`.
PLAN = ["FD", "SD", "SM", "FM", "SM", "SM", "FM", "SM"]
TEXT = dict(
    hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    intermediate_size=128, shared_intermediate_size=256, dense_intermediate_size=768,
    num_local_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.0,
    rotary_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 100000.0, "partial_rotary_factor": 0.5},
    index_n_heads=2, index_head_dim=32, index_block_size=16, index_topk_blocks=4, index_local_blocks=1,
    rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
)
# --m3-attention: M3's attention geometry in place of the small one (m3_text_spec.md §1.2): one of
# M3's KV groups, as a rank of a 4-way tensor-parallel split holds it (16 query heads of 128 on
# one KV head, RoPE on the first 64 dims, one index head of 128). The FP8 KV cache's drift
# depends on the head dim (a key's rounding errors average over its dims in every score), which
# the small model's 32 does not show.
M3_ATTENTION = dict(num_attention_heads=16, num_key_value_heads=1, head_dim=128, rotary_dim=64,
                    index_n_heads=1, index_head_dim=128)
AUX_LAYERS = [2, 4, 5]          # vLLM's EAGLE3 default for 8 layers: (2, L // 2, L - 3)
DRAFT = dict(heads=8, kv_heads=2, head_dim=32, width=768, rope_theta=10000.0)
ROUTER_PATTERN = re.compile(r"(\.gate\.weight$|e_score_correction_bias$)")
NON_TEXT = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")

DEV = "cuda"


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Data

def corpus_files(max_bytes=250_000_000):
    """Python sources and text documentation installed on this machine, sorted, deduplicated by
    content. Tests and generated tables are skipped: they teach little and crowd out the rest."""
    roots = sorted({os.path.dirname(os.__file__)} | {p for p in sys.path if p.endswith("site-packages")})
    seen, out, total = set(), [], 0
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
            if not path.endswith((".py", ".rst", ".md", ".txt")) or not os.path.isfile(path):
                continue
            low = path.lower()
            if "/test" in low or "/tests/" in low or "/_vendor/" in low or "/idlelib/" in low:
                continue
            size = os.path.getsize(path)
            if size < 200 or size > 400_000:
                continue
            try:
                text = open(path, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            out.append((path, text, digest))
            total += len(text)
            if total > max_bytes:
                return out
    return out


def split_corpus(files, max_bytes):
    """Held out: files whose content hash ends in 00..02 (about 1.2%); the rest trains, up to max_bytes."""
    train, held = [], []
    total = 0
    for path, text, digest in files:
        if int(digest[-2:], 16) < 3:
            held.append((path, text))
        elif total < max_bytes:
            train.append((path, text))
            total += len(text)
    return train, held


def train_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(M3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(ADDED), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB - len(ADDED), tok.get_vocab_size()
    tok.add_special_tokens(ADDED)
    assert tok.get_vocab_size() == VOCAB
    for i, s in enumerate(ADDED):
        assert tok.token_to_id(s) == VOCAB - len(ADDED) + i, s
    return tok


def token_stream(tok, texts, eos):
    """All texts as one id stream, each followed by the end-of-text token."""
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


class Batches:
    def __init__(self, stream, batch, seed):
        self.stream, self.batch = torch.from_numpy(stream), batch
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        starts = torch.randint(0, len(self.stream) - CTX - 1, (self.batch,), generator=self.gen)
        rows = torch.stack([self.stream[s: s + CTX + 1] for s in starts.tolist()])
        return rows.to(DEV, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Model

def text_config(plan, vocab, bos, eos):
    attn = [FULL if p[0] == "F" else SPARSE for p in plan]
    mlp = [DENSE if p[1] == "D" else MOE for p in plan]
    return dict(TEXT, vocab_size=vocab, num_hidden_layers=len(plan), layer_types=attn,
                mlp_layer_types=mlp, bos_token_id=bos, eos_token_id=eos)


def vl_config(plan, vocab, bos, eos, image_id, video_id):
    # The official class always carries a vision tower; the smallest one is built and dropped at
    # save time (the built-in model is text-only).
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, image_size=56)
    return MiniMaxM3VLConfig(text_config=text_config(plan, vocab, bos, eos), vision_config=vision,
                             projector_hidden_size=32, image_token_index=image_id,
                             video_token_index=video_id, tie_word_embeddings=False)


def named(model, pattern):
    return [(n, m) for n, m in model.named_modules() if re.search(pattern, n) and "vision" not in n]


def decoder_layers(model):
    layers = {}
    for n, m in named(model, r"layers\.\d+$"):
        layers[int(n.rsplit(".", 1)[1])] = m
    return [layers[i] for i in sorted(layers)]


def final_norm(model):
    found = [m for n, m in named(model, r"(^|\.)norm$") if ".layers." not in n]
    assert len(found) == 1, [n for n, _ in named(model, r"(^|\.)norm$")]
    return found[0]


class IndexerDistill:
    """Forward hooks on every lightning indexer: while `active`, each adds the cross-entropy of its
    token-level index scores (per index head g: q_g . k, causal) against the attention distribution of
    its layer's query heads of KV group g (full attention, causal, mean over the group's heads). The
    inputs are detached, so only the indexer's projections and norms learn from it."""

    def __init__(self, model):
        self.losses, self.active, self.hooked = [], False, 0
        for name, mod in named(model, r"."):
            if type(mod).__name__.endswith("Indexer"):
                mod.register_forward_hook(self._hook(model.get_submodule(name.rsplit(".", 1)[0])))
                self.hooked += 1

    def _hook(self, attn):
        def hook(mod, args, output):
            if not self.active:
                return
            hidden, (cos, sin) = args[0].detach(), args[1]
            b, n, _ = hidden.shape
            with torch.no_grad():
                hd = attn.head_dim
                q = attn.q_norm(attn.q_proj(hidden).view(b, n, -1, hd)).transpose(1, 2).float()
                k = attn.k_norm(attn.k_proj(hidden).view(b, n, -1, hd)).transpose(1, 2).float()
                rd = min(cos.shape[-1], hd)   # the rotary tables are the rotated width
                q = rope_prefix(q, cos[..., :rd].float(), sin[..., :rd].float())
                k = rope_prefix(k, cos[..., :rd].float(), sin[..., :rd].float())
                groups = k.shape[1]
                q = q.view(b, groups, -1, n, hd)
                causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
                s = torch.einsum("bgqtd,bgsd->bgqts", q, k) / math.sqrt(hd)
                s = s.masked_fill(~causal, float("-inf"))
                target = torch.softmax(s, dim=-1).mean(2)                      # [b, g, n, n]
            d = mod.head_dim
            iq = mod.q_norm(mod.q_proj(hidden).view(b, n, -1, d)).transpose(1, 2).float()
            ik = mod.k_norm(mod.k_proj(hidden).view(b, n, 1, d)).transpose(1, 2).float()
            w = min(cos.shape[-1], d)
            iq = rope_prefix(iq, cos[..., :w].float(), sin[..., :w].float())
            ik = rope_prefix(ik, cos[..., :w].float(), sin[..., :w].float())
            assert iq.shape[1] == groups, (iq.shape, groups)
            scores = (iq @ ik.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
            logq = torch.log_softmax(scores, dim=-1).masked_fill(~causal, 0.0)
            self.losses.append(-(target * logq).sum(-1).mean())
        return hook

    def take(self):
        loss = torch.stack(self.losses).mean() if self.losses else None
        self.losses = []
        return loss


class Balance:
    """Auxiliary-loss-free load balancing (DeepSeek-V3): counts the experts every router picks and,
    after each step, moves each MoE block's correction bias by `rate` towards even load."""

    def __init__(self, model, rate):
        self.rate, self.counts, self.blocks = rate, {}, {}
        for name, mod in named(model, r"."):
            if type(mod).__name__.endswith("TopKRouter"):
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                self.blocks[name] = mod if hasattr(mod, "e_score_correction_bias") else parent
                mod.register_forward_hook(self._hook(name))
        assert self.blocks, "no MoE routers found"

    def _hook(self, name):
        def hook(mod, args, output):
            idx = output[2].reshape(-1)
            c = torch.bincount(idx, minlength=self.blocks[name].e_score_correction_bias.numel())
            self.counts[name] = self.counts.get(name, 0) + c
        return hook

    @torch.no_grad()
    def update(self):
        spread = []
        for name, c in self.counts.items():
            c = c.float()
            bias = self.blocks[name].e_score_correction_bias
            bias += self.rate * torch.sign(c.mean() - c)
            spread.append((c.max() / c.mean()).item())
        self.counts = {}
        return max(spread) if spread else 0.0


def lm_loss(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def eval_loss(model, batches):
    model.eval()
    losses = []
    for rows in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=rows[:, :-1], use_cache=False)
        losses.append(lm_loss(out.logits, rows[:, 1:]).item())
    model.train()
    return float(np.mean(losses))


def train_main(model, data, held_batches, seconds, batch_size, log_every, steps=None):
    distill = IndexerDistill(model)
    assert distill.hooked == sum(p[0] == "S" for p in PLAN), distill.hooked
    balance = Balance(model, 1e-3)
    assert len(balance.blocks) == sum(p[1] == "M" for p in PLAN), list(balance.blocks)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    peak, warmup = 2e-3, 100
    curve, start, step, total = [], time.time(), 0, steps
    model.train()
    while True:
        elapsed = time.time() - start
        if total is None and step == 30:
            total = max(200, int(seconds / (elapsed / step)))      # steps that fit the budget
            log(f"  {elapsed / step:.3f} s/step -> {total} steps")
        if total is not None and step >= total:
            break
        lr = lr_at(step, total or 10 ** 9, peak, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = data.next()
        distill.active = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=rows[:, :-1], use_cache=False)
            loss = lm_loss(out.logits, rows[:, 1:])
            idx = distill.take()
        distill.active = False
        (loss + idx).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        spread = balance.update()
        step += 1
        if step % log_every == 0 or step == 1:
            entry = dict(step=step, tokens=step * batch_size * CTX, seconds=round(time.time() - start, 1),
                         lr=lr, loss=round(loss.item(), 4), indexer_ce=round(idx.item(), 4),
                         grad_norm=round(gnorm.item(), 3), expert_load_max_over_mean=round(spread, 3))
            if step % (log_every * 5) == 0 or step == 1:
                entry["heldout_loss"] = round(eval_loss(model, held_batches), 4)
            curve.append(entry)
            log("  ", json.dumps(entry))
    final = dict(step=step, tokens=step * batch_size * CTX, seconds=round(time.time() - start, 1),
                 heldout_loss=round(eval_loss(model, held_batches), 4))
    curve.append(final)
    log("  final", json.dumps(final))
    return curve


class TargetTaps:
    """What the drafters read from the frozen target in one forward: the residual stream entering
    each layer, the final hidden after model.norm, and the keyword arguments the decoder layers get
    (mask, rotary tables, positions), so an extra decoder layer runs exactly as the model's own."""

    def __init__(self, model, sparse_layer):
        self.inputs, self.kwargs, self.final = {}, None, None
        self.sparse_layer = sparse_layer
        for i, layer in enumerate(decoder_layers(model)):
            layer.register_forward_pre_hook(self._pre(i), with_kwargs=True)
        final_norm(model).register_forward_hook(self._final)

    def _pre(self, i):
        def hook(mod, args, kwargs):
            self.inputs[i] = args[0] if args else kwargs["hidden_states"]
            if i == self.sparse_layer:   # the MTP layer is sparse: it gets what a sparse layer gets
                self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return hook

    def _final(self, mod, args, output):
        self.final = output


def gemma_norm_module(h, eps):
    m = nn.Module()
    m.weight = nn.Parameter(torch.zeros(h))
    m.eps = eps
    return m


def gemma(x, m):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.eps) * (1.0 + m.weight.float())).to(x.dtype)


def llama(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def soft_ce(logits, target_logits):
    """Cross-entropy of the draft against the target's distribution (its gradient is the KL's)."""
    p = torch.softmax(target_logits.float(), dim=-1)
    return -(p * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class MTP(nn.Module):
    def __init__(self, layer, H, eps):
        super().__init__()
        self.enorm, self.hnorm, self.final_layernorm = (gemma_norm_module(H, eps) for _ in range(3))
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.transformer_layer = layer

    def forward(self, embed, hidden, ids_next, layer_kwargs, lm_head):
        e = embed(ids_next)
        e = torch.cat([torch.zeros_like(e[:, :1]), e[:, 1:]], dim=1)     # position-0 mask
        u = self.eh_proj(torch.cat([gemma(e, self.enorm), gemma(hidden, self.hnorm)], -1))
        r = self.transformer_layer(u, **layer_kwargs)
        r = r[0] if isinstance(r, tuple) else r
        return r, lm_head(gemma(r, self.final_layernorm))


def rope_full(x, pos, theta):
    """NeoX rotation of the whole head; x [B, heads, T, d]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


class Eagle3(nn.Module):
    def __init__(self, H, n_aux, V, init_head):
        super().__init__()
        nh, nkv, hd, w = DRAFT["heads"], DRAFT["kv_heads"], DRAFT["head_dim"], DRAFT["width"]
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.fc = nn.Linear(n_aux * H, H, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(H))
        self.hidden_norm = nn.Parameter(torch.ones(H))
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))
        self.norm = nn.Parameter(torch.ones(H))
        self.q_proj = nn.Linear(2 * H, nh * hd, bias=False)
        self.k_proj = nn.Linear(2 * H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(2 * H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        self.gate_proj = nn.Linear(H, w, bias=False)
        self.up_proj = nn.Linear(H, w, bias=False)
        self.down_proj = nn.Linear(w, H, bias=False)
        self.lm_head = nn.Linear(H, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(init_head)

    def qkv(self, e, h):
        b, n, _ = e.shape
        z = torch.cat([llama(e, self.input_layernorm), llama(h, self.hidden_norm)], -1)
        pos = torch.arange(n, device=e.device)
        q = rope_full(self.q_proj(z).view(b, n, self.nh, self.hd).transpose(1, 2), pos, DRAFT["rope_theta"])
        k = rope_full(self.k_proj(z).view(b, n, self.nkv, self.hd).transpose(1, 2), pos, DRAFT["rope_theta"])
        v = self.v_proj(z).view(b, n, self.nkv, self.hd).transpose(1, 2)
        rep = self.nh // self.nkv
        return q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def finish(self, h, attn):
        b, _, n, _ = attn.shape
        r = h + self.o_proj(attn.transpose(1, 2).reshape(b, n, -1))
        m = llama(r, self.post_attention_layernorm)
        out = r + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))
        return out, self.lm_head(llama(out, self.norm))

    def unrolled(self, e, aux, steps):
        """Step 1 over every row (the catch-up); step s > 1 at row q takes the previous step's output
        at q - 1 as its hidden state and attends to step-1 keys 0..q-s+1 plus the step-j rows
        q-s+j (j = 2..s) of its own chain: the cache a chained draft sees in decoding."""
        n = e.shape[1]
        shift = lambda x, k: F.pad(x, (0, 0, k, 0))[..., :n, :] if k else x   # row q <- row q - k
        h = self.fc(aux)
        q, k, v = self.qkv(e, h)
        keys, vals, outs = [k], [v], []
        idx = torch.arange(n, device=e.device)
        for s in range(1, steps + 1):
            if s > 1:
                h = shift(outs[-1][0], 1)
                q, k, v = self.qkv(e, h)
                keys.append(k)
                vals.append(v)
            scale = 1.0 / math.sqrt(self.hd)
            base = (q @ keys[0].transpose(-1, -2)).float() * scale
            base = base.masked_fill(idx[None, :] > (idx[:, None] - (s - 1)), float("-inf"))
            diag = [((q * shift(keys[j - 1], s - j)).sum(-1, keepdim=True)).float() * scale for j in range(2, s + 1)]
            p = torch.softmax(torch.cat([base] + diag, -1), -1).to(v.dtype)
            attn = p[..., :n] @ vals[0]
            for j in range(2, s + 1):
                attn = attn + p[..., n + j - 2: n + j - 1] * shift(vals[j - 1], s - j)
            outs.append(self.finish(h, attn))
        return outs


def train_drafters(model, plus_layer, data, seconds, batch_size, eps, log_every):
    """The MTP module and the EAGLE3 draft, each on its own half of `seconds`, against the frozen
    target (its forward is shared by both: one target pass per step feeds both drafters)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    taps = TargetTaps(model, next(i for i, p in enumerate(PLAN) if p[0] == "S"))
    lm = model.lm_head if hasattr(model, "lm_head") else model.get_output_embeddings()
    embed = model.get_input_embeddings()
    H = embed.weight.shape[1]
    mtp = MTP(plus_layer, H, eps).to(DEV)
    mtp.train()
    distill = IndexerDistill(mtp)
    assert distill.hooked == 1, distill.hooked
    balance = Balance(mtp, 1e-3)
    eagle = Eagle3(H, len(AUX_LAYERS), embed.weight.shape[0], lm.weight.detach().float()).to(DEV)
    params = list(mtp.parameters()) + list(eagle.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    curve, start, step, total = [], time.time(), 0, None
    while True:
        elapsed = time.time() - start
        if total is None and step == 20:
            total = max(100, int(seconds / (elapsed / step)))
            log(f"  drafters: {elapsed / step:.3f} s/step -> {total} steps")
        if total is not None and step >= total:
            break
        lr = lr_at(step, total or 10 ** 9, 1.5e-3, 50)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = data.next()
        ids = rows[:, :-1]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            target = model(input_ids=ids, use_cache=False).logits.float()
        final = taps.final.detach()
        aux = torch.cat([taps.inputs[i].detach() for i in AUX_LAYERS], -1)
        kwargs = taps.kwargs
        ids_next = rows[:, 1:]                       # x_{p+1} for row p (the last row's is the window's next token)
        distill.active = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, mtp_logits = mtp(embed, final, ids_next, kwargs, lm)
            mtp_loss = soft_ce(mtp_logits[:, :-1], target[:, 1:])
            idx = distill.take()
            e = embed(ids_next)
            outs = eagle.unrolled(e, aux, 3)
            eagle_losses = [soft_ce(o[1][:, s:-1], target[:, s + 1:]) for s, o in enumerate(outs)]
            eagle_loss = sum(w * l for w, l in zip([1.0, 0.8, 0.6], eagle_losses))
        distill.active = False
        (mtp_loss + idx + eagle_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance.update()
        step += 1
        if step % log_every == 0 or step == 1:
            with torch.no_grad():
                tgt = target[:, 1:].argmax(-1)
                mtp_top1 = (mtp_logits[:, :-1].argmax(-1) == tgt).float().mean().item()
                eagle_top1 = [(o[1][:, s:-1].argmax(-1) == target[:, s + 1:].argmax(-1)).float().mean().item()
                              for s, o in enumerate(outs)]
            entry = dict(step=step, seconds=round(time.time() - start, 1), mtp_ce=round(mtp_loss.item(), 4),
                         mtp_top1_agreement=round(mtp_top1, 4), mtp_indexer_ce=round(idx.item(), 4),
                         eagle3_ce=[round(l.item(), 4) for l in eagle_losses],
                         eagle3_top1_agreement=[round(a, 4) for a in eagle_top1])
            curve.append(entry)
            log("  ", json.dumps(entry))
    return mtp, eagle, curve


# ---------------------------------------------------------------------------------------------
# Saving and the reference

def stored_tensors(state):
    """BF16 except the router weight and correction bias (F32), as the official BF16 release."""
    out = {}
    for name, t in state.items():
        t = t.detach().to("cpu", torch.float32)
        out[name] = t if ROUTER_PATTERN.search(name) else t.to(torch.bfloat16)
    return out


def save_sharded(tensors, dest, shards):
    """The official sharded layout: model-0000i-of-0000n.safetensors in name order, split by bytes,
    and model.safetensors.index.json mapping each tensor to its file."""
    names = sorted(tensors)
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    weight_map, groups, acc = {}, [[] for _ in range(shards)], 0
    for n in names:
        size = tensors[n].numel() * tensors[n].element_size()
        groups[min(shards - 1, acc * shards // total)].append(n)
        acc += size
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, os.path.join(dest, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    with open(os.path.join(dest, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def save_main(model, plus, mtp, L, work, dest):
    """The official VL save of the model, then rewritten to the text-only layout with the MTP module
    (the extra decoder layer of `plus`, renamed) added."""
    raw = os.path.join(work, "raw")
    model.save_pretrained(raw)
    cfg = json.load(open(os.path.join(raw, "config.json")))
    state = load_file(os.path.join(raw, "model.safetensors"))
    plus_raw = os.path.join(work, "plus")
    plus.save_pretrained(plus_raw)
    plus_state = load_file(os.path.join(plus_raw, "model.safetensors"))
    layer_prefix = f"language_model.model.layers.{L}."
    text = {}
    for name, t in state.items():
        if name.startswith(NON_TEXT):
            continue
        assert name.startswith("language_model."), name
        text[name[len("language_model."):]] = t
    mtp_stem = "model.mtp.layers.0."
    for name, t in plus_state.items():
        if name.startswith(layer_prefix):
            text[mtp_stem + "transformer_layer." + name[len(layer_prefix):]] = t
    for part in ("enorm", "hnorm", "final_layernorm"):
        text[mtp_stem + part + ".weight"] = getattr(mtp, part).weight
    text[mtp_stem + "eh_proj.weight"] = mtp.eh_proj.weight
    stored = stored_tensors(text)
    tc = dict(cfg["text_config"])
    tc.update(architectures=["MiniMaxM3SparseForCausalLM"], num_mtp_modules=1, dtype="bfloat16",
              transformers_version=cfg.get("transformers_version"))
    tc.pop("torch_dtype", None)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(tc, f, indent=2)
        f.write("\n")
    save_sharded(stored, dest, 2)
    return sum(v.numel() for v in stored.values())


def reference_dir(text_dir, work):
    """The official VL class's folder for the text-only checkpoint in text_dir: its config as the
    VL wrapper's text_config, its tensors (MTP aside) under `language_model.`, and a fresh minimal
    vision tower the text never reaches. transformers then computes with exactly the stored values."""
    tc = json.load(open(os.path.join(text_dir, "config.json")))
    index = json.load(open(os.path.join(text_dir, "model.safetensors.index.json")))
    text = {}
    for file in sorted(set(index["weight_map"].values())):
        text.update(load_file(os.path.join(text_dir, file)))
    plan = [("F" if a == FULL else "S") + ("D" if m == DENSE else "M")
            for a, m in zip(tc["layer_types"], tc["mlp_layer_types"])]
    tok = Tokenizer.from_file(os.path.join(text_dir, "tokenizer.json"))
    config = vl_config(plan, tc["vocab_size"], tc["bos_token_id"], tc["eos_token_id"],
                       tok.token_to_id("]<]image[>["), tok.token_to_id("]<]video[>["))
    raw = os.path.join(work, "vl")
    MiniMaxM3SparseForConditionalGeneration._from_config(config).save_pretrained(raw)
    cfg = json.load(open(os.path.join(raw, "config.json")))
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rotary_dim",
                "rope_parameters", "index_block_size", "index_topk_blocks", "index_local_blocks"):
        assert cfg["text_config"][key] == tc[key], key
    state = {k: v for k, v in load_file(os.path.join(raw, "model.safetensors")).items() if k.startswith(NON_TEXT)}
    state.update({"language_model." + k: v for k, v in text.items() if not k.startswith("model.mtp.")})
    ref = os.path.join(work, "ref")
    os.makedirs(ref, exist_ok=True)
    with open(os.path.join(ref, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(ref, "model.safetensors"),
              metadata={"format": "pt"})
    return ref


def save_eagle(eagle, H, V, dest):
    os.makedirs(dest, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
        "num_attention_heads": DRAFT["heads"], "num_key_value_heads": DRAFT["kv_heads"],
        "head_dim": DRAFT["head_dim"], "intermediate_size": DRAFT["width"], "num_hidden_layers": 1,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": DRAFT["rope_theta"], "rope_scaling": None,
        "tie_word_embeddings": False, "vocab_size": V, "draft_vocab_size": V, "target_hidden_size": H,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": AUX_LAYERS, "use_aux_hidden_state": True},
    }
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    L = "layers.0."
    names = {
        "fc.weight": eagle.fc.weight, L + "input_layernorm.weight": eagle.input_layernorm,
        L + "hidden_norm.weight": eagle.hidden_norm, L + "post_attention_layernorm.weight": eagle.post_attention_layernorm,
        L + "self_attn.q_proj.weight": eagle.q_proj.weight, L + "self_attn.k_proj.weight": eagle.k_proj.weight,
        L + "self_attn.v_proj.weight": eagle.v_proj.weight, L + "self_attn.o_proj.weight": eagle.o_proj.weight,
        L + "mlp.gate_proj.weight": eagle.gate_proj.weight, L + "mlp.up_proj.weight": eagle.up_proj.weight,
        L + "mlp.down_proj.weight": eagle.down_proj.weight, "norm.weight": eagle.norm,
        "lm_head.weight": eagle.lm_head.weight,
    }
    save_file({k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in names.items()},
              os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return sum(v.numel() for v in names.values())


@torch.no_grad()
def reference(text_dir, work, held_text, dest):
    """transformers in float32 eager on the CPU on the stored weights (the GPU would round matmul
    inputs to TF32): per-chunk NLL and perplexity of the held-out text, chunks of EVAL_CHUNK tokens
    each from an empty cache, and logits rows of chunk 0."""
    tok = Tokenizer.from_file(os.path.join(text_dir, "tokenizer.json"))
    model = MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        reference_dir(text_dir, work), dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok.encode(held_text, add_special_tokens=False).ids
    chunks = [ids[i: i + EVAL_CHUNK] for i in range(0, len(ids), EVAL_CHUNK)]
    chunks = [c for c in chunks if len(c) >= 2]
    nll, rows, argmax0 = [], None, None
    for ci, c in enumerate(chunks):
        x = torch.tensor([c])
        logits = model(input_ids=x, use_cache=False).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        nll.append(float(-lp[torch.arange(len(c) - 1), x[0, 1:]].sum()))
        if ci == 0:
            rows = logits[::LOGIT_ROW_STEP].float().cpu().numpy()
            argmax0 = logits.argmax(-1).tolist()
    count = sum(len(c) - 1 for c in chunks)
    ppl = math.exp(sum(nll) / count)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "heldout.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(held_text)
    rows.astype("<f4").tofile(os.path.join(dest, "logits.f32"))
    ref = {"ids": ids, "chunk": EVAL_CHUNK, "chunk_nll": nll, "tokens_scored": count,
           "mean_nll": sum(nll) / count, "perplexity": ppl, "logit_row_step": LOGIT_ROW_STEP,
           "logit_rows": int(rows.shape[0]), "vocab": int(rows.shape[1]), "argmax_chunk0": argmax0,
           "transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "dtype": "float32", "device": "cpu"}
    with open(os.path.join(dest, "reference.json"), "w") as f:
        json.dump(ref, f)
        f.write("\n")
    log(f"  reference: {len(ids)} ids, {len(chunks)} chunks, perplexity {ppl:.4f}")
    return ppl


def held_sample(held, max_chars):
    """Held-out text for the committed reference: whole files, prose and code, up to max_chars."""
    out, total = [], 0
    for path, text in sorted(held, key=lambda x: hashlib.sha1(x[0].encode()).hexdigest()):
        if total + len(text) > max_chars:
            continue
        out.append(text)
        total += len(text)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes-main", type=float, default=6.5)
    ap.add_argument("--minutes-draft", type=float, default=1.6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-corpus-mb", type=float, default=80.0)
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything, to check the script")
    ap.add_argument("--main-steps", type=int, help="train the model this many steps (default: what fits "
                    "--minutes-main at the first steps' pace)")
    ap.add_argument("--m3-attention", action="store_true",
                    help="M3's attention geometry (one KV group: 16 heads x 128, RoPE 64, index 128)")
    ap.add_argument("--reference-only", metavar="MODEL_DIR",
                    help="no training: recompute reference/ for the checkpoint in MODEL_DIR on --heldout")
    ap.add_argument("--heldout", help="with --reference-only: the held-out text file")
    args = ap.parse_args()
    if args.reference_only:
        work = os.path.join(args.out, "work")
        reference(args.reference_only, work, open(args.heldout, encoding="utf-8", newline="").read(),
                  os.path.join(args.out, "reference"))
        shutil.rmtree(work)
        return
    if args.m3_attention:
        TEXT.update(M3_ATTENTION)
    t0 = time.time()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")

    files = corpus_files()
    train, held = split_corpus(files, int(args.max_corpus_mb * 1e6))
    log(f"corpus: {len(files)} files; train {len(train)} files {sum(len(t) for _, t in train) / 1e6:.1f} MB, "
        f"held out {len(held)} files {sum(len(t) for _, t in held) / 1e6:.2f} MB")
    tok = train_tokenizer([t for _, t in train[::4]])
    eos, bos = tok.token_to_id("[e~["), tok.token_to_id("]~!b[")
    image_id, video_id = tok.token_to_id("]<]image[>["), tok.token_to_id("]<]video[>[")
    stream = token_stream(tok, [t for _, t in train], eos)
    held_stream = token_stream(tok, [t for _, t in held], eos)
    log(f"tokens: train {len(stream) / 1e6:.2f} M ({sum(len(t) for _, t in train) / len(stream):.2f} chars/token), "
        f"held out {len(held_stream) / 1e6:.3f} M; {time.time() - t0:.0f} s")
    t_data = time.time()

    config = vl_config(PLAN, VOCAB, bos, eos, image_id, video_id)
    model = MiniMaxM3SparseForConditionalGeneration._from_config(config, attn_implementation="sdpa").to(DEV)
    if args.smoke:
        for n, m in model.named_modules():
            if re.search(r"layers\.[12]\.", n + ".") and "vision" not in n:
                log("  module", n, type(m).__name__)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.vision", "vision")))
    log(f"model: {n_params / 1e6:.2f} M parameters (incl. the unused minimal vision tower)")
    data = Batches(stream, args.batch, 1)
    held_data = Batches(held_stream, 16, 2)
    held_batches = [held_data.next() for _ in range(4)]
    main_seconds = 20 if args.smoke else args.minutes_main * 60
    curve = train_main(model, data, held_batches, main_seconds, args.batch, 10 if args.smoke else 25,
                       args.main_steps)
    t_main = time.time()

    L = len(PLAN)
    plus_cfg = vl_config(PLAN + ["SM"], VOCAB, bos, eos, image_id, video_id)
    plus = MiniMaxM3SparseForConditionalGeneration._from_config(plus_cfg, attn_implementation="sdpa").to(DEV)
    missing, unexpected = plus.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(f"layers.{L}." in m for m in missing), (missing, unexpected)
    plus_layer = decoder_layers(plus)[L]
    draft_seconds = 15 if args.smoke else args.minutes_draft * 60
    mtp, eagle, draft_curve = train_drafters(model, plus_layer, Batches(stream, 32, 3), draft_seconds, 32,
                                             TEXT["rms_norm_eps"], 5 if args.smoke else 25)
    t_draft = time.time()

    work = os.path.join(args.out, "work")
    n_stored = save_main(model, plus, mtp, L, work, os.path.join(args.out, "m3-small"))
    tok.save(os.path.join(args.out, "m3-small", "tokenizer.json"))
    n_draft = save_eagle(eagle, model.get_input_embeddings().weight.shape[1], VOCAB,
                         os.path.join(args.out, "m3-small-eagle3"))
    del model, plus
    held_text = held_sample(held, 6000 if args.smoke else 14000)
    ppl = reference(os.path.join(args.out, "m3-small"), work, held_text, os.path.join(args.out, "reference"))
    summary = {
        "corpus": {"roots": "Python standard library and site-packages (.py, .rst, .md, .txt; tests skipped)",
                   "train_files": len(train), "train_chars": sum(len(t) for _, t in train),
                   "train_tokens": int(len(stream)), "heldout_files": len(held),
                   "heldout_tokens": int(len(held_stream))},
        "parameters_stored": n_stored, "draft_parameters": n_draft,
        "seconds": {"data_and_tokenizer": round(t_data - t0, 1),
                    "main": curve[-1]["seconds"], "drafters": round(t_draft - t_main, 1),
                    "total": round(time.time() - t0, 1)},
        "heldout_perplexity_reference": ppl, "device": torch.cuda.get_device_name(),
        "transformers": transformers.__version__, "torch": torch.__version__,
        "main_curve": curve, "draft_curve": draft_curve,
    }
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    shutil.rmtree(work)
    log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
