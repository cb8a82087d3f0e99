"""Building blocks, the stage builder and the relation checks shared by the model families.

Stages are built as torchvision's ``_make_layer`` and timm's ``make_blocks`` build them:
:func:`make_stage` makes children ``block1..n`` whose first block carries the stage's stride and
width change (kuangliu's ``strides = [stride] + [1] * (n - 1)``); :class:`StagedNetwork` adds
``stage1..N`` and runs them. Network classes take blocks per stage and widths; the builders do
the papers' depth arithmetic (:func:`blocks_per_stage`). Each flag's own range is its domain in
``models/registry.py``, checked by ``create_model`` before a builder runs; the checks here relate a
flag to the network or to another flag (:func:`check_length`, :func:`check_multiple`), with messages
that start with the flag (``--depth 21: ...``), the line a user sees. Layers that one family alone
uses live in its file. The transformer layers at the end use ``F.scaled_dot_product_attention``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import ModelConfigError


# ----------------------------------------------------------------------------- convolutions

def conv3x3(in_channels, out_channels, stride=1, groups=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ConvBNAct(nn.Sequential):
    """conv (no bias, 'same' padding) - BN - activation; ``activation=None`` leaves the output linear."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1, activation=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if activation is not None:
            self.act = activation()


# ----------------------------------------------------------------------------- relation checks

def check_length(flag, values, length, arch):
    """One entry per stage: ``values`` (a list already checked by the flag's domain) has ``length`` entries."""
    if len(values) != length:
        raise ModelConfigError(f'{flag} {list(values)}: {arch} needs {length} entries, one per stage')


def check_multiple(flag, value, divisor, divisor_name, arch):
    """``value`` divisible by ``divisor`` (a width split into heads or groups)."""
    if value % divisor:
        raise ModelConfigError(f'{flag} {value}: {arch} needs a multiple of {divisor_name} ({divisor})')


def blocks_per_stage(depth, layers_per_block, n_stages=3, extra_layers=2, arch='', flag='--depth'):
    """Solve the papers' depth arithmetic ``depth = n_stages * layers_per_block * n + extra``.

    E.g. a CIFAR ResNet with basic blocks: depth = 3 * 2 * n + 2 = 6n + 2.
    """
    per_n = n_stages * layers_per_block
    n, remainder = divmod(depth - extra_layers, per_n)
    if remainder or n < 1:
        raise ModelConfigError(
            f'{flag} {depth}: {arch} needs depth = {per_n}n+{extra_layers} with n >= 1 '
            f'(e.g. {per_n + extra_layers}, {2 * per_n + extra_layers}, {3 * per_n + extra_layers})')
    return n


def residual_blocks_per_stage(depth, block_type, arch):
    """Blocks per stage of a 3-stage CIFAR ResNet (arXiv 1512.03385, 1603.05027).

    Basic blocks have 2 weighted layers, bottlenecks 3; with the stem conv and the
    classifier: depth = 6n+2 (basic) or 9n+2 (bottleneck).
    """
    layers_per_block = 2 if block_type == 'basic' else 3
    return blocks_per_stage(depth, layers_per_block, arch=f'{arch} with {block_type} blocks')


# ----------------------------------------------------------------------------- stages

def make_stage(block, in_channels, out_channels, n_blocks, stride=1, per_block_kwargs=None, **block_kwargs):
    """``nn.Sequential`` of ``block1..n``: ``block(in_channels, out_channels, stride, **kwargs)``.

    The first block takes the stage's stride and input width, the others stride 1 and the
    previous block's width. ``out_channels`` may list one width per block (PyramidNet's widths
    grow block by block); ``per_block_kwargs`` adds keyword arguments block by block.
    """
    widths = list(out_channels) if isinstance(out_channels, (list, tuple)) else [out_channels] * n_blocks
    stage = nn.Sequential()
    for index, width in enumerate(widths):
        extra = per_block_kwargs[index] if per_block_kwargs else {}
        stage.add_module(f'block{index + 1}',
                         block(in_channels, width, stride if index == 0 else 1, **block_kwargs, **extra))
        in_channels = width
    return stage


class StagedNetwork(nn.Module):
    """A network whose trunk is ``stage1..N``; ``forward`` is ``head(forward_features(x))``.

    Subclasses create their stem, call :meth:`add_stages` (or register stages of their own and set
    ``num_stages``), then whatever ends the trunk and ``head``; their ``forward_features`` runs the
    stem, :meth:`forward_stages` and that ending.
    """

    num_stages = 0

    def add_stages(self, block, in_channels, stage_channels, blocks_per_stage, strides=None,
                   per_block_kwargs=None, **block_kwargs):
        """Add ``stage1..N`` (strides 1, 2, 2, ... unless given) and return the output width.

        ``per_block_kwargs``: one dict per block of the whole network, in order.
        """
        strides = strides or [1] + [2] * (len(stage_channels) - 1)
        first_block = 0
        for index, (out_channels, n_blocks, stride) in enumerate(zip(stage_channels, blocks_per_stage, strides)):
            kwargs = per_block_kwargs[first_block:first_block + n_blocks] if per_block_kwargs else None
            self.add_module(f'stage{index + 1}', make_stage(block, in_channels, out_channels, n_blocks, stride,
                                                            kwargs, **block_kwargs))
            in_channels = out_channels[-1] if isinstance(out_channels, (list, tuple)) else out_channels
            first_block += n_blocks
        self.num_stages = len(stage_channels)
        return in_channels

    def forward_stages(self, x):
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f'stage{index}')(x)
        return x

    def forward_features(self, x):
        raise NotImplementedError

    def forward(self, x):
        return self.head(self.forward_features(x))


class ConvStemNetwork(StagedNetwork):
    """conv3x3-BN-ReLU stem (children ``conv``, ``bn``), ``stage1..N`` of ``block`` (see
    :meth:`StagedNetwork.add_stages`), global average pooling and a linear ``head``: the skeleton of
    the post-activation residual networks (ResNet, RegNet, ResNet with stochastic depth)."""

    def __init__(self, block, blocks_per_stage, stage_channels, stem_channels, num_classes, in_channels,
                 strides=None, per_block_kwargs=None, **block_kwargs):
        super().__init__()
        self.conv = conv3x3(in_channels, stem_channels)
        self.bn = nn.BatchNorm2d(stem_channels)
        self.num_features = self.add_stages(block, stem_channels, stage_channels, blocks_per_stage, strides,
                                            per_block_kwargs, **block_kwargs)
        self.head = ClassifierHead(self.num_features, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.forward_stages(x)


def scale_widths(widths, multiplier):
    """Widths times a width multiplier (MobileNet's alpha), rounded, at least 1."""
    return [max(1, int(round(width * multiplier))) for width in widths]


def drop_path_layer(probability):
    """Stochastic depth per sample (arXiv 1603.09382): torchvision's StochasticDepth in 'row' mode, imported
    where a model uses it, as importing torchvision takes more than a second."""
    from torchvision.ops import StochasticDepth
    return StochasticDepth(probability, 'row')


def linear_drop_rates(drop_path_rate, n_blocks):
    """Stochastic depth's linear decay rule (arXiv 1603.09382, eq. 4): block l of L drops with
    probability ``drop_path_rate * l / L``, so the last block drops with ``drop_path_rate``."""
    return [drop_path_rate * (index + 1) / n_blocks for index in range(n_blocks)]


# ----------------------------------------------------------------------------- shortcuts and gates

def projection_shortcut(in_channels, out_channels, stride):
    """Identity when shapes match, else 1x1 conv + BN (option B of arXiv 1512.03385)."""
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


def zero_padded_shortcut(x, out_channels, stride):
    """Parameter-free shortcut (option A): 2x2 average pooling when downsampling, zero channels appended."""
    if stride > 1:
        # ceil_mode: an odd map keeps its last row and column, as the strided conv beside it does
        x = F.avg_pool2d(x, kernel_size=2, stride=stride, ceil_mode=True)
    extra_channels = out_channels - x.size(1)
    if extra_channels > 0:
        x = F.pad(x, (0, 0, 0, 0, 0, extra_channels))
    return x


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual (Sandler et al., arXiv 1801.04381, Table 1): [1x1 expansion-BN-act]
    - 3x3 depthwise-BN-act (stride) - 1x1 linear projection-BN, plus the input where the shape is kept.

    ReLU6 in MobileNetV2, SiLU in MobileViT; ``expansion=1`` has no expansion convolution.
    """

    def __init__(self, in_channels, out_channels, stride, expansion, activation=nn.ReLU6):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBNAct(in_channels, hidden, kernel_size=1, activation=activation) if expansion != 1 \
            else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, stride=stride, groups=hidden, activation=activation)
        # linear bottleneck: no activation after the projection (section 3.2)
        self.project = ConvBNAct(hidden, out_channels, kernel_size=1, activation=None)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_shortcut else y


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation gate (Hu et al., arXiv 1709.01507).

    ``channels / reduction`` hidden units unless ``hidden_channels`` is given (EfficientNet and
    RegNet size the gate by the block's input width); ``activation`` between the two 1x1 convs.
    """

    def __init__(self, channels, reduction=16, hidden_channels=None, activation=F.relu):
        super().__init__()
        hidden = hidden_channels or max(1, channels // reduction)
        self.activation = activation
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.activation(self.fc1(scale))
        scale = torch.sigmoid(self.fc2(scale))
        return x * scale


class ClassifierHead(nn.Module):
    """Global average pooling followed by a linear layer; works for any input size."""

    def __init__(self, in_features, num_classes, drop_rate=0.0):
        super().__init__()
        self.drop_rate = drop_rate
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)


def initialize_weights(model):
    """Kaiming-normal (fan_out) convolutions, unit BN scale, zero biases (arXiv 1502.01852)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if module.bias is not None:
                nn.init.zeros_(module.bias)


INIT_SCHEMES = ('kaiming', 'xavier', 'default')


def reinitialize(model, scheme):
    """Re-initialize a built model by ``scheme`` (``--init``), overriding its family's own rule.

    kaiming: He et al. (arXiv 1502.01852) normal weights, fan_out for convolutions as in torchvision's
    ResNet, fan_in for linear layers; xavier: Glorot and Bengio's uniform ("normalized") weights for
    both; in both, zero biases and norm layers at scale 1, shift 0. default: every layer's own
    ``reset_parameters`` (PyTorch's defaults). Parameters outside these layers (position embeddings,
    class tokens, relative position tables) keep their values.
    """
    if scheme not in INIT_SCHEMES:
        raise ModelConfigError(f'--init {scheme}: choose {" or ".join(INIT_SCHEMES)}')
    for module in model.modules():
        if scheme == 'default':
            if hasattr(module, 'reset_parameters'):
                module.reset_parameters()
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            if scheme == 'kaiming':
                mode = 'fan_in' if isinstance(module, nn.Linear) else 'fan_out'
                nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity='relu')
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


# ----------------------------------------------------------------------------- transformer layers

def initialize_transformer_weights(model):
    """ViT's initialization (timm ``init_weights_vit_timm``): linear weights truncated normal with
    std 0.02 and zero biases, LayerNorm scale 1 and shift 0; convolutions and BN as in
    :func:`initialize_weights`."""
    initialize_weights(model)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Mlp(nn.Module):
    """The transformer's feed-forward block: Linear - activation - Linear."""

    def __init__(self, dim, hidden_dim, out_dim=None, activation=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over tokens (..., N, dim) with ``F.scaled_dot_product_attention``.

    ``attn_bias`` is added to the attention logits: relative position biases (heads, N, N), Swin's
    shifted-window masks. ``out_dim`` lets CoAtNet's downsampling blocks widen in the projection.
    """

    def __init__(self, dim, num_heads, head_dim=None, out_dim=None, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        inner_dim = num_heads * (head_dim or dim // num_heads)
        self.qkv = nn.Linear(dim, 3 * inner_dim, bias=qkv_bias)
        self.proj = nn.Linear(inner_dim, out_dim or dim)

    def forward(self, x, attn_bias=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).movedim(-3, 0).transpose(-2, -3)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(x.transpose(-2, -3).flatten(-2))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (ViT, arXiv 2010.11929): ``x + attn(LN(x))``, then ``x + mlp(LN(x))``,
    each branch dropped per sample with probability ``drop_path`` in training (stochastic depth)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, activation=nn.GELU):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), activation=activation)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset within a ``height`` x ``width`` window
    (Swin, arXiv 2103.14030, eq. 4; CoAtNet's relative attention, arXiv 2106.04803, eq. 3).

    The table holds (2h - 1)(2w - 1) offsets; ``forward`` returns the (heads, N, N) bias for the
    N = h * w tokens of a window in row-major order.
    """

    def __init__(self, height, width, num_heads):
        super().__init__()
        self.height, self.width = height, width
        self.table = nn.Parameter(torch.zeros((2 * height - 1) * (2 * width - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')).flatten(1)
        offsets = coords[:, :, None] - coords[:, None, :]
        index = (offsets[0] + height - 1) * (2 * width - 1) + offsets[1] + width - 1
        # derived from the sizes, so not saved in the state_dict
        self.register_buffer('index', index, persistent=False)
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1)
