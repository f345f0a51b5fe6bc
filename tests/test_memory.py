"""Memory on consumer GPUs: gradient checkpointing, the 8-bit optimiser's error off CUDA, VAE slicing and tiling,
and the peak-memory estimate that `loop train` and `loop run --round` print."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from loop import memory
from loop.config import ModelConfig, load_config
from loop.errors import LoopError
from loop.models import load_base
from loop.train import TrainData, add_lora, fit
from loop.train.fit import make_optimizer
from loop.train.unit import memory_line


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.optimizer=adam", "train.optimizer"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing"),
        ("generate.vae_slicing=sometimes", "generate.vae_slicing"),
        ("generate.vae_tiling=2", "generate.vae_tiling"),
    ],
)
def test_memory_options_validate(override, key):
    with pytest.raises((LoopError, ValueError)) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_memory_options_load():
    cfg = load_config(None, ["train.optimizer=adamw8bit", "train.gradient_checkpointing=true",
                             "generate.vae_slicing=true", "generate.vae_tiling=true"])  # fmt: skip
    assert cfg.train.optimizer == "adamw8bit" and cfg.train.gradient_checkpointing
    assert cfg.generate.vae_slicing and cfg.generate.vae_tiling


def _first_loss(gradient_checkpointing: bool) -> tuple[float, object]:
    pipe = load_base(ModelConfig())
    overrides = ["train.steps=1", "train.batch_size=2", "train.uncond_preservation=0"]
    tc = load_config(None, overrides + [f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}"]).train
    torch.manual_seed(0)
    unet = add_lora(pipe.unet, tc)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(["a circle"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, _, loss = fit(unet, TrainData(latents=latents, embeds=embeds), sched, tc, Accelerator(cpu=True))
    return loss, unet


def test_gradient_checkpointing_trains_with_the_same_loss_at_step_0():
    plain, _ = _first_loss(False)
    checkpointed, unet = _first_loss(True)
    assert unet.is_gradient_checkpointing  # it was on while training
    assert checkpointed == pytest.approx(plain, rel=1e-5, abs=1e-7)


def test_adamw8bit_without_cuda_is_one_line():
    tc = load_config(None, ["train.optimizer=adamw8bit"]).train
    with pytest.raises(LoopError) as e:
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], tc, torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "train.optimizer=adamw" in msg and "CUDA" in msg


def test_estimate_rises_with_batch_and_falls_with_checkpointing_and_8bit():
    sd15 = dict(latent_side=64, width=320 + 640 + 1280 + 1280, layers_per_block=2, on_cuda=True)
    lora, frozen = 3_000_000, 1_066_000_000  # SD 1.5: UNet, VAE and CLIP-L; a rank-4 attention LoRA
    base = memory.train_peak(frozen, lora, batch=1, **sd15)
    assert memory.train_peak(frozen, lora, batch=4, **sd15).total > base.total
    assert memory.train_peak(frozen, lora, batch=1, gradient_checkpointing=True, **sd15).total < base.total
    assert memory.train_peak(frozen, lora, batch=1, optimizer="adamw8bit", **sd15).total < base.total
    # a device too small is told which options lower it; one large enough is not
    line = base.line("train", "cuda", available=base.total // 2)
    assert "will not fit" in line and "train.gradient_checkpointing=true" in line and "adamw8bit" in line
    assert "will not fit" not in base.line("train", "cuda", available=base.total * 2)
    # generation: slicing lowers a batch's VAE decode, tiling a large image's
    gen = dict(params=frozen, batch=4, side=1024, latent_side=128, width=sum((320, 640, 1280)))
    plain = memory.generate_peak(**gen)
    assert memory.generate_peak(**gen, vae_slicing=True).total < plain.total
    assert memory.generate_peak(**gen, vae_tiling=True).total < plain.total
    assert "generate.vae_slicing=true" in plain.line("generate", "cuda", available=1)


def test_training_prints_the_estimate_for_the_device():
    pipe = load_base(ModelConfig())
    tc = load_config(None, ["train.batch_size=2"]).train
    add_lora(pipe.unet, tc)
    line = memory_line(pipe, tc, "cpu")
    assert line.startswith("train: estimated peak memory") and "GiB" in line
    # the estimate counts the batch: a bigger batch, a bigger estimate
    big = load_config(None, ["train.batch_size=64"]).train
    assert float(memory_line(pipe, big, "cpu").split()[4]) > float(line.split()[4])


def test_vae_slicing_and_tiling_give_the_same_images():
    import numpy as np

    pipe = load_base(ModelConfig())

    def images():
        g = torch.Generator().manual_seed(1)
        return pipe(["a circle", "a square"], num_inference_steps=2, generator=g, output_type="np").images

    plain = images()
    pipe.vae.enable_slicing()
    np.testing.assert_allclose(images(), plain, atol=1e-5)


def _first_loss_text_encoder_learns(gradient_checkpointing: bool) -> float:
    from loop.train import add_text_lora

    pipe = load_base(ModelConfig())
    overrides = ["train.steps=1", "train.batch_size=2", "train.uncond_preservation=0", "train.text_encoder_lora=true"]
    tc = load_config(None, overrides + [f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}"]).train
    torch.manual_seed(0)
    text_encoder = add_text_lora(pipe.text_encoder, tc)
    unet = add_lora(pipe.unet, tc)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(["a circle"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    data = TrainData(latents=latents, ids=ids)
    _, text_encoder, loss = fit(unet, data, sched, tc, Accelerator(cpu=True), text_encoder=text_encoder)
    assert text_encoder.is_gradient_checkpointing == gradient_checkpointing
    return loss


def test_gradient_checkpointing_of_a_learning_text_encoder_gives_the_same_loss():
    assert _first_loss_text_encoder_learns(True) == pytest.approx(_first_loss_text_encoder_learns(False), rel=1e-5)


def test_generation_says_its_estimate_before_it_starts(ws):
    from loop.generate import generate

    ws.prompts_path.write_text("a circle\n", encoding="utf-8")
    cfg = load_config(ws.root, ["generate.images_per_prompt=2", "generate.steps=2", "generate.vae_slicing=true"])
    said = []
    with ws.store() as store:
        store.ensure_base_unit(cfg.model.base)
        assert generate(ws, store, cfg, unit=0, round=0, log=said.append)["made"] == 2
        assert [m for m in said if m.startswith("generate unit 0: estimated peak memory")]
        said.clear()
        generate(ws, store, cfg, unit=0, round=0, log=said.append)  # nothing left to make: nothing to estimate
        assert not [m for m in said if "estimated peak memory" in m]
