"""The seventh study's training options (docs/convergence.md): train.invariance (dpo's implicit reward held equal
across pictures the taste model rates alike), train.guidance (the guided prediction's error) and
train.lora_dropout."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from loop.config import ModelConfig, load_config
from loop.errors import LoopError
from loop.models import load_base
from loop.objectives import invariance_loss, per_item_error
from loop.train import TrainData, add_lora, fit
from loop.train.pool import TIER_PARTNERS, twin_rows


def test_the_term_is_zero_where_twins_gain_alike_and_pulls_their_gains_together():
    ref, ref_twin = torch.tensor([1.0, 0.5]), torch.tensor([0.7, 0.9])
    # each twin denoised 0.1 better than the reference denoises it: the same reward, whatever the errors
    assert invariance_loss(ref - 0.1, ref, ref_twin - 0.1, ref_twin, beta=100).item() == pytest.approx(0, abs=1e-9)
    err = (ref - torch.tensor([0.1, 0.0])).requires_grad_()
    loss = invariance_loss(err, ref, ref_twin.clone(), ref_twin, beta=100)
    assert loss.item() == pytest.approx((0.5 * 100 * 0.1) ** 2 / 2, rel=1e-4)  # beta/2 * the gap, squared, averaged
    loss.backward()
    # the picture that gained alone: a descent step raises its error, back to its twin's gain; the other is held
    assert err.grad[0] < 0 and err.grad[1] == 0


def test_hue_twins_are_held_only_where_the_taste_model_rates_both_alike(ws, red_blue_pool):
    # the taste model likes red: a recoloured red square is another tier
    from loop.train.pool import taste_pool_items

    cfg = load_config(ws.root, ["train.taste_pool=2", "train.invariance=hue"])
    said = []
    items = taste_pool_items(ws, None, None, cfg, [{"caption": "a square", "tier": "UR"}], log=said.append)
    # the two pictures as drawn, then three turns of each: the copies pair with nothing by themselves
    assert [it.get("hue") for it in items] == [None, None, 90, 90, 180, 180, 270, 270]
    assert [it["tier"] for it in items[:2]] == ["UR", "N"] and all(it["tier"] is None for it in items[2:])
    assert not any(it["winner"] for it in items[2:])
    # turned, the red square is no longer red (another tier: never held); the blue one stays not-red at some turn
    same = [it["twin_same"] for it in items[2:]]
    assert same[0::2] == [False, False, False] and any(same[1::2]), same
    rows = twin_rows(items, "hue", seed=0)
    assert rows and all(a == 1 and items[b]["twin"] == items[1]["path"] for a, b in rows)
    assert any(line.startswith(f"invariance: {len(rows)} of 6 recoloured twin(s)") for line in said), said


def test_tier_twins_are_pool_pictures_of_one_prompt_and_one_predicted_tier():
    items = [{"path": f"r{i}", "caption": "a", "tier": "UR", "prior": False} for i in range(2)]  # rated: never
    for i in range(12):
        items.append({"path": f"p{i}", "caption": "ab"[i % 2], "tier": ["UR", "N"][i // 6], "pool": True})
    items.append({"path": "c0", "caption": "a", "tier": "UR", "pool": True, "hue": 90})  # a recolouring: never
    rows = twin_rows(items, "tier", seed=0)
    assert rows and all(i != j for i, j in rows)
    for i, j in rows:
        assert items[i].get("pool") and "hue" not in items[i] and "hue" not in items[j]
        assert (items[i]["caption"], items[i]["tier"]) == (items[j]["caption"], items[j]["tier"])
    # three pictures in each group: every picture meets both others (fewer than TIER_PARTNERS to choose from)
    assert len(rows) == 12 * min(2, TIER_PARTNERS)
    assert twin_rows(items, "tier", seed=0) == rows  # seeded: a unit trains alike when resumed
    assert twin_rows(items, "tier", seed=1) != rows or TIER_PARTNERS >= 2


def test_a_wrong_invariance_setting_is_one_clear_message():
    assert load_config(None, []).train.invariance == "none"
    with pytest.raises(LoopError, match="train.invariance.*use one of none, hue, tier"):
        load_config(None, ["train.invariance=colour"])
    with pytest.raises(LoopError, match="train.invariance.*set train.taste_pool above 0"):
        load_config(None, ["train.invariance=hue", "train.taste_pool=0"])
    with pytest.raises(LoopError, match="train.invariance_weight.*must be > 0"):
        load_config(None, ["train.invariance_weight=0"])


def _twin_data(pipe, n=4):
    """Winners in one colour (channel 0 raised) and losers of the same kind in another (channel 1 raised), so that
    the pairs teach the colour, as a round's few winners of "a square" may all happen to be red; and each
    winner's twin: the same latent in the losers' colour. dpo pairs winners with losers only; the twins
    enter through train.invariance."""
    g = torch.Generator().manual_seed(0)
    kind = torch.randn(n, 4, 16, 16, generator=g) * 0.5 + 1.0
    red, blue = kind.clone(), kind.clone()
    red[:, 0] += 1.5
    blue[:, 1] += 1.5
    losers = torch.randn(n, 4, 16, 16, generator=g) * 0.5 + 1.0  # the same kind: only the colour tells them apart
    losers[:, 1] += 1.5
    ids = pipe.tokenizer(["a circle"] * 3 * n + [""], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        embeds = pipe.text_encoder(ids.input_ids)[0]
    data = TrainData(latents=torch.cat([red, losers, blue]), embeds=embeds[:-1])
    data.empty = data.empty_embed = embeds[-1]
    data.pairs = torch.tensor([[i, n + i] for i in range(n)])
    data.twins = torch.tensor([[i, 2 * n + i] for i in range(n)])
    return data


@torch.no_grad()
def _reward_gap(unet, data, noise_sched, draws=8) -> float:
    """How much more the unit prefers each winner to its twin, averaged over pairs: a picture's reward is how much
    better the unit denoises it than the reference (the adapter off) does, in expectation over `draws` noises and
    timesteps, each shared by a winner and its twin."""
    g = torch.Generator().manual_seed(123)
    a, b = data.twins[:, 0].repeat(draws), data.twins[:, 1].repeat(draws)
    noise = torch.randn((len(a), *data.latents.shape[1:]), generator=g)
    t = torch.randint(100, 900, (len(a),), generator=g)
    gains = []
    for rows in (a, b):
        xt = noise_sched.add_noise(data.latents[rows], noise, t)
        emb = data.embeds[rows]
        err = per_item_error(unet(xt, t, encoder_hidden_states=emb).sample, noise)
        unet.disable_adapters()
        ref = per_item_error(unet(xt, t, encoder_hidden_states=emb).sample, noise)
        unet.enable_adapters()
        gains.append(ref - err)
    return (gains[0] - gains[1]).view(draws, -1).mean(0).mean().item()


def test_the_term_keeps_a_unit_from_preferring_its_winners_colour():
    pipe = load_base(ModelConfig())
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gaps = {}
    for how in ("none", "hue"):
        tc = load_config(None, ["train.objective=dpo", "train.steps=40", "train.lr=5e-3", "train.batch_size=8",
                                "train.dpo_beta=500", f"train.invariance={how}",
                                "train.invariance_weight=4"]).train  # fmt: skip
        torch.manual_seed(0)  # the adapter's random init: both units start alike
        unet = add_lora(load_base(ModelConfig()).unet, tc)
        unet, _, _ = fit(unet, _twin_data(pipe), sched, tc, Accelerator(cpu=True), log=lambda m: None)
        unet.eval()
        gaps[how] = _reward_gap(unet, _twin_data(pipe), sched)
    # without the term the unit learns "channel 0 wins" with what set the winners apart; with it, far less of that
    assert gaps["none"] > 0 and abs(gaps["hue"]) < 0.5 * gaps["none"], gaps


def test_the_guided_error_is_the_error_of_the_prediction_that_generation_uses():
    from loop.train.fit import base_prediction, guided_targets

    pipe = load_base(ModelConfig())
    tc = load_config(None, ["train.guidance=4"]).train
    unet = add_lora(pipe.unet, tc)
    data = _twin_data(pipe)
    g = torch.Generator().manual_seed(5)
    xt, t = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([100, 500, 900])
    target, c = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    dropped = torch.tensor([False, True, False])
    with torch.no_grad():
        tg, w = guided_targets(unet, Accelerator(cpu=True), data, 4.0, xt, t, target, xt.device, None, dropped)
        u = base_prediction(unet, Accelerator(cpu=True), xt, t, data.empty_embed, xt.device, 3)
    guided = u + 4.0 * (c - u)  # what a sampler at guidance 4 denoises with
    for i in (0, 2):
        assert (w[i] * per_item_error(c[i : i + 1], tg[i : i + 1])).item() == pytest.approx(
            per_item_error(guided[i : i + 1], target[i : i + 1]).item(), rel=1e-4
        )
    # a row whose caption was dropped is the unconditional branch itself: its own target, weight 1
    assert torch.equal(tg[1], target[1]) and w[1].item() == 1.0
    with pytest.raises(LoopError, match="train.guidance.*must be >= 0"):
        load_config(None, ["train.guidance=-1"])


def test_lora_dropout_reaches_the_adapter_and_a_wrong_one_is_one_clear_message():
    pipe = load_base(ModelConfig())
    unet = add_lora(pipe.unet, load_config(None, ["train.lora_dropout=0.2"]).train)
    assert unet.peft_config["default"].lora_dropout == 0.2
    with pytest.raises(LoopError, match="train.lora_dropout.*must be >= 0 and < 1"):
        load_config(None, ["train.lora_dropout=1"])
