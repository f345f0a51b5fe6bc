import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from loop.config import ModelConfig, load_config
from loop.errors import LoopError
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
    saved = save_lora(unet, tmp_path)
    from loop.workspace import UMASK

    assert saved.stat().st_mode & 0o777 == 0o666 & ~UMASK  # a plain file's mode, as every other file (not 0600)
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


def test_the_loss_target_follows_the_prediction_type():
    from diffusers.training_utils import compute_snr

    from loop.errors import LoopError
    from loop.train import loss_target, snr_weights

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])
    eps = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(loss_target(eps, x0, noise, t), noise)
    v = DDPMScheduler.from_config(eps.config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    a = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(loss_target(v, x0, noise, t), a * noise - s * x0, atol=1e-6)
    # at the zero-SNR end the velocity is -x0: the loss sees the whole image there
    assert torch.allclose(loss_target(v, x0, noise, t)[2], -x0[2], atol=1e-3)
    # min-SNR weights in the form for each target, finite at SNR 0
    snr = compute_snr(v, t)
    assert torch.allclose(snr_weights(v, t, 5.0), snr.clamp(max=5.0) / (snr + 1))
    assert torch.isfinite(snr_weights(DDPMScheduler.from_config(v.config, prediction_type="epsilon"), t, 5.0)).all()
    sample = DDPMScheduler.from_config(eps.config, prediction_type="sample")
    try:
        loss_target(sample, x0, noise, t)
    except LoopError as e:
        assert "prediction" in str(e) and "sample" in str(e)
    else:
        raise AssertionError("an unsupported prediction type must stop with a clear error")


def _uncond_drift(pipe, uncond_preservation: float) -> float:
    """Train a fresh LoRA on captioned images, then measure how far the unconditional prediction moved."""
    keep = f"train.uncond_preservation={uncond_preservation}"
    tc = load_config(None, ["train.steps=60", "train.lr=3e-3", "train.batch_size=4", keep]).train
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    latents, embeds = _fake_data(pipe, n=8)
    latents = latents * 0.3 + 1.5  # a strong shift the adapter can learn: every image "warm"
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = pipe.text_encoder(ids)[0][0]
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([999, 900, 700, 500])
    cond = empty.unsqueeze(0).expand(4, -1, -1)
    with torch.no_grad():
        before = pipe.unet(xt, t, encoder_hidden_states=cond).sample
    unet = add_lora(pipe.unet, tc)
    data = TrainData(latents=latents, embeds=embeds, empty=empty, empty_embed=empty)
    unet, _, _ = fit(unet, data, sched, tc, Accelerator(cpu=True))
    with torch.no_grad():
        after = unet(xt, t, encoder_hidden_states=cond).sample
        unet.disable_adapters()
        off = unet(xt, t, encoder_hidden_states=cond).sample
        unet.enable_adapters()
    assert torch.allclose(off, before, atol=1e-5), "adapters off must give the base model back"
    return float((after - before).pow(2).mean())


def test_uncond_preservation_keeps_the_unconditional_branch_where_the_base_had_it():
    # guidance = uncond + cfg * (cond - uncond): an adapter that drags the unconditional branch along has its
    # shift subtracted at sampling time; preservation trains "" toward the frozen base's own prediction
    free = _uncond_drift(load_base(ModelConfig()), 0.0)
    kept = _uncond_drift(load_base(ModelConfig()), 0.5)
    assert free > 0
    assert kept < 0.5 * free, (kept, free)


def test_base_targets_are_the_base_models_own_predictions_and_drawn_the_same_on_resume():
    from loop.train import BaseTargets

    pipe = load_base(ModelConfig())
    tc = load_config(None, ["train.steps=40", "train.batch_size=3", "train.uncond_preservation=0.5"]).train
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    latents, embeds = _fake_data(pipe, n=6)
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = pipe.text_encoder(ids)[0][0]
    unet = add_lora(pipe.unet, load_config(None, []).train)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # adapters that change the output, so that "adapters off" is visible
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    data = TrainData(latents=latents, embeds=embeds, empty=empty, empty_embed=empty)
    acc = Accelerator(cpu=True)
    pools = [torch.arange(6)] * 3
    bank = BaseTargets(unet, acc, data, sched, tc, None, pools, "cpu")
    resumed = BaseTargets(unet, acc, data, sched, tc, None, pools, "cpu")
    resumed.at(39)  # a resumed run starts in a later chunk; the earlier chunk must come out the same
    kept = 0
    for step in (0, 5, 33, 39, 7):
        mask, xt, t, target = bank.at(step)
        again = resumed.at(step)
        for a, b in zip((mask, xt, t, target), again):
            assert torch.equal(a, b)
        assert len(xt) == len(t) == len(target) == int(mask.sum()) and len(mask) == 3
        if not len(xt):
            continue
        kept += len(xt)
        cond = empty.unsqueeze(0).expand(len(xt), -1, -1)
        with torch.no_grad():
            on = unet(xt, t, encoder_hidden_states=cond).sample
            unet.disable_adapters()
            off = unet(xt, t, encoder_hidden_states=cond).sample
            unet.enable_adapters()
        torch.testing.assert_close(target, off, atol=1e-4, rtol=1e-4)  # the frozen base's own prediction
        assert not torch.allclose(target, on, atol=1e-3)
    assert kept > 0


def _trained(compiled: bool, log=print, seed: int = 0, extra=()):
    """A LoRA trained 4 steps (eager or with train.compile), and its UNet's prediction on a fixed input."""
    pipe = load_base(ModelConfig())
    over = ["train.steps=4", "train.lr=1e-2", "train.batch_size=2", f"train.compile={str(compiled).lower()}", *extra]
    tc = load_config(None, [*over, f"train.seed={seed}"]).train
    torch.manual_seed(seed)  # the adapter's random init
    unet = add_lora(pipe.unet, tc)
    latents, embeds = _fake_data(pipe)
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = pipe.text_encoder(ids)[0][0]
    # the default uncond preservation: its base forwards stay eager next to the compiled training step
    data = TrainData(latents=latents, embeds=embeds, empty=empty, empty_embed=empty)
    unet, _, _ = fit(unet, data, DDPMScheduler.from_config(pipe.scheduler.config), tc, Accelerator(cpu=True), log=log)
    g = torch.Generator().manual_seed(5)
    xt, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([900, 300])
    with torch.no_grad():
        pred = unet(xt, t, encoder_hidden_states=embeds[:2]).sample
        unet.disable_adapters()
        base = unet(xt, t, encoder_hidden_states=embeds[:2]).sample
        unet.enable_adapters()
    weights = {k: v.detach().clone() for k, v in unet.state_dict().items() if "lora_" in k}
    return weights, pred - base


def test_train_compile_learns_what_eager_training_learns():
    # the same init, data and batches: inductor's fused kernels round differently in the last bits only (1e-6 here;
    # another seed moves the prediction by ~30%)
    _, eager = _trained(False)
    _, compiled = _trained(True)
    assert float(eager.abs().mean()) > 1e-3, "eager training learned nothing"
    rel = float((compiled - eager).norm() / eager.norm())
    assert rel < 1e-3, f"the compiled run's adapter differs from the eager one's by {rel:.2%}"


def test_train_compile_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken(module, *a, **k):
        def call(*args, **kwargs):
            raise RuntimeError("inductor: no working C++ compiler found\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    said = []
    fallback, _ = _trained(True, log=said.append)
    assert len(said) == 1 and "compiling failed" in said[0] and "no working C++ compiler" in said[0], said
    eager, _ = _trained(False)
    assert fallback.keys() == eager.keys()
    assert all(torch.equal(fallback[k], v) for k, v in eager.items()), "the fallback must train exactly as eager"


def test_train_ema_saves_the_average_of_the_steps_not_the_last_one():
    from diffusers.training_utils import EMAModel
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []  # the trainable weights after every optimizer step of a plain run

    def record(opt, args, kwargs):
        steps.append([p.detach().clone() for group in opt.param_groups for p in group["params"]])

    hook = register_optimizer_step_post_hook(record)
    try:
        last, _ = _trained(False)
    finally:
        hook.remove()
    averaged, _ = _trained(False, extra=["train.ema=true"])
    assert len(steps) == 4 and averaged.keys() == last.keys()
    assert all(torch.equal(a, b) for a, b in zip(last.values(), steps[-1])), "a plain run keeps its last step"
    # the same steps (the average does not steer training), averaged by diffusers' EMAModel
    expected = EMAModel([torch.nn.Parameter(t) for t in steps[0]])
    for weights in steps:
        expected.step([torch.nn.Parameter(t) for t in weights])
    moved = 0
    for got, want, end in zip(averaged.values(), expected.shadow_params, last.values()):
        torch.testing.assert_close(got, want)
        moved += not torch.allclose(got, end)
    assert moved > len(last) // 2, "the saved weights are the average, not the last step's"


def test_lr_schedule_warms_up_then_stays_or_decays_to_zero():
    from loop.train import lr_factor

    const = load_config(None, ["train.steps=100"]).train
    cos = load_config(None, ["train.steps=100", "train.lr_schedule=cosine"]).train
    for tc in (const, cos):  # the same linear warm-up over steps/20
        assert [lr_factor(tc, s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(lr_factor(const, s) == 1.0 for s in range(5, 100))
    decay = [lr_factor(cos, s) for s in range(5, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:])), "cosine decays at every step"
    assert decay[-1] == pytest.approx(0.0, abs=1e-9) and 0.4 < lr_factor(cos, 52) < 0.6
    with pytest.raises(LoopError, match="train.lr_schedule"):
        load_config(None, ["train.lr_schedule=linear"])
