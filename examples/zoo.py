"""Small PyTorch definitions of the common CNN families pcc must handle, for tests and benchmarks.

No torchvision (its registry wheel needs a CUDA torch, see shared/DEPENDENCIES.md) and no downloaded
weights: every model is written here, initialised randomly with a fixed seed, with BatchNorm statistics
randomised so that folded weights and BN-scale importance are not all alike. Each family keeps the
structure that makes pruning hard (residual sums, depthwise and grouped convs, squeeze-excite gating,
concatenation, channel split and shuffle, LayerNorm with layer scale, transposed convs, detection-neck
splits and upsampling, flatten into a classifier); `tiny=True` sizes are for tests, the defaults are
the real architectures' sizes for benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TEST_MODELS", "ZOO", "ZooEntry", "build", "randomize_norms"]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(conv_bn(cin, width, 3, stride), conv_bn(width, cout, 3, act=None))
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            conv_bn(cin, width, 1), conv_bn(width, width, 3, stride), conv_bn(width, cout, 1, act=None)
        )
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, layers, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, count in enumerate(layers):
            planes = width * 2**i
            for j in range(count):
                stages.append(block(cin, planes, 2 if j == 0 and i > 0 else 1))
                cin = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------- MobileNets


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, act=nn.ReLU6, se: bool = False, k: int = 3) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, max(8, hidden // 4)))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class SqueezeExcite(nn.Module):
    """Global pool -> reduce -> ReLU -> expand -> hard-sigmoid gate, multiplied back per channel."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride) of the paper's Table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 1.0, num_classes: int = 1000, settings=SETTINGS, last: int = 1280) -> None:
        super().__init__()
        cin = int(32 * width)
        layers: list[nn.Module] = [conv_bn(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in settings:
            cout = max(8, int(c * width))
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MobileNetV3(nn.Module):
    """MobileNetV3-style: HardSwish activations and squeeze-excite in some inverted residuals."""

    # (kernel, expansion, channels, se, hardswish, stride)
    SETTINGS = ((3, 1, 16, True, False, 2), (3, 4, 24, False, False, 2), (5, 3, 40, True, True, 2), (3, 3, 40, True, True, 1))

    def __init__(self, width: int = 16, num_classes: int = 10, settings=SETTINGS) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, width, 3, 2, act=nn.Hardswish)]
        cin = width
        for k, t, c, se, hs, s in settings:
            layers.append(InvertedResidual(cin, c, s, t, act=nn.Hardswish if hs else nn.ReLU, se=se, k=k))
            cin = c
        self.features = nn.Sequential(*layers, conv_bn(cin, cin * 6, 1, act=nn.Hardswish))
        self.head = nn.Sequential(nn.Linear(cin * 6, 128), nn.Hardswish(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ------------------------------------------------------------------------------------------ DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, blocks=(2, 2), stem: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, padding=1, bias=False)]
        c = stem
        for b, count in enumerate(blocks):
            for _ in range(count):
                layers.append(DenseLayer(c, growth))
                c += growth
            if b < len(blocks) - 1:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# -------------------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x, groups: int):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, branch, 1))
        right_in = cin if stride > 1 else branch
        self.right = nn.Sequential(
            conv_bn(right_in, branch, 1), conv_bn(branch, branch, 3, stride, groups=branch, act=None), conv_bn(branch, branch, 1)
        )

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(24, 48, 96), repeats=(2, 2), stem: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, stem, 3, 2)]
        cin = stem
        for cout, n in zip(widths, repeats):
            layers.append(ShuffleUnit(cin, cout, 2))
            layers += [ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
            cin = cout
        self.features = nn.Sequential(*layers, conv_bn(cin, 128, 1))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ------------------------------------------------------------------------------------------ ConvNeXt


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> channels-last LayerNorm -> Linear x4 -> GELU -> Linear -> layer scale -> residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) * 0.5 + 0.1)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32), depths=(1, 1), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4)]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i > 0:
                layers.append(nn.Conv2d(dims[i - 1], dim, 2, 2))
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.fc(self.norm(self.features(x).mean(dim=(2, 3))))


# -------------------------------------------------------------------------------------------- RegNet


class RegNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cout, 1), conv_bn(cout, cout, 3, stride, groups=cout // group_width), conv_bn(cout, cout, 1, act=None)
        )
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class RegNet(nn.Module):
    def __init__(self, widths=(32, 64), depths=(2, 1), group_width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 16, 3, 2)]
        cin = 16
        for width, depth in zip(widths, depths):
            for j in range(depth):
                layers.append(RegNetBlock(cin, width, 2 if j == 0 else 1, group_width))
                cin = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ----------------------------------------------------------------------------------------- Inception


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class Inception(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.a = InceptionBlock(32, 16, 16, 24, 8, 8, 8)
        self.b = InceptionBlock(56, 24, 24, 32, 8, 16, 16)
        self.fc = nn.Linear(88, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(self.a(self.stem(x))), 1), 1))


# ---------------------------------------------------------------------------------------------- U-Net


class UNet(nn.Module):
    def __init__(self, base: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn(3, base), conv_bn(base, base))
        self.enc2 = nn.Sequential(conv_bn(base, 2 * base, 3, 2), conv_bn(2 * base, 2 * base))
        self.mid = nn.Sequential(conv_bn(2 * base, 4 * base, 3, 2), conv_bn(4 * base, 4 * base))
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, 2)
        self.dec2 = conv_bn(4 * base, 2 * base)
        self.up1 = nn.ConvTranspose2d(2 * base, base, 2, 2)
        self.dec1 = conv_bn(2 * base, base)
        self.head = nn.Conv2d(base, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        m = self.mid(e2)
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


# ------------------------------------------------------------------------------------- YOLO-style neck


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, split in two, bottlenecks on the second half, concat all, 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1) -> None:
        super().__init__()
        self.hidden = cout // 2
        self.cv1 = conv_bn(cin, 2 * self.hidden, 1, act=nn.SiLU)
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn(self.hidden, self.hidden, 3, act=nn.SiLU), conv_bn(self.hidden, self.hidden, 3, act=nn.SiLU))
            for _ in range(n)
        )
        self.cv2 = conv_bn((2 + n) * self.hidden, cout, 1, act=nn.SiLU)

    def forward(self, x):
        parts = list(self.cv1(x).split((self.hidden, self.hidden), 1))
        for block in self.blocks:
            parts.append(parts[-1] + block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class YoloNeck(nn.Module):
    """Backbone stages P3/P4/P5, a top-down path (nearest upsample + concat) and two detection heads."""

    def __init__(self, width: int = 16, outputs: int = 12) -> None:
        super().__init__()
        w = width
        self.p3 = nn.Sequential(conv_bn(3, w, 3, 2, act=nn.SiLU), conv_bn(w, 2 * w, 3, 2, act=nn.SiLU), C2f(2 * w, 2 * w))
        self.p4 = nn.Sequential(conv_bn(2 * w, 4 * w, 3, 2, act=nn.SiLU), C2f(4 * w, 4 * w))
        self.p5 = nn.Sequential(conv_bn(4 * w, 8 * w, 3, 2, act=nn.SiLU), C2f(8 * w, 8 * w))
        self.top4 = C2f(12 * w, 4 * w)
        self.top3 = C2f(6 * w, 2 * w)
        self.head3 = nn.Conv2d(2 * w, outputs, 1)
        self.head4 = nn.Conv2d(4 * w, outputs, 1)

    def forward(self, x):
        p3 = self.p3(x)
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        t3 = self.top3(torch.cat([F.interpolate(t4, scale_factor=2.0, mode="nearest"), p3], 1))
        return self.head3(t3), self.head4(t4)


# ------------------------------------------------------------------------------------------ VGG, MLP


class VGG(nn.Module):
    def __init__(self, widths=(16, "M", 32, "M", 64, "M"), hidden: int = 64, num_classes: int = 10, spatial: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, w))
                cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * spatial * spatial, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self, sizes=(32, 64, 64, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------------------------- transformers


class SequenceFirstAttention(nn.Module):
    """`nn.MultiheadAttention` as most older code uses it, on [tokens, batch, features], with a post-norm FFN."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = self.norm1(x + self.attention(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class CausalSelfAttention(nn.Module):
    """GPT-2's attention: one fused Q/K/V projection, a causal mask, an output projection.

    With `past` (cached keys and values, [batch, heads, cached, head dim]) the new tokens attend to every
    cached token and causally among themselves, and the grown cache is returned too: the decoder step of
    generation. `recorded`, when a list, collects each call's attention probabilities (for references).
    """

    def __init__(self, dim: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("causal", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, x, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        batch, tokens, dim = x.shape
        q, k, v = (t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2) for t in self.qkv(x).split(dim, dim=2))
        if past is None:
            visible = self.causal[:tokens, :tokens]
        else:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            cached = k.shape[2] - tokens
            visible = torch.arange(k.shape[2]) <= torch.arange(tokens)[:, None] + cached
        scores = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        probabilities = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        if self.recorded is not None:
            self.recorded.append(probabilities)
        out = self.proj((probabilities @ v).transpose(1, 2).reshape(batch, tokens, dim))
        return out if past is None else (out, k, v)


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, context)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        if past is None:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        attended, k, v = self.attention(self.ln1(x), past)
        x = x + attended
        return x + self.mlp(self.ln2(x)), k, v


class TinyGPT(nn.Module):
    """A pre-norm, GPT-2-style causal language model (token + position embeddings, tied-free head)."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(GPTBlock(dim, heads, context) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.ln(self.blocks(self.tokens(ids) + self.positions(positions))))


class TinyGPTDecoder(nn.Module):
    """One generation step of a `TinyGPT` with a KV cache: (ids, positions, k0, v0, k1, v1, ...) ->
    (logits, present k0, v0, ...). Positions are an input, not the cache length, because a pruned cache
    holds fewer entries than tokens seen."""

    def __init__(self, gpt: TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, ids, positions, *cache):
        x = self.gpt.tokens(ids) + self.gpt.positions(positions)
        present = []
        for index, block in enumerate(self.gpt.blocks):
            x, k, v = block(x, (cache[2 * index], cache[2 * index + 1]))
            present += [k, v]
        return (self.gpt.head(self.gpt.ln(x)), *present)

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        attention = self.gpt.blocks[0].attention
        head_dim = self.gpt.head.in_features // attention.heads
        return [torch.zeros(batch, attention.heads, 0, head_dim) for _ in range(2 * len(self.gpt.blocks))]


def export_decoder_step(decoder: TinyGPTDecoder):
    """The decoder step as an IR model with symbolic lengths: `new` tokens, and one cached length per layer
    (layers' caches differ in size once pruned). Inputs ids, positions, past_k_<l>, past_v_<l>; outputs
    logits, present_k_<l>, present_v_<l>."""
    from pcc.compiler.frontend import from_torch

    layers = len(decoder.gpt.blocks)
    cache = [torch.zeros(1, t.shape[1], 3, t.shape[3]) for t in decoder.empty_cache()]
    new = torch.export.Dim("new", max=decoder.gpt.positions.num_embeddings)
    past = [torch.export.Dim(f"past_{layer}", max=1 << 16) for layer in range(layers)]
    shapes = ({1: new}, {1: new}, tuple({2: past[i // 2]} for i in range(2 * layers)))
    cached = [f"{kind}_{layer}" for layer in range(layers) for kind in "kv"]
    return from_torch(
        decoder.eval(), [torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 4]]), *cache],
        input_names=["ids", "positions", *(f"past_{c}" for c in cached)],
        output_names=["logits", *(f"present_{c}" for c in cached)], dynamic_shapes=shapes,
    )


def transformer_encoder(layers: int = 2, dim: int = 32, heads: int = 4) -> nn.Module:
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    with torch.no_grad():  # the layers start as copies of one; trained layers differ
        for parameter in encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return encoder


# ---------------------------------------------------------------------------------------------- zoo


@dataclass(frozen=True)
class ZooEntry:
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    vocabulary: int = 0  # > 0: the input is token ids below this


ZOO: dict[str, ZooEntry] = {
    "resnet_basic": ZooEntry(lambda: ResNet(BasicBlock, (1, 1, 1), width=8, num_classes=10), (1, 3, 32, 32)),
    "resnet_bottleneck": ZooEntry(lambda: ResNet(Bottleneck, (2, 1, 1), width=8, num_classes=10), (1, 3, 32, 32)),
    "mobilenet_v2": ZooEntry(
        lambda: MobileNetV2(width=0.5, num_classes=10, settings=MobileNetV2.SETTINGS[:4], last=128), (1, 3, 32, 32)
    ),
    "mobilenet_v3": ZooEntry(lambda: MobileNetV3(), (1, 3, 32, 32)),
    "densenet": ZooEntry(lambda: DenseNet(), (1, 3, 16, 16)),
    "shufflenet_v2": ZooEntry(lambda: ShuffleNetV2(), (1, 3, 32, 32)),
    "convnext": ZooEntry(lambda: ConvNeXt(), (1, 3, 32, 32)),
    "regnet": ZooEntry(lambda: RegNet(), (1, 3, 32, 32)),
    "inception": ZooEntry(lambda: Inception(), (1, 3, 32, 32)),
    "unet": ZooEntry(lambda: UNet(), (1, 3, 32, 32)),
    "yolo_neck": ZooEntry(lambda: YoloNeck(), (1, 3, 64, 64)),
    "vgg": ZooEntry(lambda: VGG(), (1, 3, 32, 32)),
    "mlp": ZooEntry(lambda: MLP(), (4, 32)),
    "transformer_encoder": ZooEntry(lambda: transformer_encoder(), (2, 10, 32)),
    "sequence_first_attention": ZooEntry(lambda: SequenceFirstAttention(), (10, 2, 32)),
    "tiny_gpt": ZooEntry(lambda: TinyGPT(), (2, 12), vocabulary=64),
    # full-size architectures for the quickstart and benchmarks
    "resnet18": ZooEntry(lambda: ResNet(BasicBlock, (2, 2, 2, 2)), (1, 3, 224, 224)),
    "resnet50": ZooEntry(lambda: ResNet(Bottleneck, (3, 4, 6, 3)), (1, 3, 224, 224)),
    "mobilenet_v2_full": ZooEntry(lambda: MobileNetV2(), (1, 3, 224, 224)),
}

TEST_MODELS = [name for name in ZOO if name not in ("resnet18", "resnet50", "mobilenet_v2_full")]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm trained-looking statistics, so folded weights and gamma differ per channel."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model `name` in eval mode with seeded weights, and an example input."""
    entry = ZOO[name]
    torch.manual_seed(seed)
    model = randomize_norms(entry.make(), seed).eval()
    generator = torch.Generator().manual_seed(seed)
    if entry.vocabulary:
        return model, torch.randint(0, entry.vocabulary, entry.input_shape, generator=generator)
    return model, torch.randn(entry.input_shape, generator=generator)
