"""Screen: a unit's adapter on only in a window of the sampling steps. Does size (what the taste scores) come
from one part of the trajectory and the hue narrowing from another? Trains the fit bench's unit (supervised on
the base's UR pictures), then measures it with the LoRA scale per step."""
import json, sys
from peft.tuners.lora import LoraLayer
from loop.bench.converge import measure_unit
from loop.bench.fit import EVAL_PER_PROMPT, fitted_unit
from loop.tastes import ATTRIBUTE_KEYS
import loop.generate as G

taste, seed = sys.argv[1], int(sys.argv[2])
windows = [w for w in sys.argv[3].split(";")]  # "a-b@s" : steps a..b-1 at scale s, others 0; "all@s"
overrides = sys.argv[4:]
STEPS = 20
SCHED = {"fn": None}

def set_scale(pipe, s):
    for m in pipe.unet.modules():
        if isinstance(m, LoraLayer):
            for name in m.scaling:
                m.set_scale(name, s)

orig_render, orig_check = G.Renderer.render, G.Renderer._check_stop
def render(self, batch, parent_images=None):
    if SCHED["fn"] is not None:
        set_scale(self.pipe, SCHED["fn"](0))
    return orig_render(self, batch, parent_images)
def check(self, pipe, step, timestep, kwargs):
    if SCHED["fn"] is not None:
        set_scale(pipe, SCHED["fn"](step + 1))
    return orig_check(self, pipe, step, timestep, kwargs)
G.Renderer.render, G.Renderer._check_stop = render, check

def parse(w):
    span, s = w.split("@")
    s = float(s)
    if span == "all":
        return lambda i: s
    a, b = (int(x) for x in span.split("-"))
    return lambda i: s if a <= i < b else 0.0

with fitted_unit(taste, seed, 128, "ur", 1, overrides) as (ws, cfg, rc, pool, chosen):
    base = measure_unit(ws, cfg, 0, EVAL_PER_PROMPT, rc)
    for w in windows:
        SCHED["fn"] = parse(w)
        u = measure_unit(ws, cfg, 1, EVAL_PER_PROMPT, rc)
        kept = {k: round(u["spread"][k] / base["spread"][k], 3) for k in ATTRIBUTE_KEYS if base["spread"].get(k)}
        print("RESULT", json.dumps({"taste": taste, "seed": seed, "window": w, "ur": [base["ur_rate"], u["ur_rate"]],
              "gain": round(u["ur_rate"] / base["ur_rate"], 2), "kept": kept}), flush=True)
