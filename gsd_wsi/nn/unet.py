"""The GenSelfDiff-HIS U-Net: one network for diffusion pretraining and for segmentation.

docs/method.md section 2. The network follows the "annotated diffusion" U-Net the reference uses:
a 7x7 input conv, four encoder levels of (ResBlock, ResBlock, linear attention, 4x4 stride-2
conv), a bottleneck with full softmax self-attention, three decoder stages of (concat skip,
ResBlock, ResBlock, linear attention, 4x4 stride-2 transposed conv), and a head of one ResBlock
without time input plus a 1x1 conv. Pretraining uses ``out_channels = 3`` (predicted noise),
segmentation ``out_channels = num_classes`` with the same body (docs/method.md section 3).

The state-dict keys mirror the reference network's (``init_conv``, ``time_mlp``, ``downs``,
``mid_block1``, ``mid_attn``, ``mid_block2``, ``ups``, ``final_conv``), so a reference
checkpoint maps onto ``base`` after stripping its wrapper prefixes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsd_wsi.config import dataclass_from_dict
from gsd_wsi.errors import ConfigError

log = logging.getLogger(__name__)

InitScheme = Literal["reference", "pytorch"]
INIT_SCHEMES: tuple[str, ...] = get_args(InitScheme)


@dataclass(frozen=True)
class UNetConfig:
    """Constructor arguments of :class:`UNet`; saved in every checkpoint (docs/method.md section 2)."""

    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    in_channels: int = 3
    out_channels: int = 3
    init_dim: int | None = None          # None: dim // 3 * 2 (42 for dim 64)
    attn_heads: int = 4
    attn_dim_head: int = 32
    resnet_groups: int = 8
    use_top_skip: bool = False           # faithful False: the first level's skip is never used
    init: InitScheme = "reference"       # reference: conv/GroupNorm weights ~ N(0, 0.01)

    def __post_init__(self) -> None:
        if isinstance(self.dim_mults, (list, tuple)):
            object.__setattr__(self, "dim_mults", tuple(self.dim_mults))   # JSON gives lists
        else:
            raise ConfigError(f"UNet dim_mults must be a tuple of positive integers (got {self.dim_mults!r})")
        for name in ("dim", "in_channels", "out_channels", "attn_heads", "attn_dim_head", "resnet_groups"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"UNet {name} must be a positive integer (got {value!r})")
        if self.dim < 4 or self.dim % 2:
            raise ConfigError(f"UNet dim must be even and >= 4 (the time embedding's width) (got {self.dim})")
        if not self.dim_mults or not all(_is_int(m) and m >= 1 for m in self.dim_mults):
            raise ConfigError(f"UNet dim_mults must be one or more positive integers (got {self.dim_mults!r})")
        if self.init_dim is not None and (not _is_int(self.init_dim) or self.init_dim < 1):
            raise ConfigError(f"UNet init_dim must be a positive integer or None (got {self.init_dim!r})")
        # GroupNorm(resnet_groups) sees every ResBlock output width; init_dim (42 for base) is only
        # ever a conv input, so it need not be a multiple
        bad = [c for c in self.channels[1:] if c % self.resnet_groups]
        if bad:
            raise ConfigError(
                f"UNet resnet_groups={self.resnet_groups} must divide every ResBlock width "
                f"{self.channels[1:]} (not {bad}); change dim, dim_mults or resnet_groups"
            )
        if not isinstance(self.use_top_skip, bool):
            raise ConfigError(f"UNet use_top_skip must be true or false (got {self.use_top_skip!r})")
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"UNet init must be one of {', '.join(INIT_SCHEMES)} (got {self.init!r})")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channel plan ``[init_dim, dim * m for m in dim_mults]`` (42, 64, 128, 256, 512 for base)."""
        init_dim = self.dim // 3 * 2 if self.init_dim is None else self.init_dim
        return (init_dim, *(self.dim * m for m in self.dim_mults))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.dim_mults) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready constructor arguments (``dim_mults`` as a list)."""
        data = dataclasses.asdict(self)
        data["dim_mults"] = list(self.dim_mults)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        return dataclass_from_dict(cls, data, "UNet config")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


UNET_PRESETS: dict[str, UNetConfig] = {
    # the reference network of docs/method.md section 2: 31,267,083 parameters
    "base": UNetConfig(),
    # half width, same depth: 8,073,331 parameters, ~0.7 img/s training at 256 px on one core
    "small": UNetConfig(dim=32),
    # CPU tests and demos: 655,195 parameters, ~3.5 img/s training at 256 px on one core. Four
    # levels as in base, so a 256 px input meets the bottleneck's full attention at 32x32 (with
    # three levels it would attend over 64x64 = 4096 positions and train 3x slower).
    "tiny": UNetConfig(dim=16, dim_mults=(1, 2, 2, 4), attn_heads=2, attn_dim_head=16),
}


def unet_config(name: str, **overrides: Any) -> UNetConfig:
    """A preset by name (``base``, ``small``, ``tiny``), with fields replaced by ``overrides``."""
    if name not in UNET_PRESETS:
        raise ConfigError(f"unknown U-Net preset {name!r}; choose one of {', '.join(UNET_PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(UNetConfig)})
    if unknown:
        raise ConfigError(f"unknown UNet config keys {unknown}")
    return dataclasses.replace(UNET_PRESETS[name], **overrides)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos embedding of the (possibly fractional) timestep."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        steps = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(steps * (-math.log(10000.0) / (half - 1)))
        args = t.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class Block(nn.Module):
    """conv3x3 -> GroupNorm -> SiLU."""

    def __init__(self, dim_in: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(x)))


class ResnetBlock(nn.Module):
    """Two conv blocks, the time embedding added between them, and a (1x1-conv) residual."""

    def __init__(self, dim_in: int, dim_out: int, time_emb_dim: int | None, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out)) if time_emb_dim else None
        self.block1 = Block(dim_in, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, t_emb: Tensor | None = None) -> Tensor:
        h = self.block1(x)
        if self.mlp is not None and t_emb is not None:
            h = h + self.mlp(t_emb)[:, :, None, None]
        return self.block2(h) + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention: softmax of q over channels and of k over positions, context = k v^T."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Full softmax self-attention over positions (bottleneck only), scale dim_head ** -0.5."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (z.reshape(b, self.heads, -1, h * w).transpose(-1, -2) for z in qkv)
        out = F.scaled_dot_product_attention(q, k, v)          # (b, heads, n, dim_head)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class PreNorm(nn.Module):
    """GroupNorm(1, dim) (a LayerNorm over C, H, W) before ``fn``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class UNet(nn.Module):
    """The GenSelfDiff-HIS U-Net (docs/method.md section 2): ``forward(x, t) -> (B, out_channels, H, W)``.

    The encoder keeps one skip per level but the decoder has one stage fewer, so the reference
    never uses the first level's full-resolution skip (the faithful default). With
    ``use_top_skip=True`` that skip is concatenated to the decoder output before the head, whose
    ResBlock then takes ``2 * dim`` channels: every skip is used. (The head's width is the first
    level's, ``dim * dim_mults[0]``, which is ``dim`` in every preset as in the reference.)

    ``HEAD_PREFIXES`` name the state-dict keys of the head (``final_conv``: the time-free ResBlock
    and the 1x1 conv), the only weights fine-tuning does not take from pretraining.

    ``init="reference"`` re-draws, after PyTorch's default construction, the weight of every
    Conv2d, ConvTranspose2d and GroupNorm from N(0, 0.01), as the reference code does; biases and
    the time MLP's Linear layers keep PyTorch's defaults (the reference touches neither).
    ``init="pytorch"`` keeps PyTorch's defaults throughout (GroupNorm weight 1).
    """

    HEAD_PREFIXES: ClassVar[tuple[str, ...]] = ("final_conv.",)

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        dims = cfg.channels
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = cfg.dim * 4
        attn = {"heads": cfg.attn_heads, "dim_head": cfg.attn_dim_head}

        def res(dim_in: int, dim_out: int, time: int | None = time_dim) -> ResnetBlock:
            return ResnetBlock(dim_in, dim_out, time, cfg.resnet_groups)

        self.init_conv = nn.Conv2d(cfg.in_channels, dims[0], 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(cfg.dim),
            nn.Linear(cfg.dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )
        self.downs = nn.ModuleList()
        for level, (dim_in, dim_out) in enumerate(in_out):
            is_last = level == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                res(dim_in, dim_out),
                res(dim_out, dim_out),
                Residual(PreNorm(dim_out, LinearAttention(dim_out, **attn))),
                nn.Identity() if is_last else nn.Conv2d(dim_out, dim_out, 4, stride=2, padding=1),
            ]))
        mid_dim = dims[-1]
        self.mid_block1 = res(mid_dim, mid_dim)
        self.mid_attn = Residual(PreNorm(mid_dim, Attention(mid_dim, **attn)))
        self.mid_block2 = res(mid_dim, mid_dim)
        self.ups = nn.ModuleList()
        for dim_in, dim_out in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([
                res(dim_out * 2, dim_in),
                res(dim_in, dim_in),
                Residual(PreNorm(dim_in, LinearAttention(dim_in, **attn))),
                nn.ConvTranspose2d(dim_in, dim_in, 4, stride=2, padding=1),
            ]))
        top = dims[1]
        self.final_conv = nn.Sequential(
            res(top * 2 if cfg.use_top_skip else top, top, time=None), nn.Conv2d(top, cfg.out_channels, 1)
        )
        if cfg.init == "reference":
            self._reference_init()
        log.debug("built UNet %s with %d parameters", cfg, sum(p.numel() for p in self.parameters()))

    @torch.no_grad()
    def _reference_init(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 0.0, 0.01)

    def head_parameter_names(self) -> list[str]:
        """Names of the head's parameters (the ones fine-tuning re-initialises)."""
        return [n for n, _ in self.named_parameters() if n.startswith(self.HEAD_PREFIXES)]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predict noise (pretraining) or class logits (segmentation) for ``x`` at timesteps ``t``.

        ``x`` is (B, in_channels, H, W) with H and W multiples of ``config.size_multiple``;
        ``t`` is (B,) or a scalar, integer or float (segmentation feeds a constant 0).
        """
        self._check_input(x, t)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.init_conv(x)
        t_emb = self.time_mlp(t)
        skips = []
        for block1, block2, attn, down in self.downs:
            x = attn(block2(block1(x, t_emb), t_emb))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t_emb)), t_emb)
        for block1, block2, attn, up in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)          # the deepest skip first
            x = up(attn(block2(block1(x, t_emb), t_emb)))
        if self.config.use_top_skip:
            x = torch.cat((x, skips.pop()), dim=1)
        return self.final_conv(x)

    def _check_input(self, x: Tensor, t: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ConfigError(f"UNet expects input (B, {cfg.in_channels}, H, W) (got shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        m = cfg.size_multiple
        if h % m or w % m:
            raise ConfigError(
                f"UNet with {len(cfg.dim_mults)} levels needs height and width that are multiples of {m} "
                f"(got {h}x{w}); pad or crop the input, e.g. to {-(-h // m) * m}x{-(-w // m) * m}"
            )
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ConfigError(f"UNet timesteps must be a scalar or of shape ({x.shape[0]},) "
                              f"(got {tuple(t.shape)})")
