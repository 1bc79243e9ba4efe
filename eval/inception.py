"""Inception-v3 in the FID layout (the network of pytorch-fid / torch-fidelity / TF `inception-2015-12-05`).

The FID network is not torchvision's ImageNet Inception: its weights were converted from the 2015 TensorFlow
graph, its classifier has 1008 outputs, and four kinds of block differ from torchvision's:
  * Mixed_5b/5c/5d (A) and Mixed_6b..6e (C) and Mixed_7b (E_1) average-pool *without* counting the padding
    (TF's "SAME" average pooling divides by the number of valid pixels);
  * Mixed_7c (E_2) max-pools in its pool branch (a quirk of the TF graph).
Everything else (conv + BN(eps=1e-3) + ReLU units, reduction blocks B/D) is torchvision's, reused as-is.

Outputs, from one forward pass:
  * "pool"    (B, 2048): global average pool after Mixed_7c, the FID / KID / precision-recall features;
  * "spatial" (B, 2023): sFID features: the first 7 channels of Mixed_6d's 1x1 branch (TF `mixed_6/conv`),
    17x17, flattened in TF's (H, W, C) order so that statistics are comparable with ADM's reference batches;
  * "logits"  (B, 1008): pool @ fc.weight.T *without the bias*, the Inception Score convention of ADM's
    evaluator and torch-fidelity (they read the MatMul before the bias add of the TF graph).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from eval.resize import FID_MODES, RESIZE_DESCRIPTIONS, clean_resize_bicubic, tf1_resize_bilinear, torch_resize_bilinear
from training.atomic import file_sha256

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_HELP = (
    f"The FID Inception weights are the file {FID_WEIGHTS_NAME} (a PyTorch state dict converted from TensorFlow's "
    f"inception-2015-12-05 graph), published as a release asset of the pytorch-fid project on GitHub "
    f"(mseitzer/pytorch-fid, release 'fid_weights'). This toolkit never downloads it: fetch it once on a machine "
    f"with internet access, copy it here and pass its path with --inception PATH (or InceptionFeatures.from_file(PATH))."
)
NUM_CLASSES_FID = 1008
SPATIAL_CHANNELS = 7  # ADM's sFID keeps mixed_6/conv[..., :7]


class FIDInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b5, b3, pool]


class FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b7, b7d, pool]


class FIDInceptionE(InceptionE):
    """E_1 (Mixed_7b, max_pool=False) and E_2 (Mixed_7c, max_pool=True) differ only in the pool branch."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = (F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool
                  else F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """Module names follow torchvision's Inception3 so the pt_inception state dict loads with strict matching."""

    def __init__(self, num_classes: int = NUM_CLASSES_FID):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        """x in [-1, 1] at 299x299 -> {"pool", "spatial", "logits"}."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x_B3HW)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d._forward(x)  # branch 0 is the 1x1 conv = TF mixed_6/conv (after BN + ReLU)
        spatial_BHWC = rearrange(branches[0][:, :SPATIAL_CHANNELS], "b c h w -> b h w c")
        x = torch.cat(branches, 1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool_BC = x.mean(dim=(2, 3))
        return {"pool": pool_BC, "spatial": spatial_BHWC.flatten(1),
                "logits": pool_BC @ self.fc.weight.T}


class InceptionFeatures(nn.Module):
    """FeatureNetwork: images (B, 3, H, W) float in [0, 1] (any size) -> pool / spatial / logits.

    The FID mode picks the input path in front of the same network (see eval.resize):
      * "recompute" (default here): pytorch-fid's: torch bilinear resize to 299 with half-pixel centres,
        then 2x - 1; values match pytorch-fid;
      * "adm": the TF graph's (ADM evaluator, torch-fidelity): pixels in [0, 255], TF1 resize_bilinear
        without half-pixel centres, then (x - 128) / 128;
      * "clean": clean-fid's: PIL bicubic per channel on float pixels, then (x - 128) / 128.
    """

    name = "inception-v3-fid"
    feature_names = ("pool", "spatial", "logits")
    feature_dims = {"pool": 2048, "spatial": SPATIAL_CHANNELS * 17 * 17, "logits": NUM_CLASSES_FID}

    def __init__(self, net: FIDInceptionV3 | None = None, weights_sha256: str | None = None, channels_last: bool = True,
                 mode: str = "recompute"):
        super().__init__()
        if mode not in FID_MODES:
            raise ValueError(f"unknown FID mode {mode!r}; choose one of {', '.join(FID_MODES)}")
        self.net = net if net is not None else FIDInceptionV3()
        self.weights_sha256 = weights_sha256
        self.fid_mode = mode
        self.resize = RESIZE_DESCRIPTIONS[mode]
        # NHWC lets oneDNN / cuDNN pick faster conv kernels (1.4x on CPU, see benchmarks/results/bench_features_*.json);
        # features change only by float reassociation (~1e-5 absolute)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path | None, device: str | torch.device = "cpu",
                  mode: str = "recompute") -> "InceptionFeatures":
        return cls(*load_fid_inception(path), mode=mode).to(device).eval()

    def with_mode(self, mode: str) -> "InceptionFeatures":
        """The same network (shared weights) behind another input path."""
        return InceptionFeatures(self.net, self.weights_sha256, self.memory_format == torch.channels_last, mode)

    def preprocess(self, img_B3HW_01: torch.Tensor) -> torch.Tensor:
        if img_B3HW_01.ndim != 4 or img_B3HW_01.shape[1] != 3:
            raise ValueError(f"Inception expects images (B, 3, H, W), got {tuple(img_B3HW_01.shape)}")
        x = img_B3HW_01.float()
        if self.fid_mode == "recompute":
            if x.shape[-2:] != (299, 299):
                x = torch_resize_bilinear(x)
            return 2 * x - 1
        # the TF graph and clean-fid take pixels in [0, 255] and normalise with 128, not 127.5
        x255 = x * 255
        x255 = tf1_resize_bilinear(x255) if self.fid_mode == "adm" else clean_resize_bicubic(x255)
        return (x255 - 128) / 128

    def forward(self, img_B3HW_01: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(self.preprocess(img_B3HW_01).contiguous(memory_format=self.memory_format))


def load_fid_inception(path: str | Path | None) -> tuple[FIDInceptionV3, str]:
    """Build the FID Inception from a local state-dict file; returns (network, sha256 of the file)."""
    if path is None or not Path(path).is_file():
        where = "no path was given" if path is None else f"{path} does not exist"
        raise FileNotFoundError(f"FID Inception weights not found ({where}). {FID_WEIGHTS_HELP}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for foreign / truncated files
        raise ValueError(f"{path} is not a readable PyTorch state dict ({err}). {FID_WEIGHTS_HELP}") from err
    if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or "fc.weight" not in state_dict:
        raise ValueError(f"{path} does not hold an Inception-v3 state dict (no 'fc.weight'). {FID_WEIGHTS_HELP}")
    num_classes = state_dict["fc.weight"].shape[0]
    if num_classes != NUM_CLASSES_FID:
        raise ValueError(f"{path} has a {num_classes}-class classifier; the FID network has {NUM_CLASSES_FID} "
                         f"(torchvision's ImageNet Inception is a different network and gives other FID values). "
                         f"{FID_WEIGHTS_HELP}")
    net = FIDInceptionV3(num_classes)
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the FID Inception layout: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}. {FID_WEIGHTS_HELP}")
    return net.eval(), file_sha256(path)


def random_fid_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights with non-trivial BN statistics: for architecture tests and benchmarks only."""
    gen = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue  # num_batches_tracked
            if t.ndim > 1:  # He init keeps activations O(1) through 90+ layers
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var") or name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:  # BN / fc bias, running_mean
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return net.eval()
