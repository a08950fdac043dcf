#!/usr/bin/env python
"""The project (`ovis_u1`) against the golden data of the published Ovis-U1 implementation. No published code needed.

The project's copy of the parity kit's check_golden.py (tests/test_parity.py runs it), with the calls that
reached into internals replaced by the public API: the golden noise goes in as `latents=`, the edit's ViT image
and prompt come from the functions the edit pipeline uses, and noise is drawn by `sampling.draw_noise`.
golden/ is the kit's data as the published code computed it, unchanged.

    python tests/parity/check_golden.py                 # ~15 s
    python tests/parity/check_golden.py --json out.json # also write every row as JSON

It loads golden/checkpoint with `OvisU1.from_pretrained` (the release-style directory the published classes saved),
then, case by case (cases.json), rebuilds each golden quantity with the project's own functions and compares:
prompts and ids, size rules, schedules, ViT / visual tokens, inputs_embeds, generation conditions, refiner,
decoder velocity, whole text-to-image and edit samples (through the public API with the golden noise, and
through the sampler alone from the golden conditions), VAE decode and uint8 conversion, greedy understanding.

If the checkpoint does not load as shipped, that is one failure ("checkpoint: load as shipped"), and the rest runs
on a copy whose config.json gets the smallest in-memory edits that let the project build the same network (each
edit is printed); rows computed that way say so.

Tolerances (README.md): floats |ours - golden| <= 1e-4 * max(1, max|golden|); ids, text, sizes exact; uint8 exact
except a 1-step difference where the golden 127.5*(decoded+1) is within 1e-3 of an integer. Every row prints
PASS/FAIL (`info`: reported, not counted); the run ends with a per-case summary and one JSON line.
This file follows the project's current API; where that API changes, adapt the calls, not the golden data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import traceback
import types
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import ovis_u1  # noqa: F401
except ImportError:
    sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_grad_enabled(False)

from ovis_u1 import OvisU1  # noqa: E402
from ovis_u1 import checkpoint as ckpt  # noqa: E402
from ovis_u1 import generation as inf  # noqa: E402
from ovis_u1 import images as IM  # noqa: E402
from ovis_u1 import prompts as PR  # noqa: E402
from ovis_u1.config import get_preset  # noqa: E402
from ovis_u1.decoder import pack_latents, unpack_latents  # noqa: E402
from ovis_u1.sampling import draw_noise, edit_guidance, get_schedule, t2i_guidance  # noqa: E402

TOL = 1e-4
ROWS: list[dict] = []
CURRENT = {"case": "-", "note": ""}


# ------------------------------------------------------------------------------------------------------------
# Recording
# ------------------------------------------------------------------------------------------------------------
def _row(name, ok, detail="", info=False, max_abs=None):
    name = name + CURRENT["note"]
    ROWS.append(dict(case=CURRENT["case"], name=name, ok=bool(ok), info=info, max_abs=max_abs, detail=detail))
    label = ("same" if ok else "DIFF") if info else ("PASS" if ok else "FAIL")
    print(f"  {label}  {name:64s} {detail}")
    return bool(ok)


def close(name, ours, golden, tol=TOL, note="", info=False):
    ours, golden = torch.as_tensor(ours).detach().double().cpu(), torch.as_tensor(golden).detach().double().cpu()
    if ours.shape != golden.shape:
        return _row(name, False, f"shape {tuple(ours.shape)} vs golden {tuple(golden.shape)} {note}".strip(), info)
    d = (ours - golden).abs().max().item() if ours.numel() else 0.0
    scale = golden.abs().max().item() if golden.numel() else 0.0
    return _row(name, d <= tol * max(1.0, scale), f"max|d|={d:.3e} (golden max {scale:.3g}) {note}".strip(), info, d)


def same(name, ours, golden, info=False, show=True):
    ok = ours == golden
    detail = "" if ok or not show else f"ours {short(ours)} vs golden {short(golden)}"
    return _row(name, ok, detail, info)


def short(x, n=160):
    s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


def uint8_check(name, ours, golden, bits):
    """Exact, except one-step differences where the golden boundary mask (uint8_boundary_bits) is set."""
    ours, golden = np.asarray(ours).astype(int), np.asarray(golden).astype(int)
    if ours.shape != golden.shape:
        return _row(name, False, f"shape {ours.shape} vs golden {golden.shape}")
    d = np.abs(ours - golden)
    if d.max() == 0:
        return _row(name, True, "identical")
    boundary = np.unpackbits(np.asarray(bits))[:golden.size].reshape(golden.shape).astype(bool)
    off = (d > 1) | ((d == 1) & ~boundary)
    detail = (f"max {d.max()}, {100 * (d > 0).mean():.2f}% of values differ, {int(off.sum())} of them not at a "
              "rounding boundary")
    return _row(name, not off.any(), detail)


@contextlib.contextmanager
def case(name: str, note: str = ""):
    CURRENT["case"], CURRENT["note"] = name, note
    print(f"\n== {name} ==")
    try:
        yield
    except Exception as e:  # an API the check could not even call is a failure of the case, not of the script
        _row("(could not run)", False, f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=3, file=sys.stdout)
    finally:
        CURRENT["case"], CURRENT["note"] = "-", ""


def attempt(name, fn, *a, **k):
    """fn(*a, **k), or a FAIL row naming the exception (then None)."""
    try:
        return fn(*a, **k)
    except Exception as e:
        _row(name, False, f"{type(e).__name__}: {str(e)[:300]}")
        return None


# ------------------------------------------------------------------------------------------------------------
# Golden data
# ------------------------------------------------------------------------------------------------------------
class Golden:
    def __init__(self, root: str):
        self.root = root
        self.ckpt = os.path.join(root, "checkpoint")
        self.cases = json.load(open(os.path.join(root, "cases.json")))
        self.t = load_file(os.path.join(root, "tensors.safetensors"))

    def image(self, name: str) -> Image.Image:
        return Image.fromarray(self.t[f"image/{name}"].numpy())

    def prompt(self, name: str) -> dict:
        return next(p for p in self.cases["prompts"] if p["name"] == name)


def patches(pv: torch.Tensor) -> torch.Tensor:
    """Published flattened patches [N, 3*14*14] (merge-group order) -> the project's [N, 3, 14, 14]."""
    return pv.reshape(pv.shape[0], 3, 14, 14)


def grids_of(t: torch.Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in g) for g in t.tolist()]


def variant_dir(src: str, edit) -> str:
    """A temporary copy of a checkpoint directory (weights symlinked) whose config.json is `edit(dict)`."""
    d = tempfile.mkdtemp(prefix="golden_variant_")
    for f in os.listdir(src):
        if f != "config.json":
            os.symlink(os.path.abspath(os.path.join(src, f)), os.path.join(d, f))
    cfg = json.load(open(os.path.join(src, "config.json")))
    edit(cfg)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=1)
    return d


def workaround_edit(cfg: dict) -> list[str]:
    """The smallest config.json edits that let the current project build the published network."""
    done = []
    bb = cfg["visual_tokenizer_config"]["backbone_config"]
    if bb.get("fullatt_block_indexes", "absent") is None:
        bb["fullatt_block_indexes"] = []
        done.append("backbone_config.fullatt_block_indexes: null -> [] (no window attention either way)")
    gen = cfg["visual_generator_config"]
    want = dict(refiner_hidden_size=gen["hidden_size"], refiner_num_heads=2 * gen["num_heads"], refiner_depth=2,
                refiner_mlp_ratio=4.0, refiner_qkv_bias=True)
    missing = {k: v for k, v in want.items() if k not in gen}
    if missing:
        gen.update(missing)
        done.append(f"visual_generator_config += {missing} (what the published YakTransformer hard-codes)")
    return done


def load_project(g: Golden):
    with case("checkpoint"):
        try:
            proj = OvisU1.from_pretrained(g.ckpt).eval()
            _row("load golden/checkpoint as shipped (OvisU1.from_pretrained)", True)
            return proj, ""
        except Exception as e:
            _row("load golden/checkpoint as shipped (OvisU1.from_pretrained)", False,
                 f"{type(e).__name__}: {str(e)[:300]}")
        edits: list[str] = []
        d = variant_dir(g.ckpt, lambda c: edits.extend(workaround_edit(c)))
        for e in edits:
            print(f"  WORKAROUND (in a temporary copy): {e}")
        proj = OvisU1.from_pretrained(d).eval()
        _row("load with the workaround config edits", True, "; ".join(edits), info=True)
        return proj, " [workaround load]"


def check_checkpoint(g: Golden, proj) -> None:
    with case("checkpoint", NOTE):
        stored = {}
        for f in sorted(os.listdir(g.ckpt)):
            if f.endswith(".safetensors"):
                stored.update(load_file(os.path.join(g.ckpt, f)))
        ours = proj.state_dict()
        bad, missing = [], []
        for k, v in ours.items():
            pk = ckpt.to_published_key(k)
            if pk not in stored:
                if k != "llm.lm_head.weight":
                    missing.append(pk)
            elif not torch.equal(v.float(), stored[pk].float()):
                bad.append(pk)
        _row("every loaded tensor equals the checkpoint's", not bad and not missing,
             f"differing {bad[:4]}, not in checkpoint {missing[:4]}" if bad or missing else f"{len(ours)} tensors")
        raw = json.load(open(os.path.join(g.ckpt, "config.json")))
        pp = json.load(open(os.path.join(g.ckpt, "preprocessor_config.json")))
        c = proj.config
        gen = raw["visual_generator_config"]
        same("refiner heads = 2 x decoder heads (published hard-codes it)", c.refiner.num_heads, 2 * gen["num_heads"])
        same("use_time_shift read from visual_generator_config.timestep_shift", c.generation.use_time_shift,
             gen["timestep_shift"])
        same("pixel bounds = preprocessor_config.json min/max_pixels", (c.adapter.min_pixels, c.adapter.max_pixels),
             (pp["min_pixels"], pp["max_pixels"]))
        same("image mean/std = preprocessor_config.json", (tuple(c.adapter.image_mean), tuple(c.adapter.image_std)),
             (tuple(pp["image_mean"]), tuple(pp["image_std"])))
        same("no window attention for fullatt_block_indexes=null", c.vision.use_window_attention, False)
        for flag in (False,):
            r = copy.deepcopy(raw)
            r["visual_generator_config"]["timestep_shift"] = flag
            workaround_edit(r)
            got = attempt("config_from_published(timestep_shift=false)", ckpt.config_from_published, r)
            if got is not None:
                same("config_from_published honours timestep_shift=false", got.generation.use_time_shift, flag)
        r = copy.deepcopy(raw)
        r["visual_generator_config"].update(base_shift=0.3, max_shift=1.5)
        workaround_edit(r)
        got = attempt("config_from_published(base_shift/max_shift)", ckpt.config_from_published, r)
        if got is not None:
            vals = {k: getattr(got.generation, k, None) for k in ("base_shift", "max_shift")}
            same("config_from_published reads base_shift/max_shift", vals, {"base_shift": 0.3, "max_shift": 1.5})
        r = copy.deepcopy(raw)
        workaround_edit(r)
        r["visual_tokenizer_config"]["backbone_config"]["fullatt_block_indexes"] = [1]
        got = attempt("config_from_published(fullatt_block_indexes=[1])", ckpt.config_from_published, r)
        if got is not None:
            same("fullatt_block_indexes=[1] turns window attention on (blocks 0, 2 windowed)",
                 (got.vision.use_window_attention, tuple(got.vision.fullatt_blocks)), (True, (1,)))


# ------------------------------------------------------------------------------------------------------------
# Pure data: prompts, sizes, schedules, noise
# ------------------------------------------------------------------------------------------------------------
def project_ids(proj, text: str, images) -> tuple[list[int], list]:
    batch = PR.prepare_inputs(proj.tokenizer, [text], [images], proj.config, pad_side="right")
    return batch.input_ids[0].tolist(), [list(gr) for gr in batch.grid_thws]


def check_prompts(g: Golden, proj) -> None:
    gc = proj.config.generation
    fac = inf.vit_factor(proj)
    for p in g.cases["prompts"]:
        with case(f"prompt {p['name']}", NOTE):
            if p["kind"] == "t2i":
                h, w = p["height"], p["width"]
                cond, uncond = PR.t2i_prompts(p.get("user_prompt", "x"), gc.t2i_prefix)
                text = cond if "user_prompt" in p else uncond
                images = [IM.blank_image(h, w, gc.blank_image_max_pixels, fac)]
            elif p["kind"] == "edit":
                src = g.image(p["input_image"])
                eh, ew = inf.edit_size(proj, src)
                resized = src.resize((ew, eh), Image.Resampling.BICUBIC)
                seen = IM.generation_image(resized, gc.edit_image_max_pixels, fac)
                if p["name"] == "edit_cond":
                    text, images = PR.edit_prompt(p["user_instruction"]), [seen]
                elif p["name"] == "edit_no_txt":
                    text, images = PR.generation_prompt(PR.UNCOND_TEXT), [seen]
                else:
                    text, images = (PR.generation_prompt(PR.UNCOND_TEXT),
                                    [IM.blank_image(eh, ew, gc.blank_image_max_pixels, fac)])
            else:
                images = [g.image(n) for n in p["images"]]
                text = PR.understanding_prompt(p["question"], len(images), history=[tuple(t) for t in p["history"]])
            same("prompt text", text, p["text"])
            ids, grids = project_ids(proj, text, images)
            same("grid_thw of each image", grids, p["grid_thws"])
            same("token ids (visual atoms expanded)", ids, p["input_ids_expanded"], show=False)
            text_ours = [i for i in ids if i != -300]
            text_gold = [i for i in p["input_ids_expanded"] if i != -300]
            same("token ids without the visual atoms", text_ours, text_gold, show=False)


def check_sizes(g: Golden) -> None:
    s = g.cases["sizes"]
    cfg = get_preset("ovis-u1-3b")
    a, gc = cfg.adapter, cfg.generation
    assert (a.min_pixels, a.max_pixels) == (s["processor"]["min_pixels"], s["processor"]["max_pixels"])
    stub = types.SimpleNamespace(config=cfg)
    fac = cfg.vision.patch_size * a.hidden_stride
    with case("sizes t2i (release bounds, pure functions)"):
        bad_vit, bad_lat, first_vit, first_lat = 0, 0, "", ""
        for r in s["t2i"]:
            b = IM.blank_image(r["height"], r["width"], gc.blank_image_max_pixels, fac)
            vit = list(IM.smart_resize(b.height, b.width, fac, a.min_pixels, a.max_pixels))
            if vit != r["vit_input_size"]:
                bad_vit += 1
                first_vit = first_vit or (f" (first: {r['height']}x{r['width']} -> ours {vit} vs golden "
                                          f"{r['vit_input_size']})")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    h, w = inf.resolve_size(stub, r["height"], r["width"])
                lat = [h // cfg.vae.downsample, w // cfg.vae.downsample]
            except Exception as e:
                lat = f"{type(e).__name__}"
            if lat != r["latent_hw"]:
                bad_lat += 1
                first_lat = first_lat or (f" (first: {r['height']}x{r['width']} -> ours {lat} vs golden "
                                          f"{r['latent_hw']})")
        n = len(s["t2i"])
        _row("blank image ViT input size (-> grid, visual tokens)", bad_vit == 0, f"{bad_vit} of {n} differ{first_vit}")
        _row("latent size of the target (noise shape / decoder tokens)", bad_lat == 0,
             f"{bad_lat} of {n} differ{first_lat}")
    with case("sizes edit (release bounds, pure functions)"):
        bad_out, bad_vit, first_out, first_vit = 0, 0, "", ""
        for r in s["edit"]:
            im = Image.new("RGB", (r["input_width"], r["input_height"]))
            try:
                out = list(inf.edit_size(stub, im))
            except Exception as e:
                out = type(e).__name__
            if out != r["edit_size"]:
                bad_out += 1
                first_out = first_out or (f" (first: {r['input_height']}x{r['input_width']} -> ours {out} vs golden "
                                          f"{r['edit_size']})")
            # what the project's edit request sends the ViT: the input resized to the edit size, then capped
            eh, ew = r["edit_size"]
            vh, vw = IM.generation_image_size(eh, ew, gc.edit_image_max_pixels, fac)
            vit = list(IM.smart_resize(vh, vw, fac, a.min_pixels, a.max_pixels))
            if vit != r["vit_input_size"]:
                bad_vit += 1
                first_vit = first_vit or (f" (first: {r['input_height']}x{r['input_width']} -> ours {vit} vs golden "
                                          f"{r['vit_input_size']})")
        n = len(s["edit"])
        _row("edit output size", bad_out == 0, f"{bad_out} of {n} differ{first_out}")
        _row("edit image ViT input size", bad_vit == 0, f"{bad_vit} of {n} differ{first_vit}")


def check_schedules(g: Golden) -> None:
    with case("schedules"):
        bad_default, bad_params, first_default, first_params = 0, 0, "", ""
        for r in g.cases["schedules"]["rows"]:
            default = (r["base_shift"], r["max_shift"]) == (0.5, 1.15)
            try:
                if default:
                    ours = get_schedule(r["num_steps"], r["image_seq_len"], shift=r["shift"])
                else:
                    ours = get_schedule(r["num_steps"], r["image_seq_len"], shift=r["shift"],
                                        base_shift=r["base_shift"], max_shift=r["max_shift"])
                ok = torch.allclose(torch.as_tensor(ours, dtype=torch.float64),
                                    torch.tensor(r["timesteps"], dtype=torch.float64), atol=1e-6, rtol=0)
            except Exception as e:
                ok, ours = False, type(e).__name__
            if not ok:
                where = (f" (first: {r['num_steps']} steps, {r['image_seq_len']} tokens, shift={r['shift']}, "
                         f"base/max {r['base_shift']}/{r['max_shift']}: ours {short(ours, 60)})")
                if default:
                    bad_default += 1
                    first_default = first_default or where
                else:
                    bad_params += 1
                    first_params = first_params or where
        rows = g.cases["schedules"]["rows"]
        n_def = sum((r["base_shift"], r["max_shift"]) == (0.5, 1.15) for r in rows)
        _row("get_schedule, default base/max shift (atol 1e-6)", bad_default == 0,
             f"{bad_default} of {n_def} differ{first_default}")
        _row("get_schedule with base_shift/max_shift (0.3/1.5)", bad_params == 0,
             f"{bad_params} of {len(rows) - n_def} differ{first_params}")


def check_noise(g: Golden) -> None:
    with case("noise (seed semantics of the release)"):
        for r in g.cases["noise"]["rows"]:
            k = f"noise/c{r['channels']}_{r['height']}x{r['width']}_seed{r['seed']}/bf16"
            lh, lw = g.t[k].shape[-2:]
            shape = (1, r["channels"], lh, lw)
            what = f"seed {r['seed']}, {r['channels']}ch {r['height']}x{r['width']}"
            ours = attempt("draw_noise published", draw_noise, shape, seed=r["seed"], mode="published")
            if ours is not None:
                same(f"draw_noise(mode='published') ({what}) == published get_noise on CPU", torch.equal(ours, g.t[k]),
                     True)
            ours = attempt("draw_noise per_sample", draw_noise, shape, seed=r["seed"], mode="per_sample")
            if ours is not None:
                same(f"draw_noise(mode='per_sample') ({what}) as bf16 == published get_noise on CPU",
                     torch.equal(ours.to(torch.bfloat16), g.t[k]), True, info=True)


# ------------------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------------------
def check_visual_tokens(g: Golden, proj) -> None:
    vt = proj.visual_tokenizer
    for r in g.cases["visual_tokens"]:
        name = r["name"]
        with case(f"vit {name}", NOTE):
            if name in ("sq64", "wide", "tall", "flat"):
                pv = g.t[f"vit/{name}/pixel_values"]
                ours, grid = IM.image_patches(g.image(name), proj.config)
                same("grid_thw (preprocessing)", list(grid), r["grid_thw"])
                close("pixel patches (preprocessing)", ours.reshape(ours.shape[0], -1), pv)
                grids = grids_of(g.t[f"vit/{name}/grid_thw"])
                feats = vt.backbone(patches(pv), grids)
                close("ViT features (last block, before post_trunk_norm)",
                      feats.reshape(g.t[f"vit/{name}/features"].shape), g.t[f"vit/{name}/features"])
                close("visual-token probabilities", vt(patches(pv), grids), g.t[f"vit/{name}/probs"])
            elif name == "wide+tall":
                pv = torch.cat([g.t["vit/wide/pixel_values"], g.t["vit/tall/pixel_values"]])
                close("visual-token probabilities, two images in one call",
                      vt(patches(pv), grids_of(g.t["vit/wide+tall/grid_thw"])), g.t["vit/wide+tall/probs"])
            else:
                from ovis_u1.vision import VisualTokenizer
                vcfg = copy.deepcopy(proj.config.vision)
                vcfg.use_window_attention, vcfg.fullatt_blocks, vcfg.window_size = True, (1,), 56
                win = VisualTokenizer(vcfg, proj.config.adapter).eval()
                win.load_state_dict(vt.state_dict())
                pv = torch.cat([g.t["vit/wide/pixel_values"], g.t["vit/flat/pixel_values"]])
                close("ViT features with window attention (56 px windows, block 1 full)",
                      win.backbone(patches(pv), grids_of(g.t["vit/window_variant/grid_thw"])),
                      g.t["vit/window_variant/features"])


def expand(ids: list[int], grids) -> list[int]:
    counts = iter(t * h * w // 4 for t, h, w in grids)
    out = []
    for i in ids:
        out += [i] * next(counts) if i == -300 else [i]
    return out


def check_embeds(g: Golden, proj) -> None:
    V = proj.vte.num_embeddings
    for r in g.cases["inputs_embeds"]:
        with case(f"inputs_embeds {r['name']}", NOTE):
            k = f"embeds/{r['name']}"
            grids = grids_of(g.t[f"{k}/grid_thws"])
            ids = torch.tensor([expand(g.t[f"{k}/input_ids"][0].tolist(), grids)])
            if f"{k}/pixel_values" in g.t:
                pv = g.t[f"{k}/pixel_values"]
            else:
                names = r["pixel_values"][4:-1].split(", ")
                pv = torch.cat([g.t[n] for n in names])
            sizes = [t * h * w for t, h, w in grids]
            pats = [patches(p) for p in torch.split(pv, sizes)]
            emb = proj.embed(ids, pats, grids)
            gold = g.t[f"{k}/inputs_embeds"]
            close("inputs_embeds", emb, gold)
            ind = torch.isin(ids, torch.tensor([-301, -302, -303, -304]))
            if emb.shape == gold.shape:
                close("inputs_embeds except the image-indicator positions", emb[~ind], gold[~ind])
            rows_g = [next((j for j in range(V) if torch.equal(proj.vte.weight[j], e)), None) for e in gold[ind]]
            rows_o = [next((j for j in range(V) if torch.equal(proj.vte.weight[j], e)), None) for e in emb[ind]]
            same(f"image-indicator VTE rows (V={V})", rows_o, rows_g)


def branch_inputs(g: Golden, proj, k: str, branch: str):
    ids = g.t[f"{k}/{branch}_input_ids_expanded"]
    img = Image.fromarray(g.t[f"{k}/{branch}_vit_image"].numpy())
    pat, grid = IM.image_patches(img, proj.config)
    return ids, torch.ones_like(ids), [pat], [grid], grids_of(g.t[f"{k}/{branch}_grid_thw"])


def check_conditions(g: Golden, proj) -> None:
    from ovis_u1.llm import condition_hidden_states
    D = proj.config.llm.hidden_size
    with case("condition from golden inputs_embeds (LLM + concat only)", NOTE):
        emb, am = g.t["embeds/t2i_cond/inputs_embeds"], g.t["embeds/t2i_cond/attention_mask"]
        gold = g.t["t2i/t2i_a/cond"]
        c = condition_hidden_states(proj.llm, emb, am.long())
        close("condition [1, L, 2D] from identical inputs_embeds", c, gold,
              note="published: cat(hidden_states[-1], hidden_states[-2])")
        close("  ours[..., D:] vs golden[..., :D] (halves swapped?)", c[..., D:], gold[..., :D], info=True)
        close("  ours[..., :D] vs golden[..., D:] (halves swapped?)", c[..., :D], gold[..., D:], info=True)
    for kind, branches in (("t2i", ("cond", "uncond")), ("edit", ("cond", "no_txt", "no_both"))):
        for r in g.cases[kind]:
            k = f"{kind}/{r['name']}"
            with case(f"condition {r['name']}", NOTE):
                for b in branches:
                    ids, am, pats, grid, golden_grid = branch_inputs(g, proj, k, b)
                    same(f"{b}: ViT grid of the branch image", grid, golden_grid)
                    close(f"{b}: condition from the golden ids + the branch image", proj.condition(ids, am, pats, grid),
                          g.t[f"{k}/{b}"])


def check_refiner_velocity(g: Golden, proj) -> None:
    for r in g.cases["refiner"]:
        with case(f"refiner {r['name']}", NOTE):
            out = proj.refiner(g.t[r["input"]])
            close("refiner tokens", out.tokens, g.t[f"refiner/{r['name']}/tokens"])
            close("refiner CLS", out.cls, g.t[f"refiner/{r['name']}/cls"])
    with case("velocity", NOTE):
        v = "velocity"
        names = ("xt", "ref", "img_ids", "ref_ids", "txt", "txt_ids")
        xt, ref, ids, ref_ids, txt, txt_ids = (g.t[f"{v}/{n}"] for n in names)
        rt, rc = g.t["refiner/t2i_a.cond/tokens"], g.t["refiner/t2i_a.cond/cls"]
        out = proj.refiner(txt)
        for t in (0.9, 0.37):
            tv = torch.full((1,), t)
            close(f"t={t} no reference", proj.decoder(xt, ids, out.tokens, txt_ids, tv, out.cls), g.t[f"{v}/v_t{t}"])
            close(f"t={t} with reference",
                  proj.decoder(xt, ids, out.tokens, txt_ids, tv, out.cls, ref=ref, ref_ids=ref_ids),
                  g.t[f"{v}/v_t{t}_ref"])
            close(f"t={t} no reference, decoder alone (golden refiner output)",
                  proj.decoder(xt, ids, rt, txt_ids, tv, rc), g.t[f"{v}/v_t{t}"])
        try:
            from ovis_u1.decoder import latent_ids
            lh, lw = g.cases["velocity"]["latent_hw"]
            close("position ids of target / reference tokens",
                  torch.cat([latent_ids(1, lh, lw), latent_ids(1, lh, lw, index=1)]), torch.cat([ids, ref_ids]))
        except Exception as e:
            _row("position ids", False, f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------------------
# Whole samples
# ------------------------------------------------------------------------------------------------------------
def golden_steps(r: dict, vel: torch.Tensor, noise: torch.Tensor, combine) -> list[torch.Tensor]:
    """Latents after each golden step, from the golden per-call velocities (published call order)."""
    x = pack_latents(noise)
    out = []
    ts = r["schedule"]
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * combine(vel[i])
        out.append(x)
    return out


def per_step(ours: list[torch.Tensor], gold: list[torch.Tensor]) -> None:
    bad = [i for i, (a, b) in enumerate(zip(ours, gold)) if (a - b).abs().max() > TOL * max(1, b.abs().max())]
    _row("  per-step latents vs the golden steps", not bad and len(ours) == len(gold),
         f"first diverging step {bad[0]}" if bad else f"{len(ours)} steps")


def published_vae_input(src: Image.Image, h: int, w: int) -> torch.Tensor:
    """The published VAE input of an edit: input.resize((w, h)) (PIL bicubic), then to [-1, 1], [1, 3, h, w]."""
    a = np.asarray(src.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(a / 127.5 - 1).permute(2, 0, 1)[None]


def check_decode(proj, k: str, lhw, g: Golden, detail: bool) -> None:
    lat = g.t[f"{k}/final_latents"]
    bits = g.t[f"{k}/uint8_boundary_bits"]
    if detail:
        dec = proj.vae.decode(unpack_latents(lat, *lhw))
        gold = g.t[f"{k}/decoded"].clamp(-1, 1)
        close("VAE decode of the golden final latents (clamped)", dec, gold)
        img = np.asarray(inf.pixels_to_images(gold)[0])
        uint8_check("uint8 conversion of the golden decoded pixels", img, g.t[f"{k}/image_uint8"].numpy(), bits)
    img = np.asarray(inf.decode_latents(proj, lat, lhw)[0])
    uint8_check("uint8 image from the golden final latents (decode + conversion)", img, g.t[f"{k}/image_uint8"].numpy(),
                bits)


def check_t2i(g: Golden, proj, variants: dict) -> None:
    for r in g.cases["t2i"]:
        k = f"t2i/{r['name']}"
        detail = f"{k}/velocities" in g.t
        model = variants.get(r["name"], proj)
        variant = " [config variant: timestep_shift=false]" if r["config_variant"] else ""
        with case(f"t2i {r['name']}", NOTE + variant):
            h, w = r["height"], r["width"]
            lhw = tuple(r["latent_hw"])
            noise = g.t[f"{k}/noise"]
            lat = attempt("public API text_to_image", model.text_to_image, r["prompt"], height=h, width=w,
                          num_inference_steps=r["steps"], guidance_scale=r["txt_cfg"], latents=noise,
                          progress=False, output_type="latent")
            if lat is not None:
                close("public API: final latents", lat, g.t[f"{k}/final_latents"])
                img = np.asarray(inf.decode_latents(model, lat, lhw)[0])
                uint8_check("public API: uint8 image", img, g.t[f"{k}/image_uint8"].numpy(),
                            g.t[f"{k}/uint8_boundary_bits"])
            sched = get_schedule(r["steps"], r["decoder_tokens"], shift=model.config.generation.use_time_shift)
            close("schedule the project uses for this model", sched, torch.tensor(r["schedule"]), tol=1e-6)
            m = lambda c: torch.ones(c.shape[:2], dtype=torch.bool)  # noqa: E731
            cond, uncond = g.t[f"{k}/cond"], g.t[f"{k}/uncond"]
            req = inf.GenerationRequest(conds=[(cond, m(cond)), (uncond, m(uncond))], latent_hw=lhw,
                                        seeds=[r["seed_of_given_noise"]], combine=t2i_guidance(r["txt_cfg"]),
                                        latents=noise)
            for mode in ("plain", "exact"):
                steps = []
                lat = inf.sample(model, req, r["steps"], mode=mode, progress=False, shift=r["timestep_shift"],
                                 callback=lambda i, n, x: steps.append(x.clone()))
                close(f"sampler alone ({mode}) from the golden conditions: final latents", lat,
                      g.t[f"{k}/final_latents"])
                if detail and mode == "plain":
                    gold = golden_steps(r, g.t[f"{k}/velocities"], noise, t2i_guidance(r["txt_cfg"]))
                    per_step(steps, gold)
            check_decode(model, k, lhw, g, detail)


def check_edit(g: Golden, proj) -> None:
    for r in g.cases["edit"]:
        k = f"edit/{r['name']}"
        detail = f"{k}/velocities" in g.t
        with case(f"edit {r['name']}", NOTE):
            src = g.image(r["input_image"])
            h, w = r["edit_size"]
            lhw = tuple(r["latent_hw"])
            es = attempt("edit_size", inf.edit_size, proj, src)
            if es is not None:
                same("edit output size", list(es), r["edit_size"])
            pix = g.t[f"{k}/vae_pixel_values"] if detail else published_vae_input(src, h, w)
            close("reference latents: project VAE encode (posterior mean) of the published VAE input",
                  pack_latents(proj.vae.encode(pix)), g.t[f"{k}/ref_latents"])
            close("  vs the published posterior SAMPLE (torch.manual_seed(0))", pack_latents(proj.vae.encode(pix)),
                  g.t[f"{k}/ref_latents_posterior_sample_seed0"], info=True,
                  note="the release samples the posterior from the global RNG")
            noise = g.t[f"{k}/noise"]
            lat = attempt("public API edit", proj.edit, src, r["instruction"], num_inference_steps=r["steps"],
                          guidance_scale=r["txt_cfg"], image_guidance_scale=r["img_cfg"], latents=noise,
                          progress=False, output_type="latent")
            if lat is not None:
                close("public API: final latents", lat, g.t[f"{k}/final_latents"])
                img = np.asarray(inf.decode_latents(proj, lat, lhw)[0])
                uint8_check("public API: uint8 image", img, g.t[f"{k}/image_uint8"].numpy(),
                            g.t[f"{k}/uint8_boundary_bits"])
            m = lambda c: torch.ones(c.shape[:2], dtype=torch.bool)  # noqa: E731
            conds = [g.t[f"{k}/{b}"] for b in ("cond", "no_txt", "no_both")]
            req = inf.GenerationRequest(conds=[(c, m(c)) for c in conds], latent_hw=lhw,
                                        seeds=[r["seed_of_given_noise"]],
                                        combine=edit_guidance(r["txt_cfg"], r["img_cfg"]),
                                        ref=g.t[f"{k}/ref_latents"], ref_branches=(True, True, False),
                                        latents=noise)
            for mode in ("plain", "exact"):
                steps = []
                lat = inf.sample(proj, req, r["steps"], mode=mode, progress=False, shift=r["timestep_shift"],
                                 callback=lambda i, n, x: steps.append(x.clone()))
                close(f"sampler alone ({mode}) from the golden conditions + reference: final latents", lat,
                      g.t[f"{k}/final_latents"])
                if detail and mode == "plain":
                    # published call order per step: cond, no_both, no_txt
                    combine = lambda v: v[1] + r["img_cfg"] * (v[2] - v[1]) + r["txt_cfg"] * (v[0] - v[2])  # noqa: E731
                    gold = golden_steps(r, g.t[f"{k}/velocities"], noise, combine)
                    per_step(steps, gold)
            check_decode(proj, k, lhw, g, detail)


def check_understanding(g: Golden, proj) -> None:
    tok = proj.tokenizer
    for r in g.cases["understanding"]:
        with case(f"understanding {r['name']}", NOTE):
            rec = {}
            orig = proj.llm.generate

            def recording(**kw):
                kw.update(output_logits=True, return_dict_in_generate=True)
                rec["r"] = orig(**kw)
                return rec["r"].sequences
            proj.llm.generate = recording
            try:
                text = proj.answer(r["question"], images=[g.image(n) for n in r["images"]],
                                   history=[tuple(t) for t in r["history"]] or None, max_new_tokens=r["max_new_tokens"])
            finally:
                del proj.llm.generate
            out = rec["r"]
            same("greedy token ids", out.sequences[0].tolist(), r["generated_ids"])
            close("per-step logits", torch.stack(out.logits, 1), g.t[f"understanding/{r['name']}/logits"])
            same("answer text (published: decode(skip_special_tokens=True), no strip)", text, r["answer"], info=True)
            _ = tok


# ------------------------------------------------------------------------------------------------------------
NOTE = ""


def main() -> int:
    global NOTE
    ap = argparse.ArgumentParser(description="the project against the golden data of the published Ovis-U1")
    ap.add_argument("--golden", default=os.path.join(HERE, "golden"))
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = Golden(args.golden)
    print(f"golden: {args.golden} (made with {g.cases['meta']['versions']})")
    check_sizes(g)
    check_schedules(g)
    check_noise(g)
    proj, NOTE = load_project(g)
    check_checkpoint(g, proj)
    check_prompts(g, proj)
    check_visual_tokens(g, proj)
    check_embeds(g, proj)
    check_conditions(g, proj)
    check_refiner_velocity(g, proj)
    variants = {}
    for r in g.cases["t2i"]:
        if r["config_variant"]:
            def edit(c, cv=r["config_variant"]):
                for path, value in cv.items():
                    node = c
                    *parents, leaf = path.split(".")
                    for p in parents:
                        node = node[p]
                    node[leaf] = value
                workaround_edit(c) if NOTE else None
            variants[r["name"]] = OvisU1.from_pretrained(variant_dir(g.ckpt, edit)).eval()
    check_t2i(g, proj, variants)
    check_edit(g, proj)
    check_understanding(g, proj)

    counted = [r for r in ROWS if not r["info"]]
    failed = [r for r in counted if not r["ok"]]
    by_case: dict[str, list] = {}
    for r in counted:
        by_case.setdefault(r["case"], []).append(r)
    print("\n== summary per case ==")
    for name, rows in by_case.items():
        bad = [r["name"] for r in rows if not r["ok"]]
        print(f"  {'PASS' if not bad else 'FAIL'}  {name:48s} {len(rows) - len(bad)}/{len(rows)}"
              + (f"   failing: {'; '.join(b.strip() for b in bad)[:300]}" if bad else ""))
    n_cases = len(by_case)
    n_bad = sum(any(not r["ok"] for r in rows) for rows in by_case.values())
    print(f"\n{len(counted) - len(failed)}/{len(counted)} checks pass; {n_cases - n_bad}/{n_cases} cases pass"
          f"{' (after the workaround load)' if NOTE else ''}")
    summary = {"checks": len(counted), "failed": len(failed), "cases": n_cases, "cases_failed": n_bad,
               "failed_cases": [c for c, rows in by_case.items() if any(not r["ok"] for r in rows)],
               "workaround_load": bool(NOTE)}
    if args.json:
        json.dump({"summary": summary, "rows": ROWS}, open(args.json, "w"), indent=1, default=float)
    print(json.dumps(summary))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
