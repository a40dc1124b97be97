"""Scheduler parity with diffusers over full sampling runs on random inputs (torch and numpy)."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)

from engine.diffusion.schedulers import SchedulerConfig, make_scheduler

REFS = {
    "ddpm": lambda kw: DDPMScheduler(**kw),
    "ddim": lambda kw: DDIMScheduler(**kw),
    "dpmpp_2m": lambda kw: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw),
    "euler": lambda kw: EulerDiscreteScheduler(**kw),
    "euler_a": lambda kw: EulerAncestralDiscreteScheduler(**kw),
    "dpmpp_2m_karras": lambda kw: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                              use_karras_sigmas=True, **kw),
}
CLIPS = {"ddpm", "ddim"}


def run_ours(name, cfg, steps, outputs, x, seed, numpy=False):
    from engine.diffusion.torch_noise import TorchRandn

    s = make_scheduler(name, cfg)
    s.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    np_gen = TorchRandn(seed)  # numpy's copy of torch's stream: what the onnxruntime backend samples with
    x = x * s.init_noise_sigma
    xs = []
    for i, t in enumerate(s.timesteps):
        m = outputs[i]
        if numpy:
            xin = s.scale_model_input(x.numpy(), t)
            noise = torch.randn(x.shape, generator=gen).numpy() if name == "ddpm" and t > 0 else None
            kw = {"noise": noise} if name == "ddpm" else {"generator": np_gen}
            x = torch.from_numpy(np.asarray(s.step((m + 0.1 * torch.from_numpy(xin)).numpy(), t, x.numpy(), **kw)
                                            .prev_sample, dtype=np.float32))
        else:
            xin = s.scale_model_input(x, t)
            x = s.step(m + 0.1 * xin, t, x, generator=gen).prev_sample
        xs.append(x.clone())
    return s, xs


def run_ref(name, kw, steps, outputs, x, seed):
    s = REFS[name](kw)
    s.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = x * s.init_noise_sigma
    xs = []
    for i, t in enumerate(s.timesteps):
        xin = s.scale_model_input(x, t)
        x = s.step(outputs[i] + 0.1 * xin, t, x, generator=gen).prev_sample
        xs.append(x.clone())
    return s, xs


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_a", "dpmpp_2m_karras"])
@pytest.mark.parametrize("schedule,pred", [("linear", "epsilon"), ("scaled_linear", "v_prediction"),
                                           ("squaredcos_cap_v2", "v_prediction"), ("squaredcos_cap_v2", "epsilon")])
def test_scheduler_matches_diffusers(name, schedule, pred):
    if name == "dpmpp_2m_karras" and schedule == "squaredcos_cap_v2":
        pytest.skip("diffusers' own Karras schedule fails on the cosine schedule (an index past its sigmas)")
    torch.manual_seed(0)
    steps = 25
    kw = dict(num_train_timesteps=1000, beta_schedule=schedule, prediction_type=pred,
              beta_start=0.00085 if schedule == "scaled_linear" else 0.0001,
              beta_end=0.012 if schedule == "scaled_linear" else 0.02)
    if name in CLIPS:
        kw["clip_sample"] = True
    cfg = SchedulerConfig.from_dict(kw)
    x = torch.randn(2, 3, 8, 8)
    outputs = [torch.randn(2, 3, 8, 8) for _ in range(steps)]
    ref, want = run_ref(name, kw, steps, outputs, x, seed=1)
    ours, got = run_ours(name, cfg, steps, outputs, x, seed=1)
    assert np.array_equal(np.asarray(ours.timesteps, dtype=np.float64), ref.timesteps.numpy().astype(np.float64))
    assert len(got) == len(want) == steps
    assert_close_run(got, want, x * ref.init_noise_sigma)
    # the same run on numpy arrays
    _, got_np = run_ours(name, cfg, steps, outputs, x, seed=1, numpy=True)
    assert_close_run(got_np, want, x * ref.init_noise_sigma)


def assert_close_run(got, want, x_init):
    """Every step within 1e-5, relative to the largest magnitude the run has reached so far (float32 runs
    started from sigma_max ~ 1e4, as Euler on the cosine schedule is, cannot agree better than that)."""
    scale = max(1.0, float(x_init.abs().max()))
    for i, (a, b) in enumerate(zip(got, want)):
        scale = max(scale, float(b.abs().max()))
        err = float((a - b).abs().max())
        assert err <= 1e-5 * scale, (i, err, scale)


def test_ddpm_full_1000_steps():
    torch.manual_seed(0)
    kw = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    x = torch.randn(1, 3, 4, 4)
    outputs = [torch.randn(1, 3, 4, 4) for _ in range(1000)]
    _, want = run_ref("ddpm", kw, 1000, outputs, x, seed=3)
    _, got = run_ours("ddpm", SchedulerConfig.from_dict(kw), 1000, outputs, x, seed=3)
    assert (got[-1] - want[-1]).abs().max().item() < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-5


def test_bad_scheduler_config():
    from engine.errors import ModelError
    with pytest.raises(ModelError):
        SchedulerConfig.from_dict({"beta_schedule": "sigmoid"})
    with pytest.raises(ModelError):
        SchedulerConfig.from_dict({"prediction_type": "sample"})


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a"])
@pytest.mark.parametrize("spacing", ["", "leading"])
def test_img2img_start_and_add_noise_match_diffusers(name, spacing):
    """img2img: the schedule starts part-way (diffusers' set_begin_index) from the image noised to that level."""
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
              **({"timestep_spacing": spacing} if spacing else {}))
    ref = REFS[name](kw)
    ours = make_scheduler(name, SchedulerConfig.from_dict(kw))
    steps, start = 10, 4
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    want = ref.add_noise(x0, noise, ref.timesteps[start:start + 1])
    got = ours.add_noise(x0, noise, start)
    assert (got - want).abs().max() < 1e-5
    ours.start_at(start)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = want.clone(), got.clone()
    rest = ref.timesteps[start:]
    for i, t in enumerate(rest):
        m = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))
        a = ref.step(m + 0.1 * ref.scale_model_input(a, t), t, a, generator=gen_a).prev_sample
        tt = ours.timesteps[start + i]
        b = ours.step(m + 0.1 * ours.scale_model_input(b, tt), tt, b, generator=gen_b).prev_sample
    assert (a - b).abs().max() < 1e-4
