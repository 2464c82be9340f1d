"""Probe on the GPU: a stock ComfyUI 0.33 load vs a comfy-parallel shared-weights view, in one process, nodes called
directly; tensors and images compared bit for bit (the cfg1/area/hires identity question of issue 13).

usage (device, repo root, PYTHONPATH with the carried packages): python bench/identity_probe.py COMFYUI_DIR SIZE STEPS
Result of one H200 call: bench/results/identity_probe_nvidia-h200.log (views equal stock on every kind)."""
import hashlib
import json
import sys
import time

comfy_dir, SIZE, STEPS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
extra = sys.argv[4:]
sys.path.insert(0, ".")
from comfy_parallel.comfy_adapter import Comfy, load_comfyui  # noqa: E402

main = load_comfyui(comfy_dir, ["--disable-dynamic-vram", "--disable-all-custom-nodes", *extra])
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import nodes  # noqa: E402

KINDS = ("euler", "dpmpp_2m_karras", "uni_pc", "euler_ancestral", "nonsquare", "batch2", "cfg1", "img2img", "lora",
         "hires", "area")
POS, NEG, AREA = "a photo of a cat sitting on a wooden table", "blurry, low quality", "a red ball"
CKPT = "sd15_rand.safetensors"
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def digest(t):
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]


def run_kinds(model, clip, vae, kinds, tag):
    enc = nodes.CLIPTextEncode()
    pos = enc.encode(clip, POS)[0]
    neg = enc.encode(clip, NEG)[0]
    out = {"cond": pos[0][0].clone(), "uncond": neg[0][0].clone()}
    ks = nodes.common_ksampler
    for kind in kinds:
        seed = 101 + KINDS.index(kind)
        if kind == "hires":
            first, second = (SIZE * 3) // 4, (SIZE * 9) // 8
            lat = nodes.EmptyLatentImage().generate(first, first, 1)[0]
            a = ks(model, seed, STEPS, 7.0, "euler", "normal", pos, neg, lat)[0]
            up = nodes.LatentUpscale().upscale(a, "nearest-exact", second, second, "disabled")[0]
            res = ks(model, seed, STEPS, 7.0, "euler", "normal", pos, neg, up, denoise=0.5)[0]
            out["hires_first"] = a["samples"].clone()
        else:
            lat = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
            p = pos
            cfg = 7.0
            if kind == "cfg1":
                cfg = 1.0
            if kind == "area":
                ac = enc.encode(clip, AREA)[0]
                out["area_cond"] = ac[0][0].clone()
                ac = nodes.ConditioningSetArea().append(ac, SIZE // 2, SIZE, 0, 0, 1.0)[0]
                p = nodes.ConditioningCombine().combine(pos, ac)[0]
            res = ks(model, seed, STEPS, cfg, "euler", "normal", p, neg, lat)[0]
        out[kind] = res["samples"].clone()
        img = nodes.VAEDecode().decode(vae, res)[0]
        out[kind + "_img"] = (img * 255).round().clone()
        log(tag, kind, digest(out[kind]), digest(out[kind + "_img"]))
    return out


def compare(a, b, label):
    rows = {}
    for k in a:
        if k in b:
            x, y = a[k].float().cpu(), b[k].float().cpu()
            rows[k] = "=" if torch.equal(x, y) else f"max {float((x - y).abs().max()):.4g}"
    log("COMPARE", label, json.dumps(rows))
    return rows


def tensors_of(module):
    return {k: v for k, v in module.state_dict(keep_vars=True).items()}


def compare_weights(ma, mb, label):
    ta, tb = tensors_of(ma), tensors_of(mb)
    diff, meta = [], []
    for k in ta:
        x, y = ta[k], tb.get(k)
        if y is None:
            diff.append(f"{k}: missing in b")
            continue
        if x.dtype != y.dtype or x.shape != y.shape or x.stride() != y.stride() or x.device != y.device:
            meta.append(f"{k}: {x.dtype}/{tuple(x.stride())}/{x.device} vs {y.dtype}/{tuple(y.stride())}/{y.device}")
        if not torch.equal(x.detach().float().cpu(), y.detach().float().cpu()):
            diff.append(k)
    extra = [k for k in tb if k not in ta]
    log("WEIGHTS", label, f"{len(ta)} tensors, {len(diff)} differ, {len(meta)} meta differ, {len(extra)} extra in b")
    for line in (diff[:10] + meta[:10] + extra[:10]):
        log("   ", line)


def module_attrs(ma, mb, label):
    """Module attributes that differ between two module trees (comfy_cast_weights, weight_function...)."""
    out = []
    for (na, a), (nb, b) in zip(ma.named_modules(), mb.named_modules()):
        for attr in ("comfy_cast_weights", "weight_function", "bias_function", "comfy_patched_weights", "training"):
            va, vb = getattr(a, attr, "<none>"), getattr(b, attr, "<none>")
            if repr(va) != repr(vb):
                out.append(f"{na}.{attr}: {va!r} vs {vb!r}")
    log("ATTRS", label, len(out))
    for line in out[:20]:
        log("   ", line)


def trace(patcher, x, t, ctx):
    """Outputs of every leaf module of the UNet for one forward."""
    recs = []
    hooks = []
    for name, m in patcher.model.diffusion_model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, o, name=name: recs.append(
                    (name, [i.detach().clone() for i in inp if isinstance(i, torch.Tensor)],
                     o.detach().clone() if isinstance(o, torch.Tensor) else None))))
    try:
        with torch.no_grad():
            out = patcher.model.apply_model(x, t, c_crossattn=ctx)
    finally:
        for h in hooks:
            h.remove()
    return out, recs


def first_diff(ra, rb, label):
    for (na, ia, oa), (nb, ib, ob) in zip(ra, rb):
        same_in = all(torch.equal(p, q) for p, q in zip(ia, ib))
        same_out = oa is None or torch.equal(oa, ob)
        if not (same_in and same_out):
            log("FIRST DIFF", label, na, "inputs equal" if same_in else "inputs differ", "out differ" if not same_out
                else "", [(tuple(p.shape), p.dtype, tuple(p.stride()), p.data_ptr() % 256) for p in ia],
                [(tuple(q.shape), tuple(q.stride()), q.data_ptr() % 256) for q in ib])
            return na
    log("FIRST DIFF", label, "none in", len(ra), "modules")
    return None


def direct(pa, pb, label, shapes):
    dev = mm.get_torch_device()
    mm.load_models_gpu([pa])
    mm.load_models_gpu([pb])
    g = torch.Generator().manual_seed(5)
    for shape in shapes:
        x = torch.randn(shape, generator=g).to(dev)
        t = torch.full((shape[0],), 5.0).to(dev)
        ctx = torch.randn((shape[0], 77, 768), generator=g).to(dev)
        oa, ra = trace(pa, x, t, ctx)
        ob, rb = trace(pb, x, t, ctx)
        log("DIRECT", label, shape, "=" if torch.equal(oa, ob) else f"max {float((oa - ob).abs().max()):.4g}")
        if not torch.equal(oa, ob):
            first_diff(ra, rb, f"{label} {shape}")
        oa2, _ = trace(pa, x, t, ctx)
        log("DIRECT repeat a", shape, "=" if torch.equal(oa, oa2) else "DIFFERS")


def settings():
    b = torch.backends
    return {"cudnn.benchmark": b.cudnn.benchmark, "cudnn.enabled": b.cudnn.enabled,
            "matmul.allow_tf32": b.cuda.matmul.allow_tf32 if torch.cuda.is_available() else None,
            "fp16_reduced": b.cuda.matmul.allow_fp16_reduced_precision_reduction if torch.cuda.is_available() else None,
            "device": str(mm.get_torch_device()), "torch": torch.__version__}


log("settings", settings())
kinds = [k for k in ("euler", "cfg1", "area", "hires")]
stock = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)
s1 = run_kinds(*stock, kinds, "stock")
s1b = run_kinds(*stock, kinds, "stock-again")
compare(s1, s1b, "stock vs stock-again")

from comfy_parallel.comfy_adapter.shared_weights import shared_weight_patches  # noqa: E402
from comfy_parallel.weights.store import WeightStore  # noqa: E402

comfy = Comfy.from_sys_modules(main)
store = WeightStore(pin="auto")
patches = shared_weight_patches(store)
for p in patches:
    p.apply(comfy)
view = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)
log("view is new object", view[0] is not stock[0], view[0].model is not stock[0].model)
v1 = run_kinds(*view, kinds, "view")
compare(s1, v1, "stock vs view")
compare_weights(stock[0].model.diffusion_model, view[0].model.diffusion_model, "unet (both loaded)")
compare_weights(stock[1].cond_stage_model, view[1].cond_stage_model, "clip")
compare_weights(stock[2].first_stage_model, view[2].first_stage_model, "vae")
module_attrs(stock[0].model, view[0].model, "unet")
module_attrs(stock[1].cond_stage_model, view[1].cond_stage_model, "clip")
for attr in ("model_options", "load_device", "offload_device"):
    log("patcher", attr, repr(getattr(stock[0], attr))[:200], "|", repr(getattr(view[0], attr))[:200])
for attr in ("manual_cast_dtype", "memory_usage_factor", "device"):
    log("basemodel", attr, getattr(stock[0].model, attr, "<none>"), "|", getattr(view[0].model, attr, "<none>"))
log("model_config dicts equal keys",
    sorted(set(vars(stock[0].model.model_config)) ^ set(vars(view[0].model.model_config))))
lat = 8 * 0 + SIZE // 8
direct(stock[0], view[0], "stock vs view", [(1, 4, lat, lat), (2, 4, lat, lat), (2, 4, lat, lat // 2)])
for p in reversed(patches):
    p.undo()
stock2 = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)
s2 = run_kinds(*stock2, kinds, "stock-fresh")
compare(s1, s2, "stock vs stock-fresh")
compare(v1, s2, "view vs stock-fresh")
log("settings", settings())
