"""PyTorch mirrors of jaxrep's MLP and CNN, for the throughput baseline.

`build(name, num_classes, input_shape)` returns an `nn.Sequential` with the same
layers and parameter count as `jaxrep.models.get_model(name, ...)`;
`load_flax_params(module, params)` copies a flax parameter tree into it, so the
PyTorch baseline trains the very same checkpoint. Inputs are NCHW for the CNN
and flat [B, H*W*C] (flattened in NHWC order, as flax does) for the MLP.

Only imported when torch is installed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class _ToNHWC(nn.Module):
  """NCHW -> NHWC, so that Flatten matches flax's reshape order."""

  def forward(self, x):
    return x.permute(0, 2, 3, 1)


def build(name: str, num_classes: int, input_shape) -> nn.Sequential:
  """The PyTorch mirror of jaxrep model `name` ("mlp" or "cnn")."""
  h, w, c = input_shape
  if name == "mlp":
    # jaxrep.models.MLP: hidden (256, 256), ReLU.
    return nn.Sequential(
        nn.Linear(h * w * c, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, num_classes))
  if name == "cnn":
    # jaxrep.models.CNN: conv5x5 SAME 16 / 32, each + ReLU + 2x2 max-pool
    # (pool only while the map is at least 2x2), dense 128, 64, classes.
    layers: list[nn.Module] = []
    for ch in (16, 32):
      layers += [nn.Conv2d(c, ch, 5, padding=2), nn.ReLU()]
      c = ch
      if h >= 2 and w >= 2:
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    layers += [_ToNHWC(), nn.Flatten()]
    width = h * w * c
    for hidden in (128, 64):
      layers += [nn.Linear(width, hidden), nn.ReLU()]
      width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
  raise ValueError(f"no PyTorch mirror for model {name!r}")


def num_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def load_flax_params(module: nn.Sequential, params) -> None:
  """Copies flax params (Conv_i / Dense_i, in order) into the mirror."""
  convs = sorted((k for k in params if k.startswith("Conv_")),
                 key=lambda k: int(k.split("_")[1]))
  denses = sorted((k for k in params if k.startswith("Dense_")),
                  key=lambda k: int(k.split("_")[1]))
  torch_convs = [m for m in module if isinstance(m, nn.Conv2d)]
  torch_denses = [m for m in module if isinstance(m, nn.Linear)]
  if len(convs) != len(torch_convs) or len(denses) != len(torch_denses):
    raise ValueError("flax and PyTorch layer lists differ")
  with torch.no_grad():
    for key, layer in zip(convs, torch_convs):
      kernel = np.asarray(params[key]["kernel"])           # HWIO
      layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
      layer.bias.copy_(torch.from_numpy(np.array(params[key]["bias"])))
    for key, layer in zip(denses, torch_denses):
      kernel = np.asarray(params[key]["kernel"])           # [in, out]
      layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
      layer.bias.copy_(torch.from_numpy(np.array(params[key]["bias"])))


def to_input(name: str, x_nhwc: np.ndarray) -> torch.Tensor:
  """Images [B, H, W, C] -> the mirror's input layout."""
  if name == "mlp":
    return torch.from_numpy(np.ascontiguousarray(
        x_nhwc.reshape(x_nhwc.shape[0], -1)))
  return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
