"""What benchmarks/peer_speed.py times against capnet: the peers' own model code, or a reference layout.

Peers (``--peers DIR`` holding checkouts ``LIFT/`` = shijxcs/LIFT and ``LMPT/`` = richard-peng-xia/LMPT,
fetched by the user; nothing here is vendored or imported at install):

* LIFT: ``models.models.PeftModelFromCLIP`` (``Peft_ViT`` + ``ViT_Tuner`` with AdaptFormer + its
  ``CosineClassifier``) over LIFT's vendored OpenAI ``clip.model.CLIP``.
* LMPT: ``lmpt/coop_model.CustomCLIP`` (class-specific CoOp prompts through the text tower every
  forward, frozen image tower). LMPT imports OpenAI's ``clip`` package without shipping it; the one
  shim is that it gets the OpenAI CLIP copy vendored in LIFT (``LIFT/clip``), put on ``sys.path`` here.

Both peers' CLIPs are built with the capnet backbone's architecture and load its (seeded random)
state dict: same weights, same shapes. Without ``--peers`` the peer column is a reference layout
written here: plain pre-norm blocks with one contiguous q/k/v GEMM over the same tower weights
(batch-first), LIFT-style adapters and cosine head, CoOp-style prompts through the full 77 tokens.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LIFT_FILES = ("models/peft_vit.py", "clip/model.py")
LMPT_FILES = ("lmpt/coop_model.py",)


class Peers(SimpleNamespace):
    """The imported peer modules: ``clip`` (LIFT's OpenAI CLIP), ``lift`` (LIFT's models), ``lmpt``."""


def load_peers(root: Path) -> Peers:
    """Import LIFT's and LMPT's model code from ``root/LIFT`` and ``root/LMPT`` (SystemExit naming what is missing)."""
    root = Path(root).expanduser().resolve()
    for name, files in (("LIFT", LIFT_FILES), ("LMPT", LMPT_FILES)):
        missing = [f for f in files if not (root / name / f).is_file()]
        if missing:
            raise SystemExit(f"peer_speed: --peers {root}: {name}/{missing[0]} not found; clone "
                             f"{'shijxcs/LIFT' if name == 'LIFT' else 'richard-peng-xia/LMPT'} into {root / name}")
    taken = [m for m in ("clip", "models") if m in sys.modules and not _from(sys.modules[m], root)]
    if taken:
        raise SystemExit(f"peer_speed: module(s) {taken} already imported from elsewhere; run in a fresh process")
    sys.path[:0] = [str(root / "LIFT"), str(root / "LMPT" / "lmpt")]
    clip = importlib.import_module("clip")  # LIFT's vendored OpenAI CLIP; LMPT's `import clip` gets it too
    lift = importlib.import_module("models.models")
    lmpt = importlib.import_module("coop_model")
    return Peers(root=root, clip=clip, clip_model=importlib.import_module("clip.model"), lift=lift, lmpt=lmpt)


def _from(module: ModuleType, root: Path) -> bool:
    """Whether ``module`` was imported from under ``root``."""
    return str(getattr(module, "__file__", "") or "").startswith(str(root))


# ------------------------------------------------------------------ peers' CLIP, capnet's weights
def openai_clip(peers: Peers, cfg: Dict[str, Any], state: Dict[str, torch.Tensor]) -> nn.Module:
    """LIFT's ``clip.model.CLIP`` with the architecture of open_clip config ``cfg`` and capnet's weights."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    tiny_vit = isinstance(v["layers"], int) and v["width"] < 64  # OpenAI's CLIP derives heads = width // 64
    model = peers.clip_model.CLIP(
        cfg["embed_dim"], v["image_size"], v["layers"], 64 if tiny_vit else v["width"], v.get("patch_size"),
        t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"])
    if tiny_vit:  # quick mode only: the same class with open_clip's head count
        model.visual = peers.clip_model.VisionTransformer(v["image_size"], v["patch_size"], v["width"], v["layers"],
                                                          v["width"] // v.get("head_width", 64), cfg["embed_dim"])
    keys = set(model.state_dict())
    missing = keys - set(state)
    if missing:
        raise SystemExit(f"peer_speed: capnet's state dict lacks {sorted(missing)[:3]} for the peers' CLIP")
    model.load_state_dict({k: v for k, v in state.items() if k in keys}, strict=True)
    return model.float().eval()


class _Cfg(dict):
    """LIFT reads its config as attributes (absent flags: None) and passes it to the head as **kwargs."""

    __getattr__ = dict.get


def lift_model(peers: Peers, clip_model: nn.Module, num_classes: int, adapter_dim: int, vit: bool = True) -> nn.Module:
    """LIFT's PeftModelFromCLIP with AdaptFormer of width ``adapter_dim`` and its CosineClassifier."""
    cfg = _Cfg(backbone="CLIP-ViT-B/16" if vit else "CLIP-RN50", classifier="CosineClassifier",
               adaptformer=True, adapter_dim=adapter_dim, scale=30)
    model = peers.lift.PeftModelFromCLIP(cfg, clip_model, num_classes)
    model.requires_grad_(False)
    for part in (model.tuner, model.head):  # LIFT's build_optimizer: only tuner + head
        part.requires_grad_(True)
    return model


def lift_parameters(model: nn.Module) -> List[nn.Parameter]:
    """What LIFT's optimiser takes: tuner then head."""
    return list(model.tuner.parameters()) + list(model.head.parameters())


def lmpt_model(peers: Peers, clip_model: nn.Module, class_names: Sequence[str], n_ctx: int) -> nn.Module:
    """LMPT's CustomCLIP with class-specific random-init contexts (their train.sh: ctx_init '', csc)."""
    args = SimpleNamespace(ctx_init="", n_ctx=n_ctx, csc=True, class_token_position="end")
    model = peers.lmpt.CustomCLIP(args, list(class_names), clip_model)
    for name, param in model.named_parameters():  # LMPT's train.py: only the prompt learner
        param.requires_grad_("prompt_learner" in name)
    return model


# ----------------------------------------------------------------------- reference layout
def plain_blocks(x: torch.Tensor, blocks: Sequence[nn.Module], mask: Optional[torch.Tensor] = None,
                 adapters: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
    """Pre-norm transformer blocks over open_clip block weights: batch-first (B, L, D), one q/k/v GEMM."""
    for i, blk in enumerate(blocks):
        attn = blk.attn
        bsz, length, dim = x.shape
        heads = attn.num_heads
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(bsz, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + F.linear(a.transpose(1, 2).reshape(bsz, length, dim), attn.out_proj.weight, attn.out_proj.bias)
        h = blk.ln_2(x)
        y = blk.mlp.c_proj(blk.mlp.gelu(blk.mlp.c_fc(h)))
        if adapters is not None:
            y = y + adapters[i](x)
        x = x + y
    return x


class Adapter(nn.Module):
    """LIFT-style AdaptFormer branch: LN -> down -> ReLU -> up (zero-init) -> * scale."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1) -> None:
        super().__init__()
        self.ln, self.down, self.up = nn.LayerNorm(dim), nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d) adapter branch."""
        return self.up(torch.relu(self.down(self.ln(x)))) * self.scale


def reference_image(visual: nn.Module, images: torch.Tensor, adapters: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
    """open_clip ViT forward (conv stem, class token, ln_pre, blocks, ln_post, proj) with ``plain_blocks``."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    x = plain_blocks(x, visual.transformer.resblocks, adapters=adapters)
    return visual.ln_post(x[:, 0]) @ visual.proj


class ReferenceViT(nn.Module):
    """A frozen ViT in the reference layout + adapters + cosine head (what LIFT trains)."""

    def __init__(self, visual: nn.Module, num_classes: int, bottleneck: Optional[int]) -> None:
        super().__init__()
        self.visual = visual.requires_grad_(False)
        width = visual.transformer.width
        self.adapters = None if bottleneck is None else nn.ModuleList(
            Adapter(width, bottleneck) for _ in visual.transformer.resblocks)
        self.head = nn.Parameter(torch.randn(num_classes, visual.output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) scaled cosine logits."""
        feats = F.normalize(reference_image(self.visual, images, self.adapters).float(), dim=-1)
        return 30.0 * feats @ F.normalize(self.head, dim=-1).t()

    def trainable(self) -> List[nn.Parameter]:
        """Adapters and head (what LIFT's optimiser takes)."""
        return [p for p in self.parameters() if p.requires_grad]


class ReferencePrompts(nn.Module):
    """CoOp class-specific prompts (random init) through the full 77-token text tower, every forward."""

    def __init__(self, backbone: nn.Module, class_names: Sequence[str], n_ctx: int) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        tokens = backbone.tokenize([" ".join(["X"] * n_ctx) + " " + n + "." for n in class_names])
        with torch.no_grad():
            emb = backbone.embed_tokens(tokens)
        self.register_buffer("prefix", emb[:, :1].clone())
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone())
        self.register_buffer("tokens", tokens)
        self.ctx = nn.Parameter(torch.randn(len(class_names), n_ctx, emb.shape[-1]) * 0.02)
        length = tokens.shape[1]
        self.register_buffer("mask", torch.full((length, length), float("-inf")).triu(1))
        self.vit = hasattr(backbone.visual, "transformer")

    def class_embeddings(self) -> torch.Tensor:
        """(C, D) text features of the prompts (LMPT's TextEncoder, batch-first)."""
        b = self.backbone
        x = torch.cat([self.prefix, self.ctx, self.suffix], dim=1) + b.positional_embedding.to(self.ctx.dtype)
        x = b.ln_final(plain_blocks(x, b.transformer.resblocks, mask=self.mask))
        return x[torch.arange(x.shape[0]), self.tokens.argmax(-1)] @ b.text_projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) logits; the text tower runs every call, as in LMPT."""
        visual = self.backbone.visual
        image = reference_image(visual, images) if self.vit else visual(images)
        image, text = F.normalize(image.float(), dim=-1), F.normalize(self.class_embeddings().float(), dim=-1)
        return self.backbone.logit_scale.exp() * image @ text.t()

    def trainable(self) -> List[nn.Parameter]:
        """The class-specific contexts."""
        return [self.ctx]


def count(params: Sequence[nn.Parameter]) -> int:
    """Trainable scalars (shared tensors once)."""
    return sum({id(p): p.numel() for p in params if p.requires_grad}.values())

