import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from loop.config import ModelConfig, load_config
from loop.models import load_base
from loop.train import TrainData, add_lora, fit, save_lora


def _fake_data(pipe, n=4):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(["a circle"] * n, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    return latents, embeds


def _image(pipe, seed=3):
    g = torch.Generator().manual_seed(seed)
    return pipe("a circle", num_inference_steps=4, guidance_scale=4.0, generator=g, output_type="np").images[0]


def test_only_adapter_weights_change_and_adapter_changes_output(tmp_path):
    pipe = load_base(ModelConfig())
    before_img = _image(pipe)
    tc = load_config(None, ["train.steps=3", "train.lr=1e-2", "train.batch_size=2"]).train
    unet = add_lora(pipe.unet, tc)
    snapshot = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    latents, embeds = _fake_data(pipe)
    data = TrainData(latents=latents, embeds=embeds)
    unet, _, loss = fit(unet, data, DDPMScheduler.from_config(pipe.scheduler.config), tc, Accelerator(cpu=True))
    assert np.isfinite(loss)
    after = unet.state_dict()
    changed = {k for k in snapshot if not torch.equal(snapshot[k], after[k])}
    assert changed, "training changed nothing"
    assert all("lora_" in k for k in changed), (
        f"non-adapter weights changed: {sorted(changed - {k for k in changed if 'lora_' in k})[:5]}"
    )
    lora_b = [k for k in snapshot if "lora_B" in k]
    assert lora_b and all(k in changed for k in lora_b)
    pipe.unet = unet
    trained_img = _image(pipe)
    assert np.abs(trained_img - before_img).mean() > 1e-3

    # save, then load into a fresh pipeline: the same image at the same seed
    save_lora(unet, tmp_path)
    fresh = load_base(ModelConfig())
    fresh.load_lora_weights(str(tmp_path))
    np.testing.assert_allclose(_image(fresh), trained_img, atol=1e-4)


def test_min_snr_weights():
    from diffusers.training_utils import compute_snr

    from loop.train import snr_weights

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([1, 100, 500, 999])
    assert torch.equal(snr_weights(sched, t, 0.0), torch.ones(4))
    w = snr_weights(sched, t, 5.0)
    snr = compute_snr(sched, t)
    assert torch.allclose(w[snr > 5], 5.0 / snr[snr > 5])  # low noise: shrunk
    assert torch.allclose(w[snr <= 5], torch.ones(int((snr <= 5).sum())))  # high noise: kept
    assert w[0] < w[1] < w[3] + 1e-6


def test_timestep_bias_samples_the_chosen_end_more_often():
    from loop.train import timestep_weights

    assert timestep_weights(1000, load_config(None, []).train) is None  # the default: uniform
    tc = load_config(None, ["train.timestep_bias=later"]).train  # x8 on the last quarter
    w = timestep_weights(1000, tc)
    assert w[:750].eq(1).all() and w[750:].eq(8).all()
    t = torch.multinomial(w, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((t >= 750).float().mean().item() - 8 * 250 / (750 + 8 * 250)) < 0.02  # 73% from the last quarter
    early = load_config(None, ["train.timestep_bias=earlier", "train.timestep_bias_multiplier=3",
                               "train.timestep_bias_portion=0.1"]).train  # fmt: skip
    w = timestep_weights(1000, early)
    assert w[:100].eq(3).all() and w[100:].eq(1).all()


def test_timestep_bias_bad_values_name_the_key():
    import pytest

    for bad, key in [("train.timestep_bias=sideways", "train.timestep_bias"),
                     ("train.timestep_bias_portion=1.5", "train.timestep_bias_portion"),
                     ("train.timestep_bias_multiplier=0", "train.timestep_bias_multiplier")]:  # fmt: skip
        with pytest.raises(Exception, match=key):
            load_config(None, [bad])
