"""Training a unit: DreamBooth-style LoRA or Custom Diffusion, through PEFT and accelerate.

    loop train [--unit N]           trains unit N+1 from checkpoints/unit_{N+1}/selection.json
    loop train --processes 2        the same with DDP (accelerate launch; gloo on CPU)
    loop run --round                (the train phase)

Methods (`train.method`):
- lora: a LoRA on the UNet's attention projections (`train.target_modules`), optionally on the text encoder
  (`train.text_encoder_lora`).
- custom_diffusion: as in "Multi-Concept Customization of Text-to-Image Diffusion" (Kumari et al., 2023), only
  the cross-attention key and value projections (attn2.to_k, attn2.to_v) learn, plus optionally one new
  modifier token (`train.modifier_token`, initialised from `train.initializer_token`) whose embedding row is
  the only part of the text encoder that learns. We use the paper's low-rank variant (a PEFT LoRA on to_k and
  to_v) rather than full K/V: it is saved in the ordinary diffusers LoRA format, so it loads with
  `load_lora_weights` everywhere, and it avoids diffusers' Custom Diffusion attention processors, which
  silently fail to load their weights when peft is installed (diffusers issues #7261 and #9320). The token's
  embedding is saved as learned_embeds.safetensors, the textual-inversion format `load_textual_inversion` reads.

Both: min-SNR-gamma weighting, noise offset, optional prior preservation (class images made once by the base
model and cached). `train.start`: from_base (default: a new adapter on the accumulated set, which keeps drift
in check) or from_parent (continue unit N's adapter).

Cache: latents keyed by image hash, VAE identity and resolution; text embeddings keyed by caption and
text-encoder identity (when the text encoder is frozen). A round encodes only images it hasn't seen.
Non-square images are resized on their shorter side and centre-cropped (documented crop policy).

Resume: an accelerate checkpoint (adapter, optimizer, scheduler, RNG) every `train.checkpoint_every` steps in
checkpoints/unit_NNN/.training/; after a kill, training the same selection with the same settings resumes
from the last one. Weights are written before manifest.json, which marks the unit done.

The package, one file per concern: data.py (images, latent and text caches, class images), adapters.py (what learns,
and the adapter file), fit.py (timesteps, losses, learning rate, checkpoints, the fitting loop), unit.py (a whole
unit, from selection.json to manifest.json). The objectives themselves are loop.objectives.
"""

from loop.train.adapters import (
    CD_TARGETS,
    EMBEDS,
    TE_TARGETS,
    WEIGHTS,
    add_lora,
    add_modifier_token,
    add_text_lora,
    load_parent_adapter,
    save_lora,
)
from loop.train.data import TrainData, _token_ids, class_images, encode_latents, encode_texts, load_square
from loop.train.fit import (
    BaseTargets,
    Checkpoints,
    base_prediction,
    dpo_batch_loss,
    fit,
    loss_target,
    lr_factor,
    snr_weights,
    timestep_weights,
)
from loop.train.unit import check_can_train, no_pairs_message, preference_items, train_lora, train_unit

__all__ = [
    "CD_TARGETS",
    "EMBEDS",
    "TE_TARGETS",
    "WEIGHTS",
    "BaseTargets",
    "Checkpoints",
    "TrainData",
    "_token_ids",
    "add_lora",
    "add_modifier_token",
    "add_text_lora",
    "base_prediction",
    "check_can_train",
    "class_images",
    "dpo_batch_loss",
    "encode_latents",
    "encode_texts",
    "fit",
    "load_parent_adapter",
    "load_square",
    "loss_target",
    "lr_factor",
    "no_pairs_message",
    "preference_items",
    "save_lora",
    "snr_weights",
    "timestep_weights",
    "train_lora",
    "train_unit",
]
