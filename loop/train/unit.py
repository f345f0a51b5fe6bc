"""A whole unit: check its selection, load the base, gather the data, attach the adapters, fit, and save the
adapter, config.yaml and manifest.json (last: it marks the unit done).

    loop train [--unit N]
    loop run --round        (the train phase)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import torch

from loop import families, memory, noise_prior
from loop.config import LoopConfig, to_yaml
from loop.errors import LoopError
from loop.models import load_base, pick_device
from loop.objectives import matched_pairs, preference_pairs
from loop.store import Store, raise_missing_unit
from loop.train.adapters import EMBEDS, _attach, add_reference_adapter, load_parent_adapter, save_lora
from loop.train.data import TrainData, _st_bytes, class_images, crop_geometry, encode_captions, encode_latents
from loop.train.fit import Checkpoints, fit
from loop.train.pool import fit_noise_prior, pool_share_weights, taste_pool_items, twin_rows
from loop.workspace import Workspace, atomic_write, unit_name


def check_can_train(ws: Workspace, store: Store, parent: int) -> dict:
    """The selection.json of unit parent+1, or LoopError saying why it cannot be trained now (also checked before
    `loop train --processes N` launches its workers, so a mistake is said once, not once per process)."""
    unit = parent + 1
    out = ws.checkpoint(unit)
    if store.unit(parent) is None:
        raise_missing_unit(store, parent)
    if store.unit(unit) is not None:
        # retraining would replace the weights that unit's images (and any later unit) were made with
        raise LoopError(
            f"unit {unit} already exists ({ws.rel(out)}, trained from unit {parent}); retraining it would replace the "
            f"weights its images came from. `--unit N` names the parent: to train unit {store.current_unit() + 1}, "
            f"run `loop run --round` (or `loop train` once that round has a selection)"
        )
    sel_path = out / "selection.json"
    if not sel_path.exists():
        raise LoopError(f"no selection for unit {unit} at {ws.rel(sel_path)}; run `loop run --round {parent}` first")
    sel_doc = json.loads(sel_path.read_text())
    if not sel_doc.get("images"):
        raise LoopError(f"the selection for unit {unit} is empty; rate some images higher, then select again")
    return sel_doc


def preference_items(store: Store, cfg: LoopConfig, parent: int, selection: list[dict]) -> list[dict]:
    """train.objective=dpo's images: the rated txt2img images units made in rounds up to `parent` (only round
    `parent` with select.accumulate=false) that make a pair (loop.objectives): the better image one the strategy
    selected (winner=True: golden's UR images, converge's min_tier and up), the worse any image of the same
    prompt rated train.dpo_min_gap tiers or more below it. None make a pair: an empty list."""
    chosen = {it.get("id") for it in selection}
    rows = [
        {**dict(r), "winner": r["id"] in chosen} for r in store.images()
        if r["tier"] is not None and r["unit"] is not None and r["parent_id"] is None and r["round"] is not None
        and r["round"] <= parent and (cfg.select.accumulate or r["round"] == parent)
    ]  # fmt: skip
    used = sorted({i for pair in preference_pairs(rows, cfg.train.dpo_min_gap) for i in pair})
    keys = ("id", "sha256", "path", "tier", "unit", "round", "source", "winner")
    return [{**{k: rows[i][k] for k in keys}, "caption": rows[i]["prompt"], "prior": False} for i in used]


def no_pairs_message(tc) -> str:
    return (
        f"train.objective=dpo needs a selected image and an image of the same prompt rated at least "
        f"{tc.dpo_min_gap} tiers below it (train.dpo_min_gap), and there are none"
    )


def train_unit(ws: Workspace, store: Store, cfg: LoopConfig, parent: int, log=print, stop_after=None) -> dict:
    """Train unit parent+1 from its selection.json; writes the adapter, manifest.json and config.yaml."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    tc = cfg.train
    unit = parent + 1
    out = ws.checkpoint(unit)
    sel_doc = check_can_train(ws, store, parent)
    selection = sel_doc["images"]
    # the unit records the strategy its selection was made with: select.* given now (after the select phase was
    # done) cannot change what this unit learns from, only the next round's selection
    strategy = sel_doc.get("strategy") or cfg.select.strategy
    if strategy != cfg.select.strategy:
        log(f"the selection for unit {unit} was made with select.strategy={strategy} (selection.json); "
            f"select.strategy={cfg.select.strategy} applies from the next round")  # fmt: skip
        cfg = dataclasses.replace(cfg, select=dataclasses.replace(cfg.select, strategy=strategy))
    t0 = time.time()

    # 1. the base model in fp32 (accelerate handles mixed precision); everything frozen
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=pick_device(cfg.model).type == "cpu")
    pipe = load_base(cfg.model, device=accelerator.device, dtype=torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for m in (pipe.vae, pipe.unet, *[enc for _, enc in families.text_encoders(pipe)]):
        m.requires_grad_(False)
    cd = tc.method == "custom_diffusion"
    token = tc.modifier_token if cd else ""
    te_lora = tc.method == "lora" and tc.text_encoder_lora
    fallback = ""  # why a unit asked to train with dpo trains supervised (said in the log and the manifest)
    if tc.objective == "dpo" and (cd or te_lora):
        fallback = ("train.objective=dpo trains the UNet's adapter only; this unit's text encoder learns too "
                    f"({'custom_diffusion' if cd else 'text_encoder_lora'})")  # fmt: skip
        log(f"{fallback}, so it trains supervised")
        tc = dataclasses.replace(tc, objective="supervised")
        cfg = dataclasses.replace(cfg, train=tc)

    # 2. class images (made by the base model, before any adapter is attached), then the latents (cached)
    items = [dict(it, prior=False) for it in selection]
    if tc.objective == "dpo":  # the selection's images against worse-rated images of the same prompts
        paired = preference_items(store, cfg, parent, selection)
        items = paired or items
        if not paired:  # a small round, hand-picked or imported images: nothing to prefer them to
            fallback = no_pairs_message(tc)
            log(
                f"{fallback}, so this unit trains supervised on its selection (rate more images of each prompt, "
                "or lower train.dpo_min_gap, for a unit that learns from every tier)"
            )
            tc = dataclasses.replace(tc, objective="supervised")
            cfg = dataclasses.replace(cfg, train=tc)
    pool = taste_pool_items(ws, store, pipe, cfg, selection, log) if tc.taste_pool else []
    prior = fit_noise_prior(ws, store, pipe, cfg, selection, log) if tc.noise_prior else None
    # dpo: every pool picture, with its predicted tier, pairs like a rated one; supervised: the predicted winners
    items += pool if tc.objective == "dpo" else [it for it in pool if it["winner"]]
    if tc.prior_preservation and tc.objective != "dpo":
        items += class_images(ws, pipe, [it["caption"] for it in selection], tc.class_images, cfg, log)
    asked = {it["sha256"] for it in items if not it["prior"]}  # dpo: a selected image with no worse one is not
    lat, items, cache_stats = encode_latents(ws, pipe, items, size, cfg.model.base, log)
    log(f"encode cache: {cache_stats['cache_hits']} hit(s), {cache_stats['cache_misses']} miss(es)")
    if not any(not it["prior"] for it in items):
        raise LoopError("none of the selected images could be read; check the files listed above")
    captions = [f"{token} {it['caption']}".strip() if token and not it["prior"] else it["caption"] for it in items]
    data = TrainData(
        latents=torch.stack(lat),
        prior=torch.tensor([it["prior"] for it in items]),
        weights=torch.tensor([float(it.get("weight", 1.0)) for it in items]),
    )

    # SDXL: each image's original size and crop go to the UNet with its latent (loop.families.size_ids)
    data.time_ids = families.size_ids(pipe, [crop_geometry(ws.root / it["path"], size) for it in items], size)
    empty_embed, empty_pooled = encode_captions(ws, pipe, [""], cfg.model.base)  # before any adapter: the base's
    data.empty_embed, data.empty_pooled = empty_embed[0], None if empty_pooled is None else empty_pooled[0]
    if tc.objective == "dpo":  # over the images that could be read
        rows = [{"prompt": it["caption"], "tier": it["tier"], "winner": it["winner"]} for it in items]
        pairs = preference_pairs(rows, tc.dpo_min_gap)
        if not pairs:  # the images that made them could not be read (listed above)
            raise LoopError(
                f"{no_pairs_message(tc)} among the images that could be read; check the files listed "
                "above, or train with train.objective=supervised"
            )
        every = len(pairs)
        pairs = matched_pairs(pairs, data.latents, tc.dpo_match)
        data.pairs = torch.tensor(pairs, dtype=torch.long)
        data.pair_weights = pool_share_weights(pairs, items, tc.taste_pool_share)
        twins = twin_rows(items, tc.invariance, tc.seed) if tc.invariance != "none" else []
        data.twins = torch.tensor(twins, dtype=torch.long) if twins else None
        log(
            f"dpo: {len(pairs)} pair(s) of images of the same prompt, {tc.dpo_min_gap}+ tiers apart"
            + (f" (each selected image with its {tc.dpo_match} nearest of {every})" if tc.dpo_match else "")
        )
        lone = sum(it["sha256"] not in asked for it in selection)
        if lone:  # imports, seed images and variations have no worse-rated image of their prompt to be preferred to
            log(
                f"dpo: {lone} selected image(s) have no image of their prompt rated {tc.dpo_min_gap}+ tiers below "
                f"them (imports, variations) and are not learnt from; train.objective=supervised learns every one"
            )

    # 3. adapters: what learns depends on the method; their random init is seeded, so a unit is reproducible
    with torch.random.fork_rng():
        torch.manual_seed(tc.seed)
        unet, text_encoder, keep_rows, new_rows = _attach(pipe, tc, cd, token, te_lora)
    if text_encoder is not None:
        data.ids = families.token_ids(pipe, captions)
        data.empty = families.token_ids(pipe, [""])[0]
    else:
        data.embeds, data.pooled = encode_captions(ws, pipe, captions, cfg.model.base)
        data.empty = data.empty_embed
    if tc.start == "from_parent" and parent > 0:
        load_parent_adapter(pipe, ws.checkpoint(parent), tc)
        if tc.objective == "dpo" and tc.dpo_reference == "parent":
            add_reference_adapter(pipe, ws.checkpoint(parent), tc)
            if accelerator.is_main_process:
                log(f"dpo: preferred against {unit_name(parent)}, where it starts (train.dpo_reference=parent)")
        if token and (ws.checkpoint(parent) / EMBEDS).exists():
            saved_token, saved_rows = families.read_embedding(ws.checkpoint(parent) / EMBEDS)
            if saved_token == token and len(saved_rows) == len(new_rows):
                tables = families.embedding_tables(text_encoder)
                with torch.no_grad():
                    for table, row, saved in zip(tables, new_rows, saved_rows):
                        table[row] = saved.to(table.dtype)
                keep_rows = [(table.detach().clone().cpu(), row) for table, row in zip(tables, new_rows)]

    # frozen parts in the half precision accelerate computes in, on CUDA (the adapters learn in fp32, as diffusers'
    # training scripts do); then the estimated peak memory, before the long part
    on_cuda = accelerator.device.type == "cuda"
    if on_cuda and tc.mixed_precision != "no":
        from diffusers.training_utils import cast_training_params

        half = torch.bfloat16 if tc.mixed_precision == "bf16" else torch.float16
        pipe.vae.to(dtype=half)  # its latents are cached already
        if text_encoder is None:  # frozen: their embeddings are cached already
            for _, enc in families.text_encoders(pipe):
                enc.to(dtype=half)
        unet.to(dtype=half)
        cast_training_params(unet, dtype=torch.float32)
    if accelerator.is_main_process:
        log(memory_line(pipe, tc, accelerator.device, f"train {unit_name(unit)}"))

    # 4. the loop, with resumable checkpoints tied to this exact selection and these settings
    fingerprint = hashlib.sha256(
        json.dumps(
            {"images": [it["sha256"] for it in items], "train": _plain(cfg)["train"], "base": cfg.model.base},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    ckpt = Checkpoints(out / ".training", fingerprint, accelerator, [unet, text_encoder], log)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, text_encoder, ema = fit(
        unet,
        data,
        noise_sched,
        tc,
        accelerator,
        desc=f"train {unit_name(unit)}",
        text_encoder=text_encoder,
        keep_rows=keep_rows,
        checkpoints=ckpt,
        stop_after=stop_after,
        log=log,
    )
    if stop_after is not None and stop_after < tc.steps:
        return {"stopped_at": stop_after}

    # 5. save: weights (diffusers format), then config.yaml, then manifest.json last (it marks the unit done)
    manifest = {}
    trained = {it["sha256"] for it in items if not it["prior"]}
    if accelerator.is_main_process:
        save_lora(unet, out, *(families.encoder_modules(text_encoder) if te_lora else []))
        if token:  # the new row of each text encoder (SDXL: {"clip_l", "clip_g"}, the token in the metadata)
            rows = [table[row : row + 1].detach().float().cpu().contiguous()
                    for table, row in zip(families.embedding_tables(text_encoder), new_rows)]  # fmt: skip
            atomic_write(out / EMBEDS, _st_bytes(*families.embedding_tensors(pipe, token, rows)))
        else:
            (out / EMBEDS).unlink(missing_ok=True)
        if prior is not None:
            noise_prior.save(out, prior, tc.noise_prior)
        else:
            (out / noise_prior.FILE).unlink(missing_ok=True)
        atomic_write(out / "config.yaml", to_yaml(cfg))
        manifest = {
            "unit": unit,
            "parent": parent,
            "base_model": cfg.model.base,
            "method": tc.method,
            "start": tc.start,
            "strategy": strategy,
            "modifier_token": token or None,
            "text_encoder_lora": te_lora,
            # the images it learnt from: the selection less any that could not be read (named in left_out); with
            # objective=dpo the selected images that won a pair, and in "losers" the images they were preferred to
            "images": [
                {k: it.get(k) for k in ("id", "sha256", "caption", "tier")}
                for it in items
                if not it["prior"] and it.get("winner", True) and not it.get("pool")
            ],
            "losers": [
                {k: it.get(k) for k in ("id", "sha256", "caption", "tier")}
                for it in items
                if not it.get("winner", True) and not it.get("pool")
            ],
            # train.taste_pool: the base's pictures the unit also learnt from, labelled by the taste model
            "taste_pool": {
                "pictures": sum(it["tier"] is not None for it in pool),  # train.invariance=hue's twins aside
                "winners": sum(it["winner"] for it in pool),
                "hues": tc.taste_pool_hues,
                # train.invariance: which pictures' rewards it held equal, with what weight, and how many pairs
                "invariance": tc.invariance,
                "invariance_weight": tc.invariance_weight,
                "twins": 0 if data.twins is None else len(data.twins),
            },
            # train.noise_prior: the initial noises' shift (loop.noise_prior), or why there is none
            "noise_prior": (
                None
                if not tc.noise_prior
                else {
                    "strength": tc.noise_prior,
                    "grid": tc.noise_prior_grid,
                    **(noise_prior.info(prior) if prior else {"note": "not fitted"}),
                }
            ),  # fmt: skip
            "left_out": [
                {k: it.get(k) for k in ("id", "sha256")}
                for it in selection
                if it["sha256"] in asked and it["sha256"] not in trained
            ],
            "unpaired": sum(it["sha256"] not in asked for it in selection) if tc.objective == "dpo" else 0,
            "class_images": sum(it["prior"] for it in items),
            "objective": tc.objective,
            "objective_note": fallback or None,  # why it is not the train.objective asked for
            "pairs": 0 if data.pairs is None else len(data.pairs),
            "config": json.loads(json.dumps(_plain(cfg))),
            "steps": tc.steps,
            "processes": accelerator.num_processes,
            "final_loss": round(ema, 6),
            "duration_s": round(time.time() - t0, 2),
            **cache_stats,
        }
        atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
        store.add_unit(
            unit,
            parent=parent,
            path=ws.rel(out),
            base=cfg.model.base,
            method=tc.method,
            strategy=strategy,
            manifest={k: v for k, v in manifest.items() if k != "images"},
        )
        ckpt.clear()
    accelerator.wait_for_everyone()
    return manifest


train_lora = train_unit  # the name the round and older callers use


def memory_line(pipe, tc, device, what: str = "train") -> str:
    """The estimated peak memory of training with `tc` on `device` (loop.memory), and what lowers it."""
    cfg = pipe.unet.config
    layers = cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else max(cfg.layers_per_block)
    models = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    frozen, trainable = memory.count(*models)
    half = torch.device(device).type == "cuda" and tc.mixed_precision != "no"
    estimate = memory.train_peak(
        frozen,
        trainable,
        batch=tc.batch_size * (2 if tc.prior_preservation else 1),
        latent_side=cfg.sample_size,
        width=sum(cfg.block_out_channels),
        layers_per_block=layers,
        frozen_bytes=2 if half else 4,
        act_bytes=2 if half else 4,
        gradient_checkpointing=tc.gradient_checkpointing,
        optimizer=tc.optimizer,
        on_cuda=torch.device(device).type == "cuda",
        mixed_precision=tc.mixed_precision,
    )
    return estimate.line(what, torch.device(device).type, memory.available(device))


def _plain(cfg: LoopConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
