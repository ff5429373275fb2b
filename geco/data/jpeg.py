"""Decode training images on the training device (`data.decode: device`).

On a GPU node with few CPUs per GPU the shard reader's JPEG decoding is what limits
throughput. With `decode: device` the shard stream leaves each image as its JPEG bytes
(a `JpegBatch`, pinned by the DataLoader like any tensor) and the training loop decodes the
whole batch where it trains, in one batched call: nvJPEG on a GPU, libjpeg-turbo on a CPU.
The decoder is TorchCodec's `decode_jpeg` (a dependency; torchvision 0.29 deprecated its own
in its favour) where it decodes on the device, else `torchvision.io.decode_jpeg` (PyPI's
TorchCodec wheel may lack CUDA while torchvision's has nvJPEG): each device's decoder is
chosen once by decoding a tiny JPEG on it, and the choice is logged. The batch is then resized (bicubic, antialiased) if it is not
already at the training size — shards written by `geco data shard` already are — and
normalised exactly as the CPU path normalises its uint8 images.

Bad input keeps the stream's contract: an image that fails to decode is named (shard URL,
sample key, field) in a DataError, or in skip mode its row is dropped from the batch and
counted as skipped. The stream has already decoded anything that is not a JPEG (by its
magic bytes) on the CPU, so only damaged JPEG bodies surface here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from geco.errors import DataError, GecoError

log = logging.getLogger("geco")

JPEG_MAGIC = b"\xff\xd8"


@dataclass
class JpegBatch:
    """The images of one batch field, undecoded.

    data[i] is either a 1-D uint8 tensor of JPEG bytes or an already decoded HxWx3 uint8
    tensor (what the stream decoded on the CPU); names[i] says where image i came from."""

    data: list[Tensor]
    names: list[str]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    on_bad: str = "error"

    def __len__(self) -> int:
        return len(self.data)

    def pin_memory(self) -> JpegBatch:  # called by the DataLoader's pin-memory thread
        return JpegBatch([d.pin_memory() for d in self.data], self.names, self.size,
                         self.mean, self.std, self.on_bad)

    def decode(self, device: torch.device) -> tuple[Tensor, list[int]]:
        """(N×3×S×S float32 on `device`, normalised; indices of images that failed). Failed
        images leave zeros in their row; in error mode the first failure raises."""
        images = _decode_all(self.data, device)
        bad = [i for i, im in enumerate(images) if isinstance(im, str)]
        for i in bad:
            err = DataError(f"{self.names[i]}: cannot decode on {device}: {images[i]}")
            if self.on_bad == "error":
                raise err
            log.warning("skipping sample: %s", err)
        s = self.size
        out = torch.zeros((len(images), 3, s, s), dtype=torch.float32, device=device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            if not isinstance(im, str):
                by_shape.setdefault(tuple(im.shape), []).append(i)
        for shape, idx in by_shape.items():
            x = torch.stack([images[i] for i in idx]).to(torch.float32)
            if shape[-2:] != (s, s):
                # Round to uint8 levels as the CPU path's PIL resize does.
                x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True,
                                  align_corners=False).clamp_(0, 255).round_()
            out[idx] = x
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return out.div_(255).sub_(mean).div_(std), bad


_DECODERS: dict[str, Callable[..., Any]] = {}


def _candidates() -> list[tuple[str, Callable[..., Any]]]:
    import warnings

    out = []
    try:
        from torchcodec.decoders import decode_jpeg as codec
        out.append(("torchcodec", codec))
    except ImportError:  # torchcodec's native library missing or not installed
        pass
    from torchvision.io import decode_jpeg as vision

    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of "
                            "TorchVision are deprecated", DeprecationWarning)
    out.append(("torchvision", vision))
    return out


def _decoder(device: torch.device) -> Callable[..., Any]:
    """The first JPEG decoder that decodes on `device` (probed once per device)."""
    key = str(device)
    if key in _DECODERS:
        return _DECODERS[key]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    probe = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    tried = []
    for name, fn in _candidates():
        try:
            fn([probe], mode="RGB", device=device)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            tried.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        log.info("data.decode=device: JPEGs decoded on %s by %s", device, name)
        _DECODERS[key] = fn
        return fn
    raise GecoError(f"data.decode=device: no JPEG decoder works on {device} "
                    f"({'; '.join(tried)}); use data.decode=cpu")


def _decode_all(data: list[Tensor], device: torch.device) -> list[Tensor | str]:
    """Each image as a 3×H×W uint8 tensor on `device`, or the error message for one that
    failed. One batched decode call, per image only when the batch call fails."""
    decode_jpeg = _decoder(device)
    raw = [i for i, d in enumerate(data) if d.dim() == 1]
    out: list[Tensor | str] = [d.permute(2, 0, 1).to(device, non_blocking=True)
                               if d.dim() == 3 else "" for d in data]
    if not raw:
        return out
    try:
        decoded = decode_jpeg([data[i] for i in raw], mode="RGB", device=device)
    except RuntimeError:
        decoded = []
        for i in raw:
            try:
                decoded.append(decode_jpeg(data[i], mode="RGB", device=device))
            except RuntimeError as exc:
                # TorchCodec prefixes its C++ location: keep the reason at the end.
                why = str(exc).splitlines()[0].rsplit(", ", 1)[-1] if str(exc) else ""
                decoded.append(why or type(exc).__name__)
    for i, im in zip(raw, decoded, strict=True):
        out[i] = im
    return out


def decode_batch(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, Any] | None, int]:
    """Decode every JpegBatch field of a training batch on `device`; rows with any image
    that failed (skip mode) are dropped from every field. Returns (batch, rows dropped);
    batch is None when no row is left. A batch without JpegBatch fields is returned as is."""
    fields = [k for k, v in batch.items() if isinstance(v, JpegBatch)]
    if not fields:
        return batch, 0
    n = len(batch[fields[0]])
    bad: set[int] = set()
    for k in fields:
        batch[k], failed = batch[k].decode(device)
        bad.update(failed)
    if not bad:
        return batch, 0
    keep = [i for i in range(n) if i not in bad]
    if not keep:
        return None, n
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
            batch[k] = v[torch.as_tensor(keep, device=v.device)]
        elif isinstance(v, list) and len(v) == n:
            batch[k] = [v[i] for i in keep]
    return batch, len(bad)
