#!/usr/bin/env python3
"""Reference outputs of the two speculative drafters, written from the specs, for
tests/test_engine_spec.c (committed as tests/fixtures/spec/drafters.safetensors).

  MTP     shared/spec/m3_text_spec.md §8.1 (and §3-§5 for the decoder layer): enorm, hnorm,
          eh_proj over [embedding; hidden], the position-0 embedding mask, a sparse (MSA) MoE
          decoder layer, final_layernorm, the shared lm_head.
  EAGLE3  vLLM llama_eagle3 semantics: fc over the auxiliary states, input_layernorm on the
          embedding, hidden_norm on the hidden state, attention over the 2H concatenation with
          full-head NeoX RoPE, SiLU MLP, norm, the draft lm_head, d2t.

Inputs: the built-in tiny target (`m3 tiny DIR`, default options) and the tiny EAGLE3 draft
(`m3 tiny-draft DIR2 --model DIR`). For each drafter the script draws random token ids and
hidden states (fixed seed), runs a catch-up over positions 0..T-1 (empty drafter cache), then
one chained step at position T whose hidden input is the catch-up's last output, and stores
inputs and outputs (pre-norm output rows and logits) in float32.

Needs torch, numpy, safetensors; CPU is enough. Usage:
  make_spec_fixtures.py TARGET_DIR DRAFT_DIR OUT.safetensors
"""

import json
import math
import sys

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

torch.set_grad_enabled(False)
T = 22  # catch-up rows: 6 blocks of 4 tokens, more than the 3 selected


def gemma_rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def llama_rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, rot, theta):
    """NeoX rotation of the first `rot` dims of every head. x [T, heads, d]."""
    half = rot // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / rot)
    ang = pos.to(torch.float32)[:, None] * inv.to(torch.float32)[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:rot]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], dim=-1)


def attend(q, k, v, allowed):
    """q [T, nh, d], k/v [S, nkv, d], allowed [T, nkv, S] bool."""
    nh, nkv = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for h in range(nh):
        g = h // (nh // nkv)
        s = q[:, h, :] @ k[:, g, :].T / math.sqrt(q.shape[-1])
        s = s.masked_fill(~allowed[:, g, :], float("-inf"))
        out[:, h, :] = torch.softmax(s, dim=-1) @ v[:, g, :]
    return out


def msa_allowed(iq, ik, pos, B, topk, local, init):
    """Per query token and index head, the keys of the selected blocks (m3_text_spec.md §5.3):
    block score = max over visible keys of iq . ik; local and init blocks forced; top `topk`,
    ties to the lower block id; keys j <= pos inside the selected blocks."""
    Tq, G = iq.shape[0], iq.shape[1]
    S = ik.shape[0]
    allowed = torch.zeros(Tq, G, S, dtype=torch.bool)
    for t in range(Tq):
        p = int(pos[t])
        nb = p // B + 1
        for g in range(G):
            dots = ik[: p + 1] @ iq[t, g]
            score = [float(dots[b * B: min((b + 1) * B, p + 1)].max()) for b in range(nb)]
            for b in range(nb):
                if b >= nb - local or b < init:
                    score[b] = float("inf")
            chosen = sorted(range(nb), key=lambda b: (-score[b], b))[:topk]
            for b in chosen:
                allowed[t, g, b * B: min((b + 1) * B, p + 1)] = True
    return allowed


def swiglu_oai(g, u, c):
    g = torch.clamp(g, max=c["swiglu_limit"])
    u = torch.clamp(u, -c["swiglu_limit"], c["swiglu_limit"])
    return g * torch.sigmoid(c["swiglu_alpha"] * g) * (u + c["swiglu_beta"])


def mtp_forward(W, c, ids, pos, hidden):
    eps, H = c["rms_norm_eps"], c["hidden_size"]
    p = "language_model.model.mtp.layers.0."
    L = p + "transformer_layer."
    e = W["language_model.model.embed_tokens.weight"][ids]
    e = torch.where((pos == 0)[:, None], torch.zeros_like(e), e)
    z = torch.cat([gemma_rms(e, W[p + "enorm.weight"], eps), gemma_rms(hidden, W[p + "hnorm.weight"], eps)], -1)
    x = z @ W[p + "eh_proj.weight"].T
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    G, ihd, rot, theta = c["index_n_heads"], c["index_head_dim"], c["rotary_dim"], c["rope_parameters"]["rope_theta"]
    Tn = ids.shape[0]
    h = gemma_rms(x, W[L + "input_layernorm.weight"], eps)
    q = rope(gemma_rms((h @ W[L + "self_attn.q_proj.weight"].T).view(Tn, nh, hd), W[L + "self_attn.q_norm.weight"], eps), pos, rot, theta)
    k = rope(gemma_rms((h @ W[L + "self_attn.k_proj.weight"].T).view(Tn, nkv, hd), W[L + "self_attn.k_norm.weight"], eps), pos, rot, theta)
    v = (h @ W[L + "self_attn.v_proj.weight"].T).view(Tn, nkv, hd)
    iq = rope(gemma_rms((h @ W[L + "self_attn.index_q_proj.weight"].T).view(Tn, G, ihd), W[L + "self_attn.index_q_norm.weight"], eps), pos, rot, theta)
    ik = rope(gemma_rms((h @ W[L + "self_attn.index_k_proj.weight"].T).view(Tn, 1, ihd), W[L + "self_attn.index_k_norm.weight"], eps), pos, rot, theta)[:, 0, :]
    allowed = msa_allowed(iq, ik, pos, c["index_block_size"], c["index_topk_blocks"], c["index_local_blocks"], c["index_init_blocks"])
    x = x + attend(q, k, v, allowed).reshape(Tn, nh * hd) @ W[L + "self_attn.o_proj.weight"].T
    h2 = gemma_rms(x, W[L + "post_attention_layernorm.weight"], eps)
    m = L + "block_sparse_moe."
    s = torch.sigmoid(h2 @ W[m + "gate.weight"].T)
    choice = s + W[m + "e_score_correction_bias"]
    E, kk = c["num_local_experts"], c["num_experts_per_tok"]
    moe = torch.zeros_like(x)
    for t in range(Tn):
        idx = sorted(range(E), key=lambda j: (-float(choice[t, j]), j))[:kk]
        wsum = sum(float(s[t, j]) for j in idx)
        for j in idx:
            ex = m + f"experts.{j}."
            y = swiglu_oai(h2[t] @ W[ex + "w1.weight"].T, h2[t] @ W[ex + "w3.weight"].T, c) @ W[ex + "w2.weight"].T
            moe[t] += float(s[t, j]) / wsum * c["routed_scaling_factor"] * y
    sh = m + "shared_experts."
    moe += swiglu_oai(h2 @ W[sh + "gate_proj.weight"].T, h2 @ W[sh + "up_proj.weight"].T, c) @ W[sh + "down_proj.weight"].T
    out = x + moe
    logits = gemma_rms(out, W[p + "final_layernorm.weight"], eps) @ W["language_model.lm_head.weight"].T
    return out, logits


def eagle3_forward(D, dc, TW, ids, pos, r):
    """r [T, H]: fc of the target's auxiliary states (catch-up rows) or a chained output."""
    eps, nh, nkv, hd = dc["rms_norm_eps"], dc["num_attention_heads"], dc["num_key_value_heads"], dc["head_dim"]
    L = "layers.0."
    Tn = ids.shape[0]
    e = (D["embed_tokens.weight"] if "embed_tokens.weight" in D else TW["language_model.model.embed_tokens.weight"])[ids]
    h = llama_rms(r, D[L + "hidden_norm.weight"], eps)
    z = torch.cat([llama_rms(e, D[L + "input_layernorm.weight"], eps), h], -1)
    q = rope((z @ D[L + "self_attn.q_proj.weight"].T).view(Tn, nh, hd), pos, hd, dc["rope_theta"])
    k = rope((z @ D[L + "self_attn.k_proj.weight"].T).view(Tn, nkv, hd), pos, hd, dc["rope_theta"])
    v = (z @ D[L + "self_attn.v_proj.weight"].T).view(Tn, nkv, hd)
    causal = (torch.arange(Tn)[None, :] <= pos[:, None])[:, None, :].expand(Tn, nkv, Tn)
    r = r + attend(q, k, v, causal).reshape(Tn, nh * hd) @ D[L + "self_attn.o_proj.weight"].T
    h2 = llama_rms(r, D[L + "post_attention_layernorm.weight"], eps)
    g = h2 @ D[L + "mlp.gate_proj.weight"].T
    out = r + (torch.nn.functional.silu(g) * (h2 @ D[L + "mlp.up_proj.weight"].T)) @ D[L + "mlp.down_proj.weight"].T
    logits = llama_rms(out, D["norm.weight"], eps) @ D["lm_head.weight"].T
    return out, logits


def main():
    target, draft, out_path = sys.argv[1:4]
    cfg = json.load(open(f"{target}/config.json"))
    c = cfg.get("text_config", cfg)
    W = {k: v.float() for k, v in load_file(f"{target}/model.safetensors").items() if not k.startswith("vision")}
    dc = json.load(open(f"{draft}/config.json"))
    D = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(f"{draft}/model.safetensors").items()}
    rng = np.random.default_rng(20260611)
    V, H = c["vocab_size"], c["hidden_size"]
    aux = len(dc["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    fx = {}

    # MTP: catch-up over 0..T-1, then one chained row at T (hidden = the catch-up's last output).
    ids = torch.tensor(rng.integers(0, V, T + 1), dtype=torch.long)
    hid = torch.tensor(rng.standard_normal((T, H)), dtype=torch.float32)
    pos = torch.arange(T + 1)
    out1, log1 = mtp_forward(W, c, ids[:T], pos[:T], hid)
    out2, log2 = mtp_forward(W, c, ids, pos, torch.cat([hid, out1[-1:]], 0))
    fx.update({"mtp.ids": ids.numpy().astype(np.int32), "mtp.hidden": hid.numpy(),
               "mtp.out": torch.cat([out1, out2[-1:]]).numpy(), "mtp.logits": torch.cat([log1, log2[-1:]]).numpy()})

    # EAGLE3: target rows are [T, aux * H] (fc input); the chained row is [H].
    ids = torch.tensor(rng.integers(0, V, T + 1), dtype=torch.long)
    hid = torch.tensor(rng.standard_normal((T, aux * H)), dtype=torch.float32)
    fcd = hid @ D["fc.weight"].T
    out1, log1 = eagle3_forward(D, dc, W, ids[:T], pos[:T], fcd)
    out2, log2 = eagle3_forward(D, dc, W, ids, pos, torch.cat([fcd, out1[-1:]], 0))
    d2t = D["d2t"].numpy()
    fx.update({"eagle3.ids": ids.numpy().astype(np.int32), "eagle3.hidden": hid.numpy(),
               "eagle3.out": torch.cat([out1, out2[-1:]]).numpy(), "eagle3.logits": torch.cat([log1, log2[-1:]]).numpy(),
               "eagle3.draft": np.array([int(a) + int(d2t[int(a)]) for a in torch.cat([log1, log2[-1:]]).argmax(-1)], dtype=np.int32)})
    save_file({k: np.ascontiguousarray(v) for k, v in fx.items()}, out_path)
    for k, v in fx.items():
        print(k, v.shape, v.dtype)


if __name__ == "__main__":
    main()
