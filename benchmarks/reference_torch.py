"""SSR pseudo labels and train step in PyTorch eager, the way the peers do it.

The reference that ssr_jax is benchmarked and cross-checked against. It is
written the way WeCLIP (zbf1991/WeCLIP) and CLIP-ES (linyq2117/CLIP-ES) write
their code: Hugging Face `transformers` models in eager mode, Python loops
over the images of a batch and over the classes of an image, a forward hook
on the last block's `layer_norm1` for GradCAM, one block-12 forward and
backward per class, NumPy/SciPy on the host where the peers use OpenCV.
Numerically it is the method of SPEC §1 with the conventions shared with
ssr_jax (see "Conventions" below), so that a parity test can compare the
two on the same tiny random weights.

Run `python benchmarks/reference_torch.py --size full --batch 4 --iters 3`
to time `pseudo_labels` and one train step on random weights (no download).

Conventions shared with ssr_jax
-------------------------------
- Batch: `image` uint8 [B, H, W, 3]; `valid` bool [B, H, W]; `labels`
  multi-hot [B, C] (class c <-> label id c + 1); `superpixels` int [B, H, W]
  with -1 on padding (must be -1 wherever `valid` is False).
- Present classes of an image in ascending order, padded with -1 to K
  (`present_classes`); per-class outputs are [B, K, ...], 0 in padded slots.
- Images normalised with ImageNet mean/std on the 0..255 scale (WeCLIP).
- CLIP position embeddings: bilinear (align_corners=False) resize of the
  pretrained grid to (H // 16, W // 16) on every call (WeCLIP); DINO: the
  HF bicubic `interpolate_pos_encoding`.
- Min-max normalisation is pytorch_grad_cam's `scale_cam_image`:
  x - min, then / (1e-7 + max). GradCAM applies it twice (base_cam.py does).
- Pseudo labels: label ids (0 background, c + 1 class c), 255 where
  `valid` is False.

Parameter names (for copying weights from the Flax side)
--------------------------------------------------------
`Decoder` keeps WeCLIP's names, so a WeCLIP checkpoint's decoder loads too:
  decoder_fts_fuse.linears_modulelist.{i}.proj.{weight [256, 768], bias}
  decoder_fts_fuse.linears_modulelist.{i}.proj_2.{weight [256, 256], bias}
  decoder_fts_fuse.linear_fuse.{weight [256, 256 * 11, 1, 1], bias}
  decoder.transformer.resblocks.{l}.ln_1.{weight, bias}
  decoder.transformer.resblocks.{l}.attn.in_proj_weight [3 * 256, 256]
      (rows: q, k, v), attn.in_proj_bias, attn.out_proj.{weight, bias}
  decoder.transformer.resblocks.{l}.ln_2.{weight, bias}
  decoder.transformer.resblocks.{l}.mlp.c_fc.{weight [1024, 256], bias}
  decoder.transformer.resblocks.{l}.mlp.c_proj.{weight [256, 1024], bias}
  decoder.linear_pred.{weight [num_classes, 256, 1, 1], bias}
`CMPAHeads`: isa.fc1, isa.bn (weight, bias, running_mean, running_var),
isa.fc2, the same under tsa, and log_tau (scalar). torch Linear weights
are [out, in] (a Flax kernel is [in, out]).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import resource
import statistics
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import scipy.ndimage
import skimage.color
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)
PATCH = 16
IGNORE = 255


@dataclasses.dataclass
class RefConfig:
    """Method settings; names follow `ssr_jax/config_defaults.py`."""

    normalization: str = "imagenet"  # data.normalization: imagenet | clip
    logit_scale: float = 100.0  # cam.logit_scale
    projected: bool = True  # cam.projected: logits through ISA/TSA
    use_clip_attn: bool = True  # sgc.use_clip_attn
    use_dino_attn: bool = True  # sgc.use_dino_attn
    mask: str = "superpixel"  # sgc.mask: superpixel | box | none
    clip_weight: float = 0.4  # sgc.clip_weight
    dino_weight: float = 0.6  # sgc.dino_weight
    clip_layers: int = 8  # sgc.clip_layers
    sinkhorn_iters: int = 3  # sgc.sinkhorn_iters
    box_threshold: float = 0.4  # sgc.box_threshold
    colour_k: int = 8  # sgc.colour_k
    colour_iters: int = 10  # sgc.colour_iters
    theta_h: float = 0.4  # sgc.theta_h
    theta_r: float = 0.5  # sgc.theta_r
    patch_fraction: float = 0.5  # sgc.patch_fraction
    par_iters: int = 20  # par.iters
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)  # par.dilations
    par_pos_weight: float = 0.01  # par.pos_weight
    par_temperature: float = 0.3  # par.temperature
    bg_power: float = 1.0  # par.bg_power
    proto_weight: float = 1.0  # loss.proto_weight
    seg_weight: float = 0.1  # loss.seg_weight
    tau_min: float = 0.01  # cmpa.tau_min
    lr: float = 2e-4  # optim.lr (weclip preset)
    decoder_lr_mult: float = 10.0  # optim.decoder_lr_mult
    weight_decay: float = 0.01  # optim.weight_decay
    # Seed labels without PAR after each Table 3 step:
    # name -> (use_clip_attn, use_dino_attn, mask); None = initial CAM.
    seed_steps: tuple[tuple[str, tuple[bool, bool, str] | None], ...] = (
        ("initial", None),
        ("clip", (True, False, "box")),
        ("clip_dino", (True, True, "box")),
        ("clip_dino_sp", (True, True, "superpixel")),
    )


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """ISA / TSA: Linear -> BatchNorm1d -> ReLU -> Linear, L2-normalised.

    SPEC §1.3 (Eq. 1). Input [..., in_dim], output [..., out_dim]; the
    BatchNorm statistics are taken over all leading positions.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        x = self.fc2(F.relu(self.bn(self.fc1(x))))
        return F.normalize(x, dim=-1).reshape(*lead, -1)


class CMPAHeads(nn.Module):
    """The two CMPA heads and the learnable temperature (stored as log tau)."""

    def __init__(self, embed_dim: int, hidden_dim: int, out_dim: int,
                 tau_init: float = 0.05):
        super().__init__()
        self.isa = ProjectionHead(embed_dim, hidden_dim, out_dim)
        self.tsa = ProjectionHead(embed_dim, hidden_dim, out_dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau_init)))


class MLP(nn.Module):
    """SegFormerHead's per-block embedding: Linear, ReLU, Linear."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)
        self.proj_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(F.relu(self.proj(x)))


class SegFormerHead(nn.Module):
    """WeCLIP's fusion of the block outputs (CLS dropped) into one map."""

    def __init__(self, num_inputs: int, input_dim: int, embed_dim: int,
                 dropout: float):
        super().__init__()
        self.linears_modulelist = nn.ModuleList(
            [MLP(input_dim, embed_dim) for _ in range(num_inputs)])
        self.linear_fuse = nn.Conv2d(embed_dim * num_inputs, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, hidden: torch.Tensor, grid: tuple[int, int]
                ) -> torch.Tensor:
        """hidden [L, B, N, D] -> fused feature map [B, E, h, w]."""
        h, w = grid
        maps = []
        for mlp, x in zip(self.linears_modulelist, hidden, strict=True):
            y = mlp(x.float())  # [B, N, E]
            maps.append(y.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return self.dropout(self.linear_fuse(torch.cat(maps, dim=1)))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """CLIP-style pre-LN block on sequence-first tensors [L, B, D]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class DecoderTransformer(nn.Module):
    """WeCLIP's TransDecoder: transformer over the grid + 1x1 classifier."""

    def __init__(self, width: int, layers: int, heads: int, num_classes: int):
        super().__init__()
        self.transformer = Transformer(width, layers, heads)
        self.linear_pred = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).permute(2, 0, 1)  # [N, B, E]
        x = self.transformer(x)
        x = x.permute(1, 2, 0).reshape(b, c, h, w)
        return self.linear_pred(x)


class Decoder(nn.Module):
    """SegFormerHead + DecoderTransformer (SPEC §1.8), WeCLIP's layout."""

    def __init__(self, num_inputs: int = 11, input_dim: int = 768,
                 embed_dim: int = 256, depth: int = 3, heads: int = 8,
                 num_classes: int = 21, dropout: float = 0.1):
        super().__init__()
        self.decoder_fts_fuse = SegFormerHead(
            num_inputs, input_dim, embed_dim, dropout)
        self.decoder = DecoderTransformer(
            embed_dim, depth, heads, num_classes)

    def forward(self, hidden: torch.Tensor, grid: tuple[int, int]
                ) -> torch.Tensor:
        """hidden [L, B, N, D] (blocks 1..L, CLS dropped) -> [B, C, h, w]."""
        return self.decoder(self.decoder_fts_fuse(hidden, grid))


@dataclasses.dataclass
class Models:
    """Everything the reference runs: frozen encoders, bank, trainables."""

    clip: CLIPModel
    dino: ViTModel
    heads: CMPAHeads
    decoder: Decoder
    text_fg: torch.Tensor  # [C, E], L2-normalised
    text_bg: torch.Tensor  # [M, E], L2-normalised


def _bilinear_pos_encoding(self, embeddings: torch.Tensor, height: int,
                           width: int) -> torch.Tensor:
    """WeCLIP's `upsample_pos_emb`: bilinear, align_corners=False, CLS kept.

    Replaces HF's bicubic `CLIPVisionEmbeddings.interpolate_pos_encoding`.
    """
    pos = self.position_embedding.weight  # [1 + g*g, D]
    g = math.isqrt(pos.shape[0] - 1)
    grid = pos[1:].T.reshape(1, -1, g, g)
    grid = F.interpolate(grid, size=(height // PATCH, width // PATCH),
                         mode="bilinear", align_corners=False)
    grid = grid.reshape(pos.shape[1], -1).T
    return torch.cat([pos[:1], grid], dim=0).unsqueeze(0)


def use_bilinear_position_embeddings(clip: CLIPModel) -> None:
    """Patch the CLIP vision embeddings to resize positions as WeCLIP does."""
    emb = clip.vision_model.embeddings
    emb.interpolate_pos_encoding = types.MethodType(
        _bilinear_pos_encoding, emb)


def model_configs(size: str) -> dict:
    """Shapes of `make_models(size)`: "full" (ViT-B/16 + ViT-S/16) or "tiny".

    Tiny keeps 12 CLIP blocks (so the last-8 attention mean and the
    11-block decoder input keep their meaning) at width 32.
    """
    if size == "full":
        return {
            "clip_vision": dict(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, image_size=224, patch_size=16),
            "clip_text": dict(
                hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, vocab_size=49408,
                max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407),
            "projection_dim": 512,
            "dino": dict(
                hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                num_attention_heads=6, image_size=224, patch_size=16,
                layer_norm_eps=1e-6, qkv_bias=True),
            "heads": (512, 256),  # hidden, out
            "decoder": dict(embed_dim=256, depth=3, heads=8),
            "num_fg": 20,
            "num_bg": 25,
        }
    if size == "tiny":
        return {
            "clip_vision": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                num_attention_heads=2, image_size=32, patch_size=16),
            "clip_text": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, bos_token_id=62, eos_token_id=63,
                pad_token_id=63),
            "projection_dim": 16,
            "dino": dict(
                hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=16,
                layer_norm_eps=1e-6, qkv_bias=True),
            "heads": (32, 16),
            "decoder": dict(embed_dim=16, depth=1, heads=2),
            "num_fg": 5,
            "num_bg": 3,
        }
    raise ValueError(f"unknown size {size!r}: use 'full' or 'tiny'")


def encode_texts(clip: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIP text embeddings of token ids [T, L], L2-normalised -> [T, E].

    One template per name, so WeCLIP's mean over templates and
    re-normalisation reduce to one normalisation.
    """
    with torch.no_grad():
        out = clip.get_text_features(input_ids=input_ids)
    return F.normalize(out.pooler_output, dim=-1)


def random_token_ids(count: int, text_cfg: dict, gen: torch.Generator
                     ) -> torch.Tensor:
    """Stand-in prompts: [bos, 6 random tokens, eos, eos padding] [count, L]."""
    length = text_cfg["max_position_embeddings"]
    ids = torch.full((count, length), text_cfg["eos_token_id"])
    ids[:, 0] = text_cfg["bos_token_id"]
    ids[:, 1:7] = torch.randint(0, text_cfg["vocab_size"] - 2, (count, 6),
                                generator=gen)
    return ids


def make_models(size: str = "tiny", seed: int = 0,
                device: str | torch.device = "cpu") -> Models:
    """Random-init CLIP (vision + text), DINO, CMPA heads, decoder, bank.

    HF models use `attn_implementation="eager"` (attention weights are
    needed); CLIP's position embeddings are patched to WeCLIP's bilinear
    resize. The text bank embeds random token ids with the random text
    tower (no tokenizer files are needed).
    """
    cfg = model_configs(size)
    torch.manual_seed(seed)
    clip_cfg = CLIPConfig(text_config=cfg["clip_text"],
                          vision_config=cfg["clip_vision"],
                          projection_dim=cfg["projection_dim"])
    clip_cfg._attn_implementation = "eager"
    clip = CLIPModel(clip_cfg).eval()
    use_bilinear_position_embeddings(clip)
    dino_cfg = ViTConfig(**cfg["dino"])
    dino_cfg._attn_implementation = "eager"
    dino = ViTModel(dino_cfg, add_pooling_layer=False).eval()
    for p in list(clip.parameters()) + list(dino.parameters()):
        p.requires_grad_(False)
    hidden, out_dim = cfg["heads"]
    heads = CMPAHeads(cfg["projection_dim"], hidden, out_dim)
    vision_layers = cfg["clip_vision"]["num_hidden_layers"]
    decoder = Decoder(num_inputs=vision_layers - 1,
                      input_dim=cfg["clip_vision"]["hidden_size"],
                      num_classes=cfg["num_fg"] + 1, **cfg["decoder"])
    gen = torch.Generator().manual_seed(seed)
    ids = random_token_ids(cfg["num_fg"] + cfg["num_bg"], cfg["clip_text"],
                           gen)
    bank = encode_texts(clip, ids)
    models = Models(clip=clip, dino=dino, heads=heads, decoder=decoder,
                    text_fg=bank[:cfg["num_fg"]], text_bg=bank[cfg["num_fg"]:])
    return to_device(models, device)


def to_device(models: Models, device: str | torch.device) -> Models:
    for m in (models.clip, models.dino, models.heads, models.decoder):
        m.to(device)
    return dataclasses.replace(models, text_fg=models.text_fg.to(device),
                               text_bg=models.text_bg.to(device))


# --------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------


def normalize_images(images: torch.Tensor, kind: str = "imagenet"
                     ) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], mean/std on 0..255."""
    if kind == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif kind == "clip":
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        raise ValueError(f"normalization {kind!r}: use 'imagenet' or 'clip'")
    x = images.permute(0, 3, 1, 2).float()
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def run_block(layer: nn.Module, x: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One HF CLIPEncoderLayer, also returning head-averaged attention.

    The same computation as `CLIPEncoderLayer.forward`, through its own
    submodules (so hooks on `layer_norm1` fire), as WeCLIP's modified
    block returns its attention. x [B, T, D] -> (y [B, T, D], attn [B, T, T]).
    """
    h = layer.layer_norm1(x)
    a, weights = layer.self_attn(hidden_states=h, attention_mask=None)
    x = x + a
    x = x + layer.mlp(layer.layer_norm2(x))
    return x, weights.mean(dim=1)


def clip_first_blocks(clip: CLIPModel, pixels: torch.Tensor
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Blocks 1..L-1 under no_grad (WeCLIP's `Transformer.forward`).

    pixels [B, 3, H, W] -> (outputs of blocks 1..L-1, each [B, T, D],
    their head-averaged attentions, each [B, T, T]).
    """
    vm = clip.vision_model
    hidden, attns = [], []
    with torch.no_grad():
        x = vm.embeddings(pixels, interpolate_pos_encoding=True)
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers[:-1]:
            x, attn = run_block(layer, x)
            hidden.append(x)
            attns.append(attn)
    return hidden, attns


def project_tokens(clip: CLIPModel, x: torch.Tensor) -> torch.Tensor:
    """ln_post + visual projection on every token: [B, T, D] -> [B, T, E]."""
    return clip.visual_projection(clip.vision_model.post_layernorm(x))


def dino_attention(dino: ViTModel, pixels: torch.Tensor) -> torch.Tensor:
    """Last block's head-averaged attention, CLS dropped: [B, N, N]."""
    with torch.no_grad():
        out = dino(pixel_values=pixels, interpolate_pos_encoding=True,
                   output_attentions=True)
    return out.attentions[-1].mean(dim=1)[:, 1:, 1:]


# --------------------------------------------------------------------------
# Initial CAM: GradCAM (CLIP-ES / WeCLIP)
# --------------------------------------------------------------------------


def scale_cam(cam: torch.Tensor) -> torch.Tensor:
    """pytorch_grad_cam's `scale_cam_image` on one map (no resize)."""
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def present_classes(labels: torch.Tensor, kmax: int | None = None
                    ) -> torch.Tensor:
    """Multi-hot [B, C] -> class ids [B, K], ascending, -1 padded.

    K = kmax, or the most classes any image of the batch has. With more
    than kmax present, the first kmax are kept (a warning says so), as
    ssr_jax's `cam.present_classes` does.
    """
    lists = [torch.nonzero(row > 0.5).flatten().tolist() for row in labels]
    k = max([len(x) for x in lists] + [0]) if kmax is None else kmax
    out = torch.full((len(lists), k), -1, dtype=torch.long)
    for i, ids in enumerate(lists):
        if len(ids) > k:
            warnings.warn(f"image {i} has {len(ids)} classes, keeping the "
                          f"first {k}", stacklevel=2)
        ids = ids[:k]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def gradcam_image(models: Models, x_prev: torch.Tensor,
                  cls_ids: Sequence[int], grid: tuple[int, int],
                  cfg: RefConfig) -> dict:
    """GradCAM of every present class of one image (SPEC §1.4).

    As CLIP-ES/WeCLIP: for each class k (Python loop) block 12 runs
    forward on the block-11 output, a forward hook on its `layer_norm1`
    captures the activation, ln_post + projection go over all tokens, the
    patch tokens (not CLS) are averaged, L2-normalised, and compared by
    100 * cos with [texts of the present classes; background texts];
    softmax over that set; the gradient of p_k w.r.t. the hooked
    activation, averaged over the patch tokens, weighs the channels;
    cam = ReLU(sum w * a), scaled twice as pytorch_grad_cam does.
    With `cfg.projected` every projected patch token goes through ISA
    before the mean (as ssr_jax/cam.py does) and the texts through TSA,
    both in eval mode (running BatchNorm statistics), before the cosine.

    The hook makes the captured activation a leaf that requires grad and
    `torch.autograd.grad` reads its gradient, so no parameter's `.grad` is
    touched (WeCLIP instead unfreezes block 12 to get a graph).

    Args:
        x_prev: [1, T, D] output of the second-to-last block.
        cls_ids: present class ids (ascending).
    Returns:
        {"cams": [K, h, w], "attn": [T, T] block-12 attention (head mean),
         "tokens": [T, E] projected block-12 tokens}.
    """
    clip, heads = models.clip, models.heads
    block = clip.vision_model.encoder.layers[-1]
    h, w = grid
    store: dict[str, torch.Tensor] = {}

    def keep_activation(module, inputs, output):
        act = output.detach().requires_grad_(True)
        store["act"] = act
        return act

    texts = torch.cat([models.text_fg[list(cls_ids)], models.text_bg])
    with eval_mode(heads):
        if cfg.projected:
            with torch.no_grad():
                texts = heads.tsa(texts)
        texts = F.normalize(texts, dim=-1)
        if not cls_ids:
            with torch.no_grad():
                y, attn = run_block(block, x_prev)
            return {"cams": x_prev.new_zeros((0, h, w)), "attn": attn[0],
                    "tokens": project_tokens(clip, y)[0]}
        handle = block.layer_norm1.register_forward_hook(keep_activation)
        cams = []
        try:
            for k in range(len(cls_ids)):
                with torch.enable_grad():
                    y, attn = run_block(block, x_prev)
                    tokens = project_tokens(clip, y)
                    patches = tokens[:, 1:]
                    if cfg.projected:
                        # ISA per patch token, then the mean (ssr_jax's
                        # cam.py): ISA sees the token distribution that
                        # its BatchNorm statistics come from.
                        patches = heads.isa(patches)
                    feat = F.normalize(patches.mean(dim=1), dim=-1)
                    probs = (cfg.logit_scale * feat @ texts.T).softmax(dim=-1)
                    (grad,) = torch.autograd.grad(probs[0, k], store["act"])
                act = store["act"][0, 1:].detach()  # [N, D], CLS dropped
                weights = grad[0, 1:].mean(dim=0)  # [D]
                cam = F.relu((act * weights).sum(dim=-1)).reshape(h, w)
                cams.append(scale_cam(scale_cam(cam)))
        finally:
            handle.remove()
    return {"cams": torch.stack(cams), "attn": attn[0].detach(),
            "tokens": tokens[0].detach()}


# --------------------------------------------------------------------------
# SGC: affinity, transition matrix, masks, refinement (Eq. 7-11)
# --------------------------------------------------------------------------


def fuse_affinity(clip_attn: Sequence[torch.Tensor], dino_attn: torch.Tensor,
                  use_clip: bool, use_dino: bool, cfg: RefConfig
                  ) -> torch.Tensor:
    """A = 0.4 * A_CLIP + 0.6 * A_DINO (Eq. 9, SPEC §1.6), one image.

    clip_attn: every CLIP block's head-averaged attention, each [T, T];
    A_CLIP = mean of the last `clip_layers` with CLS dropped. dino_attn
    [N, N]. One switch off: the other attention alone.
    """
    if use_clip:
        stack = torch.stack(list(clip_attn)[-cfg.clip_layers:])
        a_clip = stack[:, 1:, 1:].mean(dim=0)
    if use_clip and use_dino:
        return cfg.clip_weight * a_clip + cfg.dino_weight * dino_attn
    if use_clip:
        return a_clip
    if use_dino:
        return dino_attn
    raise ValueError("fuse_affinity needs use_clip or use_dino")


def compute_trans_mat(aff: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """WeCLIP's `compute_trans_mat`: [N, N] -> [N, N].

    `rounds` times column- then row-normalisation, symmetrise, square once.
    """
    t = aff
    for _ in range(rounds):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    return t @ t


def box_mask(cam: torch.Tensor, threshold: float) -> torch.Tensor:
    """CLIP-ES `scoremap2bbox` + WeCLIP's box fill, on the patch grid.

    u = uint8(255 * cam); keep u > int(threshold * max u) (cv2
    THRESH_BINARY); the bounding box of every 8-connected component (what
    the boxes of cv2.findContours(RETR_TREE) add up to: hole contours lie
    inside their outer one); each box filled as [y:y1, x:x1] with
    y1 = min(y + h, H - 1), x1 = min(x + w, W - 1). No component: empty.
    cam [h, w] -> bool [h, w].
    """
    score = cam.detach().cpu().numpy().astype(np.float32)
    height, width = score.shape
    u = (score * 255).astype(np.uint8)
    binary = u > int(threshold * np.max(u))
    comps, _ = scipy.ndimage.label(binary, structure=np.ones((3, 3)))
    mask = np.zeros((height, width), dtype=bool)
    for sl in scipy.ndimage.find_objects(comps):
        y, x = sl[0].start, sl[1].start
        y1 = min(sl[0].stop, height - 1)
        x1 = min(sl[1].stop, width - 1)
        mask[y:y1, x:x1] = True
    return torch.from_numpy(mask).to(cam.device)


def superpixel_colours(image: np.ndarray, superpixels: np.ndarray,
                       valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean CIELAB colour of every non-empty superpixel.

    image uint8 [H, W, 3] (skimage `rgb2lab`, D65); pixels count where
    id >= 0 and valid. Returns (ids [n] ascending, colours [n, 3] float32).
    """
    lab = skimage.color.rgb2lab(image)
    keep = (superpixels >= 0) & valid
    ids = superpixels[keep]
    num = int(ids.max()) + 1 if ids.size else 0
    count = np.bincount(ids, minlength=num)
    sums = np.stack([np.bincount(ids, weights=lab[..., c][keep],
                                 minlength=num) for c in range(3)], axis=1)
    present = np.nonzero(count)[0]
    means = sums[present] / count[present, None]
    return present, means.astype(np.float32)


def colour_kmeans(points: torch.Tensor, k: int, iters: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd K-means with the init agreed with ssr_jax (SPEC §1.6, Eq. 8).

    Init: the points sorted by their first coordinate (L) ascending,
    stable (ties keep the input order); centre i = the point at rank
    floor((i + 0.5) * n / k), computed as ((2i + 1) * n) // (2k). Then
    `iters` rounds of: assign each point to the nearest centre (squared
    Euclidean distance, ties to the lowest index), move each centre to the
    mean of its points (an empty cluster keeps its centre). The returned
    assignment is to the final centres.

    points [n, 3] float32 -> (assignment [n] int64, centres [k, 3]).
    """
    n = points.shape[0]
    order = torch.argsort(points[:, 0], stable=True)
    ranks = [((2 * i + 1) * n) // (2 * k) for i in range(k)]
    centres = points[order[ranks]].clone()

    def assign() -> torch.Tensor:
        d = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(dim=-1)
        return torch.argmin(d, dim=1)

    for _ in range(iters):
        labels = assign()
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(dim=0)
    return assign(), centres


def colour_clusters(image: np.ndarray, superpixels: np.ndarray,
                    valid: np.ndarray, cfg: RefConfig) -> np.ndarray:
    """Per-pixel colour cluster of its superpixel, -1 where none [H, W]."""
    ids, colours = superpixel_colours(image, superpixels, valid)
    out = np.full(superpixels.shape, -1, dtype=np.int64)
    if len(ids) == 0:
        return out
    assignment, _ = colour_kmeans(torch.from_numpy(colours), cfg.colour_k,
                                  cfg.colour_iters)
    lut = np.full(int(superpixels.max()) + 1, -1, dtype=np.int64)
    lut[ids] = assignment.numpy()
    keep = (superpixels >= 0) & valid
    out[keep] = lut[superpixels[keep]]
    return out


def cluster_ratios(cam_up: torch.Tensor, clusters: torch.Tensor, k: int,
                   theta_h: float) -> torch.Tensor:
    """r_k of every colour cluster for one class (SGC, Eq. 8).

    r_k = sum_{p in C_k} cam(p) [cam(p) > theta_h] / sum_{p in C_k} cam(p),
    0 when the denominator is 0. cam_up [H, W] (pixel resolution),
    clusters int [H, W] (-1: no cluster, e.g. crop padding) -> [k].
    """
    high = cam_up * (cam_up > theta_h)
    ratios = cam_up.new_zeros(k)
    for j in range(k):
        member = clusters == j
        den = cam_up[member].sum()
        if den > 0:
            ratios[j] = high[member].sum() / den
    return ratios


def superpixel_mask(cam: torch.Tensor, clusters: torch.Tensor,
                    valid: torch.Tensor, cfg: RefConfig) -> torch.Tensor:
    """SGC target regions of one class on the patch grid (Eq. 7-8).

    The CAM is upsampled bilinearly (align_corners=False) to the pixels;
    target = the colour clusters with r_k > theta_r (`cluster_ratios`).
    A patch is target when it has valid pixels and at least
    `patch_fraction` of them are target. No target patch: all ones.

    cam [h, w]; clusters int [H, W] (-1 outside any cluster); valid bool
    [H, W] -> bool [h, w].
    """
    h, w = cam.shape
    up = F.interpolate(cam[None, None], size=clusters.shape, mode="bilinear",
                       align_corners=False)[0, 0]
    ratios = cluster_ratios(up, clusters, cfg.colour_k, cfg.theta_h)
    target = torch.zeros_like(valid)
    for j in range(cfg.colour_k):
        if ratios[j] > cfg.theta_r:
            target |= clusters == j
    target &= valid
    hh, ww = h * PATCH, w * PATCH
    t = target[:hh, :ww].reshape(h, PATCH, w, PATCH).sum(dim=(1, 3))
    v = valid[:hh, :ww].reshape(h, PATCH, w, PATCH).sum(dim=(1, 3))
    mask = (v > 0) & (t >= cfg.patch_fraction * v)
    if not mask.any():
        mask = torch.ones_like(mask)
    return mask


def refine_cam(trans: torch.Tensor, cam: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
    """CAM_refine = (T * 1 mask^T) @ cam (Eq. 10-11): columns outside zeroed.

    trans [N, N], cam [h, w], mask bool [h, w] -> [h, w].
    """
    masked = trans * mask.reshape(1, -1).to(trans.dtype)
    return (masked @ cam.reshape(-1, 1)).reshape(cam.shape)


# --------------------------------------------------------------------------
# Pseudo labels: PAR (WeCLIP)
# --------------------------------------------------------------------------


class PAR(nn.Module):
    """WeCLIP's pixel-adaptive refinement (PAR.py), SPEC §1.7.

    48 neighbours (8 directions x dilations) gathered with a one-hot 3x3
    kernel on replicate-padded maps; colour affinity
    -(|I_n - I| / (std_n(I_n) + 1e-8) / 0.3)^2 averaged over channels,
    position affinity -(d / std(d) / 0.3)^2, each softmaxed over the
    neighbours (std unbiased, as torch.std), aff = colour + 0.01 * position;
    `num_iter` rounds of mask <- sum_n aff_n * mask_n.
    """

    OFFSETS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))

    @classmethod
    def from_config(cls, cfg: RefConfig) -> PAR:
        """The PAR of a `RefConfig` (dilations, iterations, temperature,
        position weight)."""
        return cls(cfg.par_dilations, cfg.par_iters, cfg.par_temperature,
                   cfg.par_pos_weight)

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                 num_iter: int = 20, temperature: float = 0.3,
                 pos_weight: float = 0.01):
        super().__init__()
        self.dilations = tuple(dilations)
        self.num_iter = num_iter
        self.temperature = temperature
        self.pos_weight = pos_weight
        kernel = torch.zeros(8, 1, 3, 3)
        for i, (r, c) in enumerate(self.OFFSETS):
            kernel[i, 0, r, c] = 1.0
        self.register_buffer("kernel", kernel)
        step = [math.sqrt(2) if r != 1 and c != 1 else 1.0
                for r, c in self.OFFSETS]
        dist = torch.tensor([s * d for d in self.dilations for s in step])
        self.register_buffer("dist", dist.view(1, 1, -1, 1, 1))

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, 8 * len(dilations), H, W]."""
        b, c, h, w = x.shape
        out = []
        for d in self.dilations:
            padded = F.pad(x, [d] * 4, mode="replicate")
            padded = padded.reshape(b * c, 1, h + 2 * d, w + 2 * d)
            y = F.conv2d(padded, self.kernel, dilation=d)
            out.append(y.view(b, c, 8, h, w))
        return torch.cat(out, dim=2)

    def forward(self, images: torch.Tensor, masks: torch.Tensor
                ) -> torch.Tensor:
        """images [B, 3, H', W'] (normalised), masks [B, K, H, W]."""
        images = F.interpolate(images, size=masks.shape[-2:],
                               mode="bilinear", align_corners=True)
        nb = self.neighbours(images)
        diff = (nb - images.unsqueeze(2)).abs()
        std = nb.std(dim=2, keepdim=True)
        aff = -(diff / (std + 1e-8) / self.temperature) ** 2
        aff = aff.mean(dim=1, keepdim=True)
        pos_std = self.dist.std(dim=2, keepdim=True)
        pos_aff = -(self.dist / (pos_std + 1e-8) / self.temperature) ** 2
        aff = aff.softmax(dim=2) + self.pos_weight * pos_aff.softmax(dim=2)
        for _ in range(self.num_iter):
            masks = (self.neighbours(masks) * aff).sum(dim=2)
        return masks


def cams_to_labels(cams: torch.Tensor, cls_ids: torch.Tensor,
                   valid: torch.Tensor, cfg: RefConfig,
                   par: PAR | None = None,
                   image: torch.Tensor | None = None) -> torch.Tensor:
    """WeCLIP's `generate_cam_label` + `_refine_cams` for one image.

    Each CAM is scaled (scale_cam) and upsampled bilinearly
    (align_corners=False) to the crop; bg = (1 - max)^bg_power; PAR when
    given; argmax; channel j > 0 -> label id cls_ids[j - 1] + 1; 255 where
    `valid` is False. No present class: background everywhere.

    cams [K, h, w] (valid slots only), cls_ids [K], valid [H, W],
    image [3, H, W] normalised -> int64 [H, W].
    """
    size = tuple(valid.shape)
    if len(cls_ids) == 0:
        labels = torch.zeros(size, dtype=torch.long, device=valid.device)
    else:
        scaled = torch.stack([scale_cam(c) for c in cams])
        up = F.interpolate(scaled[None], size=size, mode="bilinear",
                           align_corners=False)[0]
        bg = (1 - up.max(dim=0, keepdim=True)[0]) ** cfg.bg_power
        scores = torch.cat([bg, up])
        if par is not None:
            with torch.no_grad():
                scores = par(image[None].float(), scores[None])[0]
        keys = torch.cat([cls_ids.new_zeros(1), cls_ids + 1])
        labels = keys[scores.argmax(dim=0)]
    return torch.where(valid, labels, torch.full_like(labels, IGNORE))


# --------------------------------------------------------------------------
# The pseudo-label path (SPEC §1 steps 1, 4, 6, 7)
# --------------------------------------------------------------------------


def _as_tensor(x, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x,
                           device=device)


def _refine_image(trans_by_kind: dict, cams: torch.Tensor,
                  clusters: torch.Tensor | None, valid: torch.Tensor,
                  step: tuple[bool, bool, str], cfg: RefConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined CAMs and column masks [K, h, w] of one image for one step."""
    use_clip, use_dino, mask_kind = step
    trans = trans_by_kind[(use_clip, use_dino)]
    refined, masks = [], []
    for cam in cams:
        if mask_kind == "superpixel":
            mask = superpixel_mask(cam, clusters, valid, cfg)
        elif mask_kind == "box":
            mask = box_mask(cam, cfg.box_threshold)
        elif mask_kind == "none":
            mask = torch.ones_like(cam, dtype=torch.bool)
        else:
            raise ValueError(f"mask {mask_kind!r}: use superpixel|box|none")
        masks.append(mask)
        refined.append(refine_cam(trans, cam, mask))
    return torch.stack(refined), torch.stack(masks)


def pseudo_labels(models: Models, batch: Mapping, cfg: RefConfig | None = None,
                  *, kmax: int | None = None, seeds: bool = True,
                  par: PAR | None = None) -> dict:
    """Encoders -> GradCAM -> SGC -> PAR -> label maps, per image (eager).

    Args:
        batch: "image" uint8 [B, H, W, 3], "valid" bool [B, H, W],
            "labels" multi-hot [B, C], "superpixels" int [B, H, W] (-1 pad);
            NumPy arrays or tensors.
        kmax: class slots K (default: the most classes of any image).
        seeds: also return the seed labels without PAR of `cfg.seed_steps`.
    Returns a dict:
        "cls_ids" int64 [B, K] (-1 padded), "cams" [B, K, h, w] initial
        GradCAM, "refined" [B, K, h, w] refined CAMs before min-max,
        "col_mask" bool [B, K, h, w] column mask used, "trans" [B, N, N]
        transition matrix, "clusters" int64 [B, H, W] colour cluster per
        pixel (-1 none; only with a superpixel mask, else None), "labels"
        int64 [B, H, W] pseudo labels (PAR), "seeds" {step name: int64
        [B, H, W]} (empty with seeds=False), and for the train step
        "hidden" [L - 1, B, N, D] block outputs 1..L-1 (CLS dropped, the
        decoder input), "tokens" [B, T, E]
        projected block-L tokens, "clip_attn" [L, B, T, T] and
        "dino_attn" [B, N, N].
    """
    cfg = cfg or RefConfig()
    device = models.text_fg.device
    images = _as_tensor(batch["image"], device)
    valid = _as_tensor(batch["valid"], device).bool()
    superpixels = np.asarray(torch.as_tensor(batch["superpixels"]).cpu())
    cls_ids = present_classes(_as_tensor(batch["labels"], "cpu"), kmax)
    b, height, width, _ = images.shape
    grid = (height // PATCH, width // PATCH)
    k_slots = cls_ids.shape[1]
    pixels = normalize_images(images, cfg.normalization)
    par = par or PAR(cfg.par_dilations, cfg.par_iters, cfg.par_temperature,
                     cfg.par_pos_weight).to(device)

    hidden, attns = clip_first_blocks(models.clip, pixels)
    # DINO keeps its own (ImageNet) normalisation whatever CLIP's is, as
    # ssr_jax does.
    d_attn = dino_attention(models.dino, normalize_images(images))
    if d_attn.shape[-1] != grid[0] * grid[1]:
        raise ValueError("DINO and CLIP token grids differ; both need "
                         f"patch size {PATCH}")
    steps = dict(cfg.seed_steps) if seeds else {}
    main_step = (cfg.use_clip_attn, cfg.use_dino_attn, cfg.mask)
    need_clusters = cfg.mask == "superpixel" or any(
        s is not None and s[2] == "superpixel" for s in steps.values())

    out = {
        "cls_ids": cls_ids,
        "cams": pixels.new_zeros((b, k_slots, *grid)),
        "refined": pixels.new_zeros((b, k_slots, *grid)),
        "col_mask": torch.zeros((b, k_slots, *grid), dtype=torch.bool,
                                device=device),
        "trans": pixels.new_zeros((b, grid[0] * grid[1],
                                   grid[0] * grid[1])),
        "clusters": None,
        "labels": torch.empty((b, height, width), dtype=torch.long,
                              device=device),
        "seeds": {name: torch.empty((b, height, width), dtype=torch.long,
                                    device=device) for name in steps},
    }
    clusters_all, tokens, attn_last = [], [], []
    for i in range(b):
        ids = [c for c in cls_ids[i].tolist() if c >= 0]
        k = len(ids)
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        cam_out = gradcam_image(models, hidden[-1][i:i + 1], ids, grid, cfg)
        cams = cam_out["cams"]
        tokens.append(cam_out["tokens"])
        attn_last.append(cam_out["attn"])
        clip_attn = [a[i] for a in attns] + [cam_out["attn"]]
        clusters = None
        if need_clusters:
            clusters = torch.from_numpy(colour_clusters(
                np.asarray(images[i].cpu()), superpixels[i],
                np.asarray(valid[i].cpu()), cfg)).to(device)
            clusters_all.append(clusters)
        trans_by_kind = {}
        for step in [main_step] + [s for s in steps.values() if s]:
            if step[:2] not in trans_by_kind:
                trans_by_kind[step[:2]] = compute_trans_mat(
                    fuse_affinity(clip_attn, d_attn[i], step[0], step[1],
                                  cfg), cfg.sinkhorn_iters)
        out["cams"][i, :k] = cams
        out["trans"][i] = trans_by_kind[main_step[:2]]
        with torch.no_grad():
            if k:
                refined, masks = _refine_image(trans_by_kind, cams, clusters,
                                               valid[i], main_step, cfg)
                out["refined"][i, :k] = refined
                out["col_mask"][i, :k] = masks
            out["labels"][i] = cams_to_labels(
                out["refined"][i, :k], ids_t, valid[i], cfg, par, pixels[i])
            for name, step in steps.items():
                if step is None or not k:
                    seed_cams = cams
                else:
                    seed_cams = _refine_image(trans_by_kind, cams, clusters,
                                              valid[i], step, cfg)[0]
                out["seeds"][name][i] = cams_to_labels(
                    seed_cams, ids_t, valid[i], cfg)
    if need_clusters:
        out["clusters"] = torch.stack(clusters_all)
    out["hidden"] = torch.stack([x[:, 1:] for x in hidden])
    out["tokens"] = torch.stack(tokens)
    out["clip_attn"] = torch.stack(
        attns + [torch.stack(attn_last)])
    out["dino_attn"] = d_attn
    return out


# --------------------------------------------------------------------------
# Losses and the train step (SPEC §1 steps 5, 8-10)
# --------------------------------------------------------------------------


def proto_loss(heads: CMPAHeads, tokens: torch.Tensor, cams: torch.Tensor,
               cls_ids: torch.Tensor, text_fg: torch.Tensor,
               tau_min: float = 0.01) -> torch.Tensor:
    """L_proto (Eq. 2-6) with the class index as the positive.

    f_image[b, k] = L2norm(sum_p cam[b, k, p] ISA(z[b, p]) /
    (sum_p cam[b, k, p] + 1e-6)), z the projected patch tokens (ISA in
    the module's current mode: batch statistics over all B * N tokens in
    training), the CAM detached; P_T = TSA(text_fg); logits =
    f_image @ P_T^T / tau, tau = max(exp(log_tau), tau_min); softmax CE
    against the class id, mean over every (image, present class) pair.

    tokens [B, T, E], cams [B, K, h, w], cls_ids [B, K] (-1 padded),
    text_fg [C, E] -> scalar (0 when no image has a class).
    """
    z = heads.isa(tokens[:, 1:])  # [B, N, d]
    p_t = heads.tsa(text_fg)  # [C, d]
    weights = cams.detach().flatten(2)  # [B, K, N]
    pooled = weights @ z / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    f_image = F.normalize(pooled, dim=-1)
    tau = heads.log_tau.exp().clamp(min=tau_min)
    logits = f_image @ p_t.T / tau  # [B, K, C]
    present = cls_ids.to(logits.device) >= 0
    if not present.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[present], cls_ids.to(logits.device)[present])


def balanced_seg_ce(logits: torch.Tensor, labels: torch.Tensor
                    ) -> torch.Tensor:
    """WeCLIP's seg loss, ExCEL-safe: 1/2 CE(bg pixels) + 1/2 CE(fg pixels).

    Logits [B, C, h, w] are upsampled bilinearly (align_corners=False) to
    the labels [B, H, W]; 255 ignored; each half divides by its pixel
    count + 1e-6, so a batch without foreground gives a finite loss.
    """
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                       align_corners=False)
    ce = F.cross_entropy(up, labels, ignore_index=IGNORE, reduction="none")
    bg = labels == 0
    fg = (labels != 0) & (labels != IGNORE)
    bg_loss = (ce * bg).sum() / (bg.sum() + 1e-6)
    fg_loss = (ce * fg).sum() / (fg.sum() + 1e-6)
    return 0.5 * (bg_loss + fg_loss)


class TrainStep:
    """One SSR iteration on a batch (SPEC §1), WeCLIP-style eager PyTorch.

    Frozen CLIP/DINO (no_grad except block 12's GradCAM graph), pseudo
    labels, decoder, L = L_proto + 0.1 L_seg, backward, AdamW step. The
    decoder group has lr x decoder_lr_mult; log tau has no weight decay.
    Constant learning rate (no warmup/poly: one call is one iteration).
    """

    def __init__(self, models: Models, cfg: RefConfig | None = None):
        self.models = models
        self.cfg = cfg = cfg or RefConfig()
        self.par = PAR.from_config(cfg).to(models.text_fg.device)
        heads = models.heads
        head_params = list(heads.isa.parameters()) + list(
            heads.tsa.parameters())
        self.optimizer = torch.optim.AdamW([
            {"params": list(models.decoder.parameters()),
             "lr": cfg.lr * cfg.decoder_lr_mult},
            {"params": head_params, "lr": cfg.lr},
            {"params": [heads.log_tau], "lr": cfg.lr, "weight_decay": 0.0},
        ], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=cfg.weight_decay)

    def __call__(self, batch: Mapping) -> dict:
        """Returns {"loss", "l_proto", "l_seg", "tau"} floats, "labels"."""
        models, cfg = self.models, self.cfg
        models.decoder.train()
        models.heads.train()
        pl = pseudo_labels(models, batch, cfg, seeds=False, par=self.par)
        grid = pl["cams"].shape[-2:]
        logits = models.decoder(pl["hidden"], tuple(grid))
        l_seg = balanced_seg_ce(logits, pl["labels"])
        l_proto = proto_loss(models.heads, pl["tokens"], pl["cams"],
                             pl["cls_ids"], models.text_fg, cfg.tau_min)
        loss = cfg.proto_weight * l_proto + cfg.seg_weight * l_seg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "l_proto": l_proto.item(),
                "l_seg": l_seg.item(),
                "tau": models.heads.log_tau.exp().item(),
                "labels": pl["labels"]}


# --------------------------------------------------------------------------
# Command line: time pseudo_labels and the train step on random weights
# --------------------------------------------------------------------------


def random_batch(batch_size: int, crop: int, num_fg: int, seed: int = 0,
                 n_segments: int = 100) -> dict:
    """Blobby random images, SLIC superpixels, 1-3 classes, a padded edge."""
    import skimage.segmentation

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (batch_size, crop // 32 + 1,
                                   crop // 32 + 1, 3)).astype(np.float32)
    zoom = crop / coarse.shape[1]
    images = np.stack([
        np.clip(scipy.ndimage.zoom(c, (zoom, zoom, 1), order=1)[:crop, :crop]
                + rng.normal(0, 8, (crop, crop, 3)), 0, 255)
        for c in coarse]).astype(np.uint8)
    valid = np.ones((batch_size, crop, crop), dtype=bool)
    valid[0, :, crop - crop // 5:] = False  # crop padding on one image
    images[~valid] = 0
    superpixels = np.full((batch_size, crop, crop), -1, dtype=np.int32)
    for i in range(batch_size):
        sp = skimage.segmentation.slic(images[i], n_segments=n_segments,
                                       compactness=10, start_label=0,
                                       mask=valid[i])
        superpixels[i] = np.where(valid[i], sp, -1)
    labels = np.zeros((batch_size, num_fg), dtype=np.float32)
    for i in range(batch_size):
        chosen = rng.choice(num_fg, size=1 + i % 3, replace=False)
        labels[i, chosen] = 1.0
    return {"image": images, "valid": valid, "labels": labels,
            "superpixels": superpixels}


def _timed(fn, iters: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(iters + 1):  # the first call is the warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.crop % PATCH:
        parser.error(f"--crop must be a multiple of {PATCH}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = make_models(args.size, args.seed, device)
    batch = random_batch(args.batch, args.crop, len(models.text_fg),
                         args.seed)
    step = TrainStep(models)
    pl_times = _timed(lambda: pseudo_labels(models, batch, seeds=False,
                                            par=step.par), args.iters, device)
    losses = []
    ts_times = _timed(lambda: losses.append(step(batch)["loss"]),
                      args.iters, device)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"device {device}, torch threads {torch.get_num_threads()}, size "
          f"{args.size}, batch {args.batch}, crop {args.crop}")
    print(f"pseudo_labels: median {statistics.median(pl_times):.3f} s "
          f"(runs {', '.join(f'{t:.3f}' for t in pl_times)})")
    print(f"train_step:    median {statistics.median(ts_times):.3f} s "
          f"(runs {', '.join(f'{t:.3f}' for t in ts_times)})")
    print(f"losses: {', '.join(f'{x:.4f}' for x in losses)}")
    print(f"peak RSS {rss_mb:.0f} MiB")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"peak CUDA memory allocated {peak:.0f} MiB")


if __name__ == "__main__":
    main()
