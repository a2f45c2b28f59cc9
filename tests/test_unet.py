"""The GenSelfDiff-HIS U-Net (docs/method.md section 2): shapes, exact sizes, head, init, formats."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gsd_wsi.errors import ConfigError
from gsd_wsi.nn import UNET_PRESETS, UNet, UNetConfig, unet_config


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(unet_config("tiny")).eval()


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("out_channels", [3, 5])
def test_output_shape(name: str, out_channels: int) -> None:
    model = UNet(unet_config(name, out_channels=out_channels))
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64), torch.tensor([0, 999]))
    assert y.shape == (2, out_channels, 64, 64)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(("name", "use_top_skip", "count"), [
    ("tiny", False, 655_195),
    ("tiny", True, 658_027),
    ("small", False, 8_073_331),
    ("base", False, 31_267_083),      # docs/method.md: ~31.3 M (the reference network)
    ("base", True, 31_312_203),
])
def test_parameter_counts_are_pinned(name: str, use_top_skip: bool, count: int) -> None:
    with torch.device("meta"):
        model = UNet(unet_config(name, use_top_skip=use_top_skip, init="pytorch"))
    assert n_params(model) == count


def test_base_is_the_reference_size_and_channel_plan() -> None:
    cfg = UNET_PRESETS["base"]
    assert cfg.channels == (42, 64, 128, 256, 512)
    with torch.device("meta"):
        model = UNet(cfg)
    assert abs(n_params(model) - 31.3e6) / 31.3e6 < 0.01
    # top skip: the head ResBlock's first conv takes 2*dim, plus a 1x1 residual conv
    d = cfg.dim
    with torch.device("meta"):
        fixed = UNet(unet_config("base", use_top_skip=True))
    assert n_params(fixed) - n_params(model) == 9 * d * d + (2 * d * d + d)


def test_shape_flow_of_base() -> None:
    """64 px in: bottleneck at 8x8x512 (32x32x512 for 256 px), three decoder stages back up."""
    model = UNet(UNET_PRESETS["base"]).eval()
    seen: dict[str, tuple[int, ...]] = {}
    model.mid_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", tuple(o.shape)))
    for k, up in enumerate(model.ups):
        up[-1].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"up{k}", tuple(o.shape)))
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64), torch.tensor([10]))
    assert seen == {"mid": (1, 512, 8, 8), "up0": (1, 256, 16, 16), "up1": (1, 128, 32, 32),
                    "up2": (1, 64, 64, 64)}
    assert y.shape == (1, 3, 64, 64)


def test_tiny_bottleneck_at_256px(tiny: UNet) -> None:
    seen: list[tuple[int, ...]] = []
    handle = tiny.mid_attn.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        tiny(torch.randn(1, 3, 256, 256), torch.tensor([3]))
    handle.remove()
    assert seen == [(1, 64, 32, 32)]


def test_head_prefixes_select_exactly_the_head() -> None:
    cfg = unet_config("tiny", out_channels=5)
    model = UNet(cfg)
    head_ids = {id(p) for p in model.final_conv.parameters()}
    selected = [p for n, p in model.named_parameters() if n.startswith(UNet.HEAD_PREFIXES)]
    assert {id(p) for p in selected} == head_ids
    names = [n for n, _ in model.named_parameters() if n.startswith("final_conv.")]
    assert model.head_parameter_names() == names
    # ResBlock(d, d) without time input (two 3x3 convs + two GroupNorms) and a 1x1 conv to 5 classes
    d = cfg.dim
    assert sum(p.numel() for p in selected) == 2 * (9 * d * d + d) + 2 * (2 * d) + (d * 5 + 5)
    assert model.final_conv[0].mlp is None


def test_pretrained_body_loads_into_a_segmenter_except_the_head() -> None:
    """Fine-tuning (docs/method.md section 3): every weight but the head's carries over."""
    pretrained = UNet(unet_config("tiny", out_channels=3))
    segmenter = UNet(unet_config("tiny", out_channels=4))
    body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith(UNet.HEAD_PREFIXES)}
    result = segmenter.load_state_dict(body, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {k for k in segmenter.state_dict() if k.startswith(UNet.HEAD_PREFIXES)}


def test_config_round_trips_through_json() -> None:
    cfg = unet_config("tiny", out_channels=4, use_top_skip=True, init="pytorch", init_dim=8)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["dim_mults"] == [1, 2, 2, 4]
    back = UNetConfig.from_dict(data)
    assert back == cfg and isinstance(back.dim_mults, tuple)


@pytest.mark.parametrize("bad", [
    {"dim": 0},
    {"dim": 15},
    {"dim_mults": ()},
    {"dim_mults": (1, 0)},
    {"dim_mults": 4},
    {"resnet_groups": 3},                   # 3 does not divide 16
    {"init": "xavier"},
    {"init_dim": -1},
    {"out_channels": 0},
    {"use_top_skip": "yes"},
])
def test_bad_configs_raise(bad: dict) -> None:
    with pytest.raises(ConfigError):
        unet_config("tiny", **bad)


def test_unknown_names_raise() -> None:
    with pytest.raises(ConfigError, match="base"):
        unet_config("huge")
    with pytest.raises(ConfigError, match="dims"):
        unet_config("tiny", dims=3)
    with pytest.raises(ConfigError, match="bogus"):
        UNetConfig.from_dict({"bogus": 1})


def test_use_top_skip_is_used_and_trains() -> None:
    torch.manual_seed(1)
    model = UNet(unet_config("tiny", use_top_skip=True, init="pytorch"))
    assert model.final_conv[0].block1.proj.in_channels == 2 * model.config.dim
    x = torch.randn(2, 3, 32, 32)
    y = model(x, torch.tensor([1, 2]))
    assert y.shape == (2, 3, 32, 32)
    # the head's input is [decoder output, level-0 skip]
    seen: dict[str, torch.Tensor] = {}
    h1 = model.downs[0][2].register_forward_hook(lambda m, i, o: seen.__setitem__("skip", o))
    h2 = model.final_conv.register_forward_pre_hook(lambda m, i: seen.__setitem__("head_in", i[0]))
    with torch.no_grad():
        model(x, torch.tensor([1, 2]))
    h1.remove()
    h2.remove()
    d = model.config.dim
    assert seen["head_in"].shape == (2, 2 * d, 32, 32)
    assert torch.equal(seen["head_in"][:, d:], seen["skip"])


@pytest.mark.parametrize("use_top_skip", [False, True])
def test_every_parameter_gets_a_gradient(use_top_skip: bool) -> None:
    model = UNet(unet_config("tiny", use_top_skip=use_top_skip))
    model(torch.randn(2, 3, 32, 32), torch.tensor([5, 500])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_reference_init_follows_method_md() -> None:
    torch.manual_seed(0)
    ref = UNet(unet_config("tiny"))
    default = UNet(unet_config("tiny", init="pytorch"))
    norm_w = torch.cat([m.weight for m in ref.modules() if isinstance(m, nn.GroupNorm)])
    assert abs(norm_w.std().item() - 0.01) < 0.002 and abs(norm_w.mean().item()) < 0.002
    convs = [m for m in ref.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    conv_w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(conv_w.std().item() - 0.01) < 0.001
    norms = [m for m in default.modules() if isinstance(m, nn.GroupNorm)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    # biases and the time MLP keep PyTorch's defaults, as in the reference
    assert ref.init_conv.bias.abs().max() > 0.01
    assert ref.time_mlp[1].weight.std() > 0.05


def test_scalar_and_float_timesteps(tiny: UNet) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = tiny(x, torch.tensor([0, 0]))
        b = tiny(x, torch.tensor(0))
        c = tiny(x, torch.zeros(2))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_channels_last_gives_the_same_output(tiny: UNet) -> None:
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([7, 300])
    with torch.no_grad():
        ref = tiny(x, t)
        x_cl = x.to(memory_format=torch.channels_last)
        out_input_cl = tiny(x_cl, t)
        model_cl = UNet(tiny.config).eval()
        model_cl.load_state_dict(tiny.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        out_both_cl = model_cl(x_cl, t)
    torch.testing.assert_close(out_input_cl, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_both_cl, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_forward_runs(tiny: UNet) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = tiny(x, torch.tensor([1, 900]))
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y.float()).all()
    with torch.no_grad():
        ref = tiny(x, torch.tensor([1, 900]))
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_bad_input_size_names_the_multiple(tiny: UNet) -> None:
    with pytest.raises(ConfigError, match="multiples of 8"):
        tiny(torch.randn(1, 3, 36, 32), torch.tensor([0]))
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)"):
        tiny(torch.randn(1, 4, 32, 32), torch.tensor([0]))
    with pytest.raises(ConfigError, match="timesteps"):
        tiny(torch.randn(2, 3, 32, 32), torch.tensor([0, 1, 2]))
