"""deepfloyd-guidance on a tiny random IF folder: SDS on epsilon only, the working size, precision, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.registry import find
from lift3d.utils.hub import MissingWeightsError
from tiny_if import SAMPLE_SIZE, tiny_if, tiny_if_prompt_utils  # noqa: F401  (tiny_if: the fixture)

IF_ID = "DeepFloyd/IF-I-XL-v1.0"


def guidance(folder, **over):
    cfg = {"pretrained_model_name_or_path": str(folder), "guidance_scale": 7.0, **over}
    return find("deepfloyd-guidance", "guidance")(cfg).eval()


def if_input(rgb, folder, prompt="a red cube", **prompt_cfg):
    B = rgb.shape[0]
    cams = CameraBatch.from_angles(torch.linspace(0, 30, B), torch.linspace(-20, 160, B))
    return GuidanceInput(cameras=cams, rgb=rgb, prompt=tiny_if_prompt_utils(prompt, folder, **prompt_cfg))


def fixed(B, size=SAMPLE_SIZE, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.linspace(300, 700, B).long(), torch.randn(B, 3, size, size, generator=g)


def test_sds_gradient_is_weighted_guided_epsilon_from_the_first_three_channels(tiny_if):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    B, s = 2, 7.0
    g = guidance(tiny_if, guidance_scale=s)
    rgb = torch.rand(B, SAMPLE_SIZE, SAMPLE_SIZE, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    inp = if_input(rgb, tiny_if)
    t, noise = fixed(B)
    g(inp, t=t, noise=noise).losses["loss_sds"].backward()

    # The same gradient from the folder's own UNet and schedule, read here without lift3d.
    unet = UNet2DConditionModel.from_pretrained(tiny_if, subfolder="unet", local_files_only=True).eval()
    a = DDPMScheduler.from_pretrained(tiny_if, subfolder="scheduler", local_files_only=True).alphas_cumprod[t]
    a = a.float().view(B, 1, 1, 1)
    x_t = a.sqrt() * (rgb.detach().permute(0, 3, 1, 2) * 2 - 1) + (1 - a).sqrt() * noise
    cams = inp.cameras
    cond, uncond = inp.prompt.get_text_embeddings(cams.elevation, cams.azimuth, cams.distance)
    with torch.no_grad():
        out_c = unet(x_t, t, encoder_hidden_states=cond).sample
        out_u = unet(x_t, t, encoder_hidden_states=uncond).sample
    assert out_c.shape == (B, 6, SAMPLE_SIZE, SAMPLE_SIZE)
    assert not torch.allclose(out_c[:, 3:], out_c[:, :3], atol=1e-2)  # taking the wrong half would show
    assert not torch.allclose(out_c[:, :3], out_u[:, :3], atol=1e-4)  # the text matters: CFG is tested
    eps = out_u[:, :3] + s * (out_c[:, :3] - out_u[:, :3])
    grad_x = (1 - a) * (eps - noise)
    # loss = 0.5 ||x - sg(x - grad)||^2 / B and x = 2 rgb - 1: d loss / d rgb = 2 grad / B
    expected = (2 * grad_x / B).permute(0, 2, 3, 1)
    # round-off: lift3d runs both branches in one batch, this runs them one by one (up to 6e-6 seen,
    # on gradients up to 5)
    torch.testing.assert_close(rgb.grad, expected, rtol=1e-4, atol=5e-5)


def test_the_working_size_is_the_unets_sample_size(tiny_if, tmp_path):
    g = guidance(tiny_if)
    assert g.prior.resolution == (SAMPLE_SIZE, SAMPLE_SIZE)
    x = g.prior.encode(torch.full((2, 32, 24, 3), 0.25))
    assert x.shape == (2, 3, SAMPLE_SIZE, SAMPLE_SIZE)
    torch.testing.assert_close(x, torch.full_like(x, -0.5))  # [0, 1] -> [-1, 1]
    out = g(if_input(torch.rand(2, 32, 32, 3), tiny_if))
    assert out["denoised"].shape == (2, SAMPLE_SIZE, SAMPLE_SIZE, 3)

    bigger = tmp_path / "tiny-if-16"
    shutil.copytree(tiny_if, bigger)
    conf = json.loads((bigger / "unet" / "config.json").read_text())
    (bigger / "unet" / "config.json").write_text(json.dumps({**conf, "sample_size": 16}))
    g16 = guidance(bigger)
    assert g16.prior.resolution == (16, 16)
    out = g16(if_input(torch.rand(2, 32, 32, 3), bigger), *fixed(2, 16))
    assert out["denoised"].shape == (2, 16, 16, 3)


def test_the_guidance_loads_the_unet_and_never_the_text_encoder(tiny_if, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the guidance loaded the text encoder")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    g = guidance(tiny_if)
    assert not any("T5" in type(m).__name__ for m in g.prior.modules())
    assert g.prior.prediction_type == "epsilon" and g.prior.num_train_timesteps == 1000
    # the frozen UNet stays out of the module tree, the optimizer and checkpoints
    assert all(not p.requires_grad for p in g.prior.parameters())
    assert list(g.parameters()) == [] and not [k for k, v in g.state_dict().items() if torch.is_tensor(v)]


def test_precision_follows_the_device_and_the_switch(tiny_if):
    default = guidance(tiny_if)
    expected = torch.float16 if torch.cuda.is_available() else torch.float32
    assert default.prior.unet.dtype == expected
    half = guidance(tiny_if, half_precision_weights=True)
    assert half.prior.unet.dtype == torch.float16
    t, noise = fixed(2)
    out = half(if_input(torch.rand(2, SAMPLE_SIZE, SAMPLE_SIZE, 3), tiny_if), t=t, noise=noise)
    loss = out.losses["loss_sds"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_attention_slicing_and_channels_last_do_not_change_the_result(tiny_if):
    rgb = torch.rand(2, SAMPLE_SIZE, SAMPLE_SIZE, 3, generator=torch.Generator().manual_seed(1))
    t, noise = fixed(2)
    losses = []
    for over in ({}, {"enable_attention_slicing": True, "enable_channels_last_format": False}):
        g = guidance(tiny_if, half_precision_weights=False, **over)
        losses.append(g(if_input(rgb, tiny_if), t=t, noise=noise).losses["loss_sds"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)


def test_perp_neg_scores_the_negative_views_in_the_same_call(tiny_if):
    g = guidance(tiny_if)
    batches = []
    g.prior.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    rgb = torch.rand(2, SAMPLE_SIZE, SAMPLE_SIZE, 3, generator=torch.Generator().manual_seed(2))
    t, noise = fixed(2)
    plain = g(if_input(rgb, tiny_if), t=t, noise=noise).losses["loss_sds"]
    perp = g(if_input(rgb, tiny_if, use_perp_neg=True), t=t, noise=noise).losses["loss_sds"]
    assert batches == [4, 8]  # cond + uncond, then cond + uncond + 2 negatives, for 2 views
    assert torch.isfinite(perp) and not torch.allclose(plain, perp)


def test_dropping_the_text_swaps_in_the_empty_prompt_not_the_negative(tiny_if):
    g = guidance(tiny_if)
    inp = if_input(torch.rand(2, SAMPLE_SIZE, SAMPLE_SIZE, 3), tiny_if, negative_prompt="blue ball")
    cond = g.prior.condition(inp).cond
    dropped = g.prior.drop_text(cond, torch.tensor([True, False]))
    empty = inp.prompt.extras["empty_text_embedding"][0]
    torch.testing.assert_close(dropped["text"][0], empty)
    torch.testing.assert_close(dropped["text"][1], cond["text"][1])
    assert not torch.allclose(empty, inp.prompt.uncond_text_embeddings[0])


def test_embeddings_of_another_encoder_are_refused_with_the_processor_to_use(tiny_if):
    from lift3d.prompts.toyworld import ToyWorldPromptProcessor

    g = guidance(tiny_if)
    cams = CameraBatch.from_angles([0.0, 10.0], [0.0, 90.0])
    tokens = ToyWorldPromptProcessor({"prompt": "a red cube"})()
    inp = GuidanceInput(cameras=cams, rgb=torch.rand(2, 8, 8, 3), prompt=tokens)
    with pytest.raises(ValueError, match="deepfloyd-prompt-processor"):
        g(inp)
    with pytest.raises(ValueError, match="deepfloyd-prompt-processor"):
        g(GuidanceInput(cameras=cams, rgb=torch.rand(2, 8, 8, 3)))


def test_config_errors(tiny_if):
    with pytest.raises(ConfigError, match="no latent space"):
        guidance(tiny_if, image="latents")
    with pytest.raises(ConfigError, match="no_such_option"):
        guidance(tiny_if, no_such_option=1)
    assert "prompt_embeddings" in find("deepfloyd-guidance").requires(find("deepfloyd-guidance").Config())


def test_missing_weights_fail_fast_naming_key_id_command_and_licence(tiny_if, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    cls = find("deepfloyd-guidance", "guidance")
    with pytest.raises(MissingWeightsError) as ex:
        cls({}, cfg_key="system.guidance")
    msg = str(ex.value)
    for part in ("system.guidance.pretrained_model_name_or_path", f"'{IF_ID}'", f"hf download {IF_ID}",
                 "gated", f"https://huggingface.co/{IF_ID}"):
        assert part in msg, part
    assert "\n" not in msg  # launch prints it as one line
    assert cls.missing_weights(cls.Config()) is not None
    assert cls.missing_weights(cls.Config(pretrained_model_name_or_path=str(tiny_if))) is None
