#!/usr/bin/env python3
"""Build the vision-path reference fixtures under tests/fixtures/vision/.

Two steps:

  make_vision_fixtures.py --make-media DIR
      Writes the test media (PNG with alpha, tiny PNG, large JPEG with EXIF orientation 6, GIF /
      WebP / PNG copies of one palette picture, a lossless 16-frame video) into DIR. Needs numpy,
      Pillow and the ffmpeg command. The files are committed; this step only documents them.

  make_vision_fixtures.py --media DIR --out OUT
      For the committed media: what the transformers 5.17 image and video processors give
      (pixel_values, grid_thw), the embeddings of a tiny random vision tower + projector + patch
      merger, and the final logits of prompts holding them. Needs torch, torchvision,
      transformers 5.17, safetensors, numpy, Pillow. Runs on CPU in seconds.

The vision tower is computed here from the checkpoint's tensors, written out from
shared/spec/m3_vision_chat_spec.md §4 (3-axis RoPE over 3 * 2 * floor(floor(2 * floor(hd/2) / 3) / 2)
dims, attention within one item or video segment), because transformers 5.17's own tower uses a
2-axis rotary that m3 deliberately does not follow (spec §4.3, §10.9); the script also runs the
transformers tower and prints how far it is from this one. The logits come from transformers'
text model, fed the prompt's embeddings with the placeholder rows replaced by the tower's output
(spec §4.8). Images with alpha are composited onto white with PIL's paste (vLLM's rgba_to_rgb)
before the processor sees them (spec §2.1); EXIF orientation is applied with
PIL.ImageOps.exif_transpose. The format is described in tests/fixtures/vision/README.md.
"""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image, ImageOps

VIDEO_FPS, VIDEO_FRAMES, VIDEO_W, VIDEO_H = 2, 16, 90, 60
SAMPLE_FPS = 1.0
LARGE_SUBSAMPLE = 20          # pixel rows of the large image kept: every 20th
VOCAB = 300


# ---------------------------------------------------------------------------------------------
# media
# ---------------------------------------------------------------------------------------------

def video_frame(i):
    """Frame i of the synthetic video: uint8 [H, W, 3], moving gradients and a moving square."""
    y, x = np.mgrid[0:VIDEO_H, 0:VIDEO_W]
    r = (x * 3 + i * 11) % 256
    g = (y * 4 + x + i * 5) % 256
    b = ((x // 6 + y // 6 + i) % 2) * 200 + 20
    f = np.stack([r, g, b], -1).astype(np.uint8)
    x0, y0 = (i * 5) % (VIDEO_W - 12), (i * 3) % (VIDEO_H - 12)
    f[y0:y0 + 12, x0:x0 + 12] = (250, 250, 30)
    return f


def sample_indices(total, video_fps, fps):
    """vLLM's minimax_m3_vl video backend (spec §3.1)."""
    interval, eps, keep, prev = 1.0 / fps, 1e-4, [], -math.inf
    while True:
        target = 0 if not keep else max(math.ceil((prev + interval - eps) * video_fps), keep[-1] + 1)
        if target >= total:
            break
        keep.append(target)
        prev = target / video_fps
    return keep or [0]


def make_media(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)
    # 97x61 RGBA: gradients, alpha from 0 to 255 across, fully opaque and fully clear bands.
    y, x = np.mgrid[0:61, 0:97]
    rgba = np.stack([(x * 5 + y) % 256, (y * 7) % 256, ((x // 8 + y // 8) % 2) * 255,
                     np.clip(x * 255 // 96, 0, 255)], -1).astype(np.uint8)
    rgba[:8, :, 3] = 255
    rgba[-6:, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(os.path.join(out, "rgba_97x61.png"))
    # 23x9 noise: smaller than one merge window, upscaled by the min_pixels branch.
    Image.fromarray(rng.integers(0, 256, (9, 23, 3), dtype=np.uint8), "RGB").save(
        os.path.join(out, "tiny_23x9.png"))
    # 1000x700 stored, EXIF orientation 6 (rotate 90 clockwise) -> 700x1000, downscaled.
    y, x = np.mgrid[0:700, 0:1000]
    big = np.stack([(x // 4) % 256, (y // 3) % 256, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)],
                   -1)
    big[(x // 50 + y // 50) % 2 == 0] //= 2
    big = big.astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(big, "RGB").save(os.path.join(out, "large_1000x700_exif6.jpg"), quality=90,
                                     subsampling=0, exif=exif.tobytes())
    # One 40x30 palette picture as PNG, GIF and lossless WebP: the decoders must agree exactly.
    pal = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB").quantize(64)
    pal.save(os.path.join(out, "pattern.png"))
    pal.save(os.path.join(out, "pattern.gif"))
    pal.convert("RGB").save(os.path.join(out, "pattern.webp"), lossless=True)
    # Lossless RGB video: FFV1 in Matroska, so decoding gives back video_frame() exactly.
    frames = b"".join(video_frame(i).tobytes() for i in range(VIDEO_FRAMES))
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                    f"{VIDEO_W}x{VIDEO_H}", "-r", str(VIDEO_FPS), "-i", "-", "-c:v", "ffv1",
                    "-pix_fmt", "bgr0", os.path.join(out, "clip_16f_2fps.mkv")],
                   input=frames, check=True)


def load_rgb(path):
    """What m3 decodes: EXIF orientation applied, alpha composited onto white (vLLM)."""
    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------
# reference computation
# ---------------------------------------------------------------------------------------------

def find_class(transformers, names):
    for n in names:
        if hasattr(transformers, n):
            return getattr(transformers, n)
    raise RuntimeError(f"none of {names} in transformers {transformers.__version__}")


def rope_axis_dim(hd):
    return 2 * ((2 * (hd // 2) // 3) // 2)


def positions(seg_t, gh, gw, merge):
    out = []
    for t in range(seg_t):
        for bh in range(gh // merge):
            for bw in range(gw // merge):
                for dy in range(merge):
                    for dx in range(merge):
                        out.append((t, bh * merge + dy, bw * merge + dx))
    return out


def tower(torch, sd, vc, pixels, grid, seg_max, merge):
    """Spec §4 in float64 (RoPE angles and cos/sin in float32 as the spec states)."""
    F = torch.nn.functional
    D, nh = vc["hidden_size"], vc["num_attention_heads"]
    hd, eps = D // nh, vc.get("layer_norm_eps", 1e-5)
    theta = vc.get("rope_parameters", {}).get("rope_theta", vc.get("rope_theta", 10000.0))
    a = rope_axis_dim(hd)
    half = 3 * (a // 2)
    inv = 1.0 / (theta ** (torch.arange(0, a, 2, dtype=torch.float32) / a))
    pre = "vision_tower.vision_model."
    W = lambda n: sd[n].double()

    def lin(x, name):
        return x @ W(name + ".weight").T + W(name + ".bias")

    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), W(name + ".weight"), W(name + ".bias"), eps)

    def gelu(x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    def rot(x, cos, sin):          # x [N, nh, hd]
        u, w = x[..., :half], x[..., half:2 * half]
        return torch.cat([u * cos - w * sin, w * cos + u * sin, x[..., 2 * half:]], -1)

    T, gh, gw = grid
    per_t = gh * gw
    out = []
    for t0 in range(0, T, seg_max):
        st = min(seg_max, T - t0)
        x = pixels[t0 * per_t:(t0 + st) * per_t].double()
        N = x.shape[0]
        pos = torch.tensor(positions(st, gh, gw, merge), dtype=torch.float32)
        ang = (pos[:, :, None] * inv[None, None, :]).reshape(N, half)
        cos, sin = ang.cos().double()[:, None, :], ang.sin().double()[:, None, :]
        x = x @ W(pre + "embeddings.patch_embedding.weight").reshape(D, -1).T
        x = ln(x, pre + "pre_layrnorm")
        for i in range(vc["num_hidden_layers"]):
            L = f"{pre}encoder.layers.{i}."
            mlp = L + ("mlp" if (L + "mlp.fc1.weight") in sd else "block_sparse_moe")
            h = ln(x, L + "layer_norm1")
            q = rot(lin(h, L + "self_attn.q_proj").view(N, nh, hd), cos, sin)
            k = rot(lin(h, L + "self_attn.k_proj").view(N, nh, hd), cos, sin)
            v = lin(h, L + "self_attn.v_proj").view(N, nh, hd)
            s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(N, D)
            x = x + lin(o, L + "self_attn.out_proj")
            x = x + lin(gelu(lin(ln(x, L + "layer_norm2"), mlp + ".fc1")), mlp + ".fc2")
        p = lin(gelu(lin(x, "multi_modal_projector.linear_1")), "multi_modal_projector.linear_2")
        z = p.reshape(N // (merge * merge), -1)
        out.append(lin(gelu(lin(z, "patch_merge_mlp.linear_1")), "patch_merge_mlp.linear_2"))
    return torch.cat(out).float()


def resize_check(torch, img, pixels, h, w, patch, tp, merge):
    """Max |processor - (torchvision uint8 antialias bicubic + normalise + patchify)|: shows
    which resize the processor ran."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    t = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).contiguous()
    r = TF.resize(t, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]) * 255.0
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]) * 255.0
    r = ((r - mean[:, None, None]) / std[:, None, None])[None].repeat(tp, 1, 1, 1)   # [tp, 3, h, w]
    gh, gw = h // patch, w // patch
    r = r.view(tp, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    r = r.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, -1)
    return (r - pixels).abs().max().item()


def build(media, out):
    import torch
    import transformers
    from safetensors.torch import load_file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_text_fixtures import build_config, init_weights

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    torch.manual_seed(0)
    info = {"transformers_version": transformers.__version__, "torch_version": torch.__version__}

    improc_cls = find_class(transformers, ["MiniMaxM3VLImageProcessorFast", "MiniMaxM3VLImageProcessor"])
    improc = improc_cls()
    info["image_processor"] = improc_cls.__name__
    print("image processor", improc_cls.__name__, [c.__name__ for c in improc_cls.__mro__[:4]])

    items = {}
    for key, name in [("rgba", "rgba_97x61.png"), ("tiny", "tiny_23x9.png"),
                      ("large", "large_1000x700_exif6.jpg")]:
        img = load_rgb(os.path.join(media, name))
        res = improc(images=[img], return_tensors="pt")
        pix, grid = res["pixel_values"].float(), [int(v) for v in res["image_grid_thw"][0]]
        diff = resize_check(torch, img, pix, grid[1] * 14, grid[2] * 14, 14, 2, 2)
        print(f"  {name}: decoded {img.size[0]}x{img.size[1]} -> grid {grid}, pixel rows {pix.shape[0]}; "
              f"max|processor - torchvision uint8 AA bicubic| = {diff:.3g}")
        items[key] = dict(file=name, grid=grid, pixels=pix, is_video=False, torchvision_diff=diff)

    frames_idx = sample_indices(VIDEO_FRAMES, VIDEO_FPS, SAMPLE_FPS)
    frames = np.stack([video_frame(i) for i in frames_idx])
    try:
        vproc_cls = find_class(transformers, ["MiniMaxM3VLVideoProcessor"])
        info["video_processor"] = vproc_cls.__name__
        res = vproc_cls()(videos=[frames], return_tensors="pt", do_sample_frames=False)
        pk = [k for k in res.keys() if "pixel" in k][0]
        gk = [k for k in res.keys() if "grid" in k][0]
        pix, grid = res[pk].float(), [int(v) for v in res[gk][0]]
        print(f"  video: frames {frames_idx} of {frames.shape} -> {pk} {tuple(pix.shape)}, {gk} {grid}")
        items["video"] = dict(file="clip_16f_2fps.mkv", grid=grid, pixels=pix, is_video=True,
                              frame_indices=frames_idx, video_fps=VIDEO_FPS,
                              timestamps=[frames_idx[min(2 * k, len(frames_idx) - 1)] / VIDEO_FPS
                                          for k in range(grid[0])])
    except Exception as e:   # images still make a complete fixture
        print("  video processor failed:", repr(e))
        info["video_error"] = repr(e)

    case = dict(name="vl_vision_f32", hidden=32, heads=4, kv_heads=2, head_dim=8, rope_factor=0.5,
                theta=5000000.0, attn=["full_attention", "minimax_m3_sparse"], mlp=["dense", "sparse"],
                index_dim=8, block=4, topk=3, local=1, experts=4, experts_per_tok=2, inter=16,
                shared_inter=16, dense_inter=32, vocab=VOCAB, tied=False,
                vision=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2))
    config = build_config(case)
    cls = transformers.MiniMaxM3SparseForConditionalGeneration
    model = cls._from_config(config, attn_implementation="eager").eval()
    init_weights(model, 4242)
    ckpt = os.path.join(out, "vl_vision_f32")
    model.save_pretrained(ckpt)
    for f in os.listdir(ckpt):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(ckpt, f))
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "config.json")) as f:
        vc = json.load(f)["vision_config"]
    seg_max = vc.get("vision_segment_max_frames", 4)

    for key, it in items.items():
        if key == "large":      # its 2240 patches' pixels are only checked, not run
            continue
        it["embeds"] = tower(torch, sd, vc, it["pixels"], it["grid"], seg_max, 2)
        try:
            fn = model.get_video_features if it["is_video"] else model.get_image_features
            kw = {"pixel_values_videos": it["pixels"], "video_grid_thw": torch.tensor([it["grid"]])} \
                if it["is_video"] else {"pixel_values": it["pixels"], "image_grid_thw": torch.tensor([it["grid"]])}
            with torch.no_grad():
                native = fn(**kw)
            native = getattr(native, "pooler_output", native)
            if isinstance(native, (list, tuple)):
                native = torch.cat(list(native))
            rel = ((native.float() - it["embeds"]).norm() / it["embeds"].norm()).item()
            print(f"  {key}: transformers' own tower (2-axis RoPE) differs by rel L2 {rel:.3g}")
            it["transformers_tower_rel_l2"] = rel
        except Exception as e:
            print(f"  {key}: transformers' own tower not compared: {e!r}")

    image_id, video_id = VOCAB - 2, VOCAB - 1     # build_config's image/video token ids
    start_id, end_id = VOCAB - 4, VOCAB - 3
    rng = np.random.default_rng(99)
    text = lambda n: [int(v) for v in rng.integers(0, VOCAB - 5, n)]

    def run(ids, media_rows):
        emb = model.get_input_embeddings()(torch.tensor([ids])).detach().clone()
        rows = torch.cat(media_rows)
        mask = torch.tensor([[i in (image_id, video_id) for i in ids]])
        assert int(mask.sum()) == rows.shape[0], (int(mask.sum()), rows.shape)
        emb[mask] = rows
        with torch.no_grad():
            return model(inputs_embeds=emb, use_cache=False).logits[0].float()

    def tokens(it):
        t, h, w = it["grid"]
        return t * h * w // 4

    prompts = {}
    ids = text(7) + [start_id] + [image_id] * tokens(items["rgba"]) + [end_id] + text(3) + \
        [start_id] + [image_id] * tokens(items["tiny"]) + [end_id] + text(4)
    prompts["images"] = dict(ids=ids, items=["rgba", "tiny"],
                             logits=run(ids, [items["rgba"]["embeds"], items["tiny"]["embeds"]]))
    if "video" in items:
        v = items["video"]
        per_t = v["grid"][1] * v["grid"][2] // 4
        ids = text(5)
        for k in range(v["grid"][0]):   # stand-ins for the timestamp text, then the marked run
            ids += [100 + k, 200] + [start_id] + [video_id] * per_t + [end_id]
        ids += text(3)
        prompts["video"] = dict(ids=ids, items=["video"], logits=run(ids, [v["embeds"]]))

    ref = {"info": info, "image_token_id": image_id, "video_token_id": video_id,
           "start_id": start_id, "end_id": end_id, "vocab": VOCAB, "items": {}, "prompts": {}}
    for key, it in items.items():
        pix = it["pixels"].numpy().astype("<f4")
        stride = LARGE_SUBSAMPLE if key == "large" else 1
        pix[::stride].tofile(os.path.join(out, f"pixels_{key}.f32"))
        entry = {k: it[k] for k in ("file", "grid", "is_video", "frame_indices", "video_fps",
                                    "timestamps", "torchvision_diff", "transformers_tower_rel_l2")
                 if k in it}
        entry.update(rows=int(pix.shape[0]), row_len=int(pix.shape[1]), pixel_row_stride=stride)
        if "embeds" in it:
            it["embeds"].numpy().astype("<f4").tofile(os.path.join(out, f"embeds_{key}.f32"))
            entry["tokens"] = int(it["embeds"].shape[0])
        ref["items"][key] = entry
    for key, p in prompts.items():
        p["logits"].numpy().astype("<f4").tofile(os.path.join(out, f"logits_{key}.f32"))
        ref["prompts"][key] = {"ids": p["ids"], "items": p["items"]}
        print(f"  prompt {key}: {len(p['ids'])} ids, logits std {p['logits'].std().item():.3f}")
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-media", metavar="DIR", help="write the test media into DIR")
    ap.add_argument("--media", help="folder of the committed media")
    ap.add_argument("--out", help="folder that receives the fixture files")
    args = ap.parse_args()
    if args.make_media:
        make_media(args.make_media)
        return 0
    if not (args.media and args.out):
        ap.error("give --make-media DIR, or --media DIR --out OUT")
    os.makedirs(args.out, exist_ok=True)
    return build(args.media, args.out)


if __name__ == "__main__":
    sys.exit(main())
