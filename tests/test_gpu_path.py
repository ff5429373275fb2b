"""The GPU path's settings, checked where there is no GPU: what `auto` resolves to on a CPU,
a CUDA device asked for where there is none, and the bf16-autocast + channels_last code path
(which CUDA runs by default) exercised on the CPU, where torch supports both."""

from __future__ import annotations

import math

import pytest
import torch

from geco.errors import ConfigError
from geco.train.loop import fit, make_stage
from geco.train.runtime import Runtime, RuntimeConfig, init_runtime

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


@needs_no_cuda
def test_auto_settings_fall_back_to_fp32_on_the_cpu():
    rt = init_runtime(RuntimeConfig())
    assert rt.device.type == "cpu" and rt.amp_dtype is None and not rt.channels_last
    # bf16 asked for on a CPU: fp32, with a warning (CPU bf16 is slower, not faster).
    assert init_runtime(RuntimeConfig(amp="bf16")).amp_dtype is None


@needs_no_cuda
def test_a_cuda_device_where_there_is_none_is_refused_by_name():
    with pytest.raises(ConfigError, match="runtime.device=cuda:1: no CUDA device"):
        init_runtime(RuntimeConfig(device="cuda:1"))


def _short_fit(stage_name, cfg, rt, run_dir, generator=None):
    stage = make_stage(stage_name, cfg, rt, run_dir, generator=generator)
    fit(stage, rt, run_dir, resume=False)
    return stage


def test_bf16_autocast_and_channels_last_train_both_stages(synth_small, tiny, tmp_path):
    """The CUDA defaults (bf16 autocast, channels_last inputs and weights) on the CPU: both
    stages train, the losses stay finite and close to fp32's, the master weights stay fp32."""
    cfg = tiny(synth_small, "cigm.max_steps_per_epoch=3", "geco.max_steps_per_epoch=3",
               "data.image_size=32")
    runs = {}
    for name, rt in (("fp32", Runtime(torch.device("cpu"), 0, 1, 0, None, False)),
                     ("bf16", Runtime(torch.device("cpu"), 0, 1, 0, torch.bfloat16, True))):
        torch.manual_seed(0)
        cigm = _short_fit("cigm", cfg, rt, tmp_path / name)
        geco = _short_fit("geco", cfg, rt, tmp_path / name,
                          generator=tmp_path / name / "cigm" / "last.pt")
        history = [torch.load(tmp_path / name / s / "last.pt", weights_only=True)["history"][-1]
                   for s in ("cigm", "geco")]
        for module in [*cigm.modules, *geco.modules]:
            assert all(p.dtype == torch.float32 for p in module.parameters())
        runs[name] = history
    (c32, g32), (c16, g16) = runs["fp32"], runs["bf16"]
    for a, b in ((c32["train_g_l1"], c16["train_g_l1"]), (g32["train_loss"], g16["train_loss"])):
        assert math.isfinite(b) and abs(a - b) <= 0.1 * abs(a) + 0.05, (a, b)
    assert g32["train_loss"] != g16["train_loss"]  # autocast really ran in bf16


def test_decoding_on_the_device_trains_like_decoding_on_the_cpu(synth_small, tiny, tmp_path):
    """data.decode=device (what a GPU node with few CPUs uses: nvJPEG there, libjpeg on this
    CPU): both stages train from shards with JPEG bytes decoded in the training loop, and
    their losses stay close to those of the CPU decoding path (same rows, same order)."""
    from geco.data.images import ImageFolder
    from geco.data.shards import ShardSpec, write_shards
    from geco.data.splits import load_splits, resolve_layout

    layout = resolve_layout(synth_small)
    write_shards(load_splits(layout), ImageFolder(layout.img_dir), tmp_path / "shards",
                 ShardSpec(image_size=32, samples_per_shard=50), source="synth_small")
    rt = Runtime(torch.device("cpu"), 0, 1, 0, None, False)
    runs = {}
    for mode in ("cpu", "device"):
        cfg = tiny(tmp_path / "nowhere", f"data.shards={tmp_path / 'shards'}",
                   f"data.decode={mode}", "data.image_size=32", "data.num_workers=2",
                   "cigm.max_steps_per_epoch=3", "geco.max_steps_per_epoch=3")
        torch.manual_seed(0)
        _short_fit("cigm", cfg, rt, tmp_path / mode)
        _short_fit("geco", cfg, rt, tmp_path / mode, generator=tmp_path / mode / "cigm" / "last.pt")
        runs[mode] = [torch.load(tmp_path / mode / s / "last.pt", weights_only=True)["history"][-1]
                      for s in ("cigm", "geco")]
    (c_cpu, g_cpu), (c_dev, g_dev) = runs["cpu"], runs["device"]
    assert c_dev["skipped_samples"] == g_dev["skipped_samples"] == 0
    assert c_dev["samples"] == c_cpu["samples"] and g_dev["samples"] == g_cpu["samples"]
    for a, b in ((c_cpu["train_g_l1"], c_dev["train_g_l1"]),
                 (g_cpu["train_loss"], g_dev["train_loss"])):
        assert math.isfinite(b) and abs(a - b) <= 0.05 * abs(a) + 0.02, (a, b)


def test_a_device_without_a_working_jpeg_decoder_is_refused_by_name(monkeypatch):
    """The decoder is chosen per device by decoding a probe: one that fails there (TorchCodec
    built without CUDA, say) gives way to the next; none working is a clear error."""
    from geco.data import jpeg
    from geco.errors import GecoError

    def broken(*a, **kw):
        raise RuntimeError("built without CUDA support")

    monkeypatch.setattr(jpeg, "_DECODERS", {})
    real = jpeg._candidates()[-1]
    monkeypatch.setattr(jpeg, "_candidates", lambda: [("first", broken), real])
    assert jpeg._decoder(torch.device("cpu")) is real[1]
    monkeypatch.setattr(jpeg, "_DECODERS", {})
    monkeypatch.setattr(jpeg, "_candidates", lambda: [("first", broken)])
    with pytest.raises(GecoError, match="no JPEG decoder works on cpu.*first: RuntimeError: built"):
        jpeg._decoder(torch.device("cpu"))
