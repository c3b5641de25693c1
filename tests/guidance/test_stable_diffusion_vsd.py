"""stable-diffusion-vsd-guidance (ProlificDreamer's VSD) on a tiny random Stable Diffusion.

References are computed from raw diffusers networks loaded afresh from the tiny folder (a UNet
without any adapter, the scheduler's own ``get_velocity``), not through the adapters under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.registry import find
from tiny_sd import LATENT_SIZE, tiny_sd, tiny_sd_v  # noqa: F401  (fixtures)

NAME = "stable-diffusion-vsd-guidance"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def guidance(path, **over):
    cfg = {"pretrained_model_name_or_path": str(path), "half_precision_weights": False, **over}
    return find(NAME, "guidance")(cfg).eval()


def prompt_utils(path, **over):
    cfg = {"prompt": "a red cube", "pretrained_model_name_or_path": str(path), "use_cache": False, **over}
    return find("stable-diffusion-prompt-processor", "prompt-processor")(cfg)()


def cameras(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CameraBatch.from_angles(torch.rand(B, generator=g) * 40, torch.rand(B, generator=g) * 360 - 180)


def make_input(prompt, B=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(B, size, size, 3, generator=g).requires_grad_(True)
    return GuidanceInput(cameras=cameras(B, seed), rgb=rgb, prompt=prompt)


def fixed(B=2):
    g = torch.Generator().manual_seed(7)
    return torch.tensor([300, 700][:B]), torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE, generator=g)


def raw_unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True).eval()


def latents(B, seed=3):
    return torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))


def train_some(g, prompt, n=3):
    """A few LoRA steps on random latents: afterwards LoRA's B and the camera MLP are non-zero."""
    conds = g.prior.condition(make_input(prompt))
    torch.manual_seed(0)
    g.train_lora(latents(2), conds.cond, n_steps=n)
    return conds


@pytest.fixture(scope="module")
def prompt(tiny_sd):
    return prompt_utils(tiny_sd)


# -- the LoRA model and what trains ------------------------------------------------------------------


def test_the_lora_model_shares_the_unet_and_adds_adapters_and_a_camera_embedding(tiny_sd):
    g = guidance(tiny_sd)
    base, twin = g.prior.unet, g.phi.unet
    # One copy of the weights: every frozen tensor of the twin is the prior's own tensor.
    base_ids = {id(p) for p in base.parameters()}
    frozen = [p for p in twin.parameters() if not p.requires_grad]
    assert len(frozen) == len(base_ids) and all(id(p) in base_ids for p in frozen)
    # Adapters on every attention projection of the twin, none on the prior's modules.
    n_targets = sum(1 for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS))
    assert n_targets > 0
    assert sum(1 for n, _ in twin.named_modules() if n.endswith(".lora_A")) == n_targets
    assert not any("lora" in n for n, _ in base.named_parameters())
    assert base.class_embedding is None and twin.class_embedding is g.phi.camera_embedding
    assert g.phi.camera_embedding.linear_1.in_features == 16
    assert g.phi.camera_embedding.linear_2.out_features == base.time_embedding.linear_2.out_features
    trainable = {n for n, p in g.phi.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.startswith("unet.class_embedding.")
                             for n in trainable)


def test_lora_and_camera_embedding_get_gradients_from_the_lora_loss_and_the_base_unet_none(tiny_sd, prompt):
    g = guidance(tiny_sd, lora_lr=1e-2)
    conds = g.prior.condition(make_input(prompt))
    t, noise = fixed()
    x0 = latents(2)

    def grads():
        g.lora_optimizer.zero_grad(set_to_none=True)
        g.lora_loss(x0, conds.cond, t, noise).backward()
        return {n: p.grad for n, p in g.phi.named_parameters() if p.requires_grad}

    fresh = grads()
    # The zero-initialised layers learn first (LoRA's B, the camera MLP's output layer) ...
    for n, gr in fresh.items():
        if ".lora_B." in n or n.startswith("unet.class_embedding.linear_2."):
            assert gr is not None and gr.abs().sum() > 0, n
    train_some(g, prompt)
    # ... then everything trainable does, and no frozen weight ever gets a gradient.
    for n, gr in grads().items():
        assert gr is not None and gr.abs().sum() > 0, n
    for p in [*g.prior.unet.parameters(), *g.prior.vae.parameters()]:
        assert not p.requires_grad and p.grad is None


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
def test_a_fresh_lora_model_is_the_prior_so_the_vsd_gradient_is_zero(fixture, request):
    path = request.getfixturevalue(fixture)
    prompt = prompt_utils(path)
    t, noise = fixed()
    # Scale 1 on both passes and the same (view-independent) text in both.
    g = guidance(path, guidance_scale=1.0, lora_guidance_scale=1.0, view_dependent_prompting=False, lora_lr=1e-2)
    inp = make_input(prompt)
    out = g(inp, t=t, noise=noise)
    assert out["grad_norm"] == 0 and out.losses["loss_vsd"] == 0
    rgb_grad, = torch.autograd.grad(out.losses["loss_vsd"], inp.rgb)
    assert rgb_grad.abs().max() == 0
    # Not a trivially zero gradient: once the LoRA has taken its step, it is not.
    assert g.lora_steps_taken == 1
    assert g(make_input(prompt), t=t, noise=noise)["grad_norm"] > 0
    # Nor with a fresh LoRA when the pretrained pass reads the view-dependent prompt ("..., side view").
    g_vd = guidance(path, guidance_scale=1.0, lora_guidance_scale=1.0)
    assert g_vd(make_input(prompt), t=t, noise=noise)["grad_norm"] > 0


def test_the_pretrained_pass_ignores_the_lora(tiny_sd, prompt):
    g = guidance(tiny_sd, lora_lr=1e-2)
    conds = train_some(g, prompt)
    assert all(p.abs().max() > 0 for n, p in g.phi.named_parameters() if ".lora_B." in n)
    t, noise = fixed()
    x_t = latents(2, seed=11)
    with torch.no_grad():
        got = g.prior.predict(x_t, t, conds.cond)
        want = raw_unet(tiny_sd)(x_t, t, encoder_hidden_states=conds.cond["text"]).sample
        lora = g.phi.predict(x_t, t, conds.cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (lora - want).abs().max() > 1e-4  # the LoRA model did move away from it


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
def test_the_lora_model_learns_the_priors_parameterisation_on_the_plain_prompt(fixture, request):
    from diffusers import DDPMScheduler

    path = request.getfixturevalue(fixture)
    g = guidance(path)
    conds = g.prior.condition(make_input(prompt_utils(path)))  # view-dependent prompting on
    assert not torch.equal(conds.cond["text"], conds.cond["text_lora"])
    t, noise = fixed()
    x0 = latents(2)
    with torch.no_grad():
        got = g.lora_loss(x0, conds.cond, t, noise)
        sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        x_t = sched.add_noise(x0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        unet = raw_unet(path)
        want = F.mse_loss(unet(x_t, t, encoder_hidden_states=conds.cond["text_lora"]).sample, target)
        view_dependent = F.mse_loss(unet(x_t, t, encoder_hidden_states=conds.cond["text"]).sample, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, view_dependent, rtol=1e-5, atol=1e-7)


def test_the_camera_is_dropped_for_a_tenth_of_the_renders_and_the_text_never(tiny_sd, prompt):
    g = guidance(tiny_sd)
    N = 2000
    conds = g.prior.condition(GuidanceInput(cameras=cameras(N), prompt=prompt))
    seen = {}
    g.phi.camera_embedding.register_forward_hook(lambda m, args, out: seen.__setitem__("camera", args[0]))
    g.phi.unet.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("text", kw["encoder_hidden_states"]),
                                         with_kwargs=True)
    torch.manual_seed(1234)
    g.train_lora(torch.zeros(N, 4, LATENT_SIZE, LATENT_SIZE), conds.cond, n_steps=1)
    dropped = (seen["camera"] == 0).all(dim=1)
    kept = ~dropped
    assert torch.equal(seen["camera"][kept], conds.cond["camera"][kept])  # the others see their own camera
    rate = dropped.float().mean().item()
    assert 0.08 < rate < 0.12, rate  # p_uncond = 0.1; binomial std over 2000 draws is 0.0067
    assert torch.equal(seen["text"], conds.cond["text_lora"])
    # The LoRA model's unconditional branch for CFG: the same text, all cameras zero.
    null = g.phi.drop_text(conds.cond, torch.ones(N, dtype=torch.bool))
    assert null["camera"].abs().max() == 0 and torch.equal(null["text_lora"], conds.cond["text_lora"])


def test_lora_guidance_scale_guides_by_camera(tiny_sd, prompt):
    """At lora_guidance_scale s the LoRA term is e_0 + s (e_cam - e_0), e_0 with zero camera."""
    g = guidance(tiny_sd, lora_lr=1e-2, lora_guidance_scale=3.0)
    train_some(g, prompt)
    inp = make_input(prompt)
    t, noise = fixed()
    _, _, _, a, x_t, conds = g.noised(inp, t, noise)
    with torch.no_grad():
        got = g._eps(g.phi, 3.0, x_t, t, conds.cond, g.phi.drop_text(conds.cond, torch.ones(2, dtype=torch.bool)))
        unet = g.phi.unet
        e_cam = unet(x_t, t, encoder_hidden_states=conds.cond["text_lora"], class_labels=conds.cond["camera"]).sample
        e_0 = unet(x_t, t, encoder_hidden_states=conds.cond["text_lora"], class_labels=torch.zeros(2, 16)).sample
    assert (e_cam - e_0).abs().max() > 1e-5
    torch.testing.assert_close(got, e_0 + 3.0 * (e_cam - e_0), rtol=1e-4, atol=1e-6)


# -- checkpoints ------------------------------------------------------------------------------------


def test_save_and_resume_continue_exactly(tiny_sd, prompt, tmp_path):
    t, noise = fixed()
    g = guidance(tiny_sd, lora_lr=1e-3)
    for seed in (1, 2):
        torch.manual_seed(seed)
        g(make_input(prompt, seed=seed))
    torch.save(g.state_dict(), tmp_path / "vsd.pt")
    state = torch.load(tmp_path / "vsd.pt", weights_only=True)
    tensors = {k for k, v in state.items() if torch.is_tensor(v)}
    assert tensors and all(".lora_" in k or k.startswith("phi.unet.class_embedding.") for k in tensors)
    assert "_extra_state" in state and state["_extra_state"]["lora_steps_taken"] == 2

    resumed = guidance(tiny_sd, lora_lr=1e-3)
    resumed.load_state_dict(state)
    fresh = guidance(tiny_sd, lora_lr=1e-3)
    outs = []
    for model in (g, resumed, fresh):
        torch.manual_seed(3)
        outs.append(model(make_input(prompt, seed=3), t=t, noise=noise))
    for k in ("loss_vsd", "lora_loss", "grad_norm"):
        assert torch.equal(outs[0][k], outs[1][k]), k
    assert not torch.equal(outs[0]["loss_vsd"], outs[2]["loss_vsd"])  # the saved LoRA mattered
    for (n, p), q in zip(g.phi.named_parameters(), resumed.phi.parameters()):
        assert torch.equal(p, q), n
    assert resumed.lora_steps_taken == 3


# -- devices and dtypes -----------------------------------------------------------------------------


def test_weights_stay_shared_through_moves(tiny_sd):
    g = guidance(tiny_sd).to(torch.float64)
    base = {id(p) for p in g.prior.unet.parameters()}
    assert all(id(p) in base for p in g.phi.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float64 for p in g.phi.parameters())
    # A conversion that replaces tensors instead of converting them in place: the twin follows.
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        g.to(torch.float32)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    base = {id(p) for p in g.prior.unet.parameters()}
    assert all(id(p) in base for p in g.phi.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in g.phi.parameters())


def test_the_trainable_tensors_are_float32_beside_half_precision_weights(tiny_sd):
    g = guidance(tiny_sd, torch_dtype="float16")
    assert g.prior.dtype == torch.float16
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.float16) for p in g.phi.parameters())
    assert all(p.dtype == torch.float32 for group in g.lora_optimizer.param_groups for p in group["params"])
    # Loaded in float32 and halved later (what a move to CUDA does to the prior): the same split.
    g = guidance(tiny_sd, half_precision_weights=True)
    assert g.prior.dtype == torch.float32
    g.prior.unet.to(torch.float16)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.float16) for p in g.phi.parameters())


# -- configuration ----------------------------------------------------------------------------------


def test_a_lora_target_that_names_no_layer_is_refused(tiny_sd):
    with pytest.raises(ConfigError, match="to_qq"):
        guidance(tiny_sd, lora_targets=["to_qq"])


def test_sequential_offload_is_refused(tiny_sd):
    with pytest.raises(ConfigError, match="enable_sequential_cpu_offload"):
        guidance(tiny_sd, enable_sequential_cpu_offload=True)
