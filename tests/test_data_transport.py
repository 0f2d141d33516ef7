"""engine.data speed paths give the results of the straightforward ones: down-mix, signal checks, packed
batches (one shared buffer per worker batch), worker vs in-process loading, the step reading lengths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_helpers import make_args, write
from engine.data import build_datasets, build_loader, collate
from engine.data.audio import check_signal, downmix, load_audio, normalize, read_mono
from engine.data.errors import SKIP_NONFINITE, SKIP_SILENT, BadAudio
from engine.data.loader import pack, unpack

SR = 16000


@pytest.mark.parametrize("channels", [2, 3, 6])
def test_downmix_is_bit_identical_to_the_channel_mean(channels):
    data = np.random.default_rng(channels).standard_normal((20_011, channels)).astype(np.float32)
    assert np.array_equal(downmix(data), data.mean(axis=1, dtype=np.float32))


def test_stereo_file_decodes_to_the_mean_of_its_channels(tmp_path):
    import soundfile as sf
    path = write(tmp_path / "s.flac", 0.7, sr=22050, channels=2)
    x, sr = read_mono(path)
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    assert sr == 22050 and x.flags.c_contiguous and np.array_equal(x, data.mean(axis=1, dtype=np.float32))


@pytest.mark.parametrize("bad,reason", [(np.nan, SKIP_NONFINITE), (np.inf, SKIP_NONFINITE),
                                        (-np.inf, SKIP_NONFINITE)])
def test_check_signal_reasons(bad, reason):
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    check_signal(x)
    for where in (0, 500, 999):
        y = x.copy()
        y[where] = bad
        with pytest.raises(BadAudio) as exc:
            check_signal(y)
        assert exc.value.reason == reason
    const = np.full(100, 0.3, np.float32)
    with pytest.raises(BadAudio, match=SKIP_SILENT):
        check_signal(const)
    const[3] = np.nan   # NaN wins over "silent", as before
    with pytest.raises(BadAudio, match=SKIP_NONFINITE):
        check_signal(const)


def reference_collate(items, pad_to_multiple_of=None, mask_dtype=torch.long):
    """The collate of before packing: separate zero-padded tensors."""
    items = [it for it in items if it is not None]
    lengths = [len(it["input_values"]) for it in items]
    seq = max(lengths, default=0)
    if pad_to_multiple_of and seq % pad_to_multiple_of:
        seq += pad_to_multiple_of - seq % pad_to_multiple_of
    values = torch.zeros(len(items), seq)
    mask = torch.zeros(len(items), seq, dtype=mask_dtype)
    for row, (it, n) in enumerate(zip(items, lengths)):
        values[row, :n] = torch.from_numpy(it["input_values"])
        mask[row, :n] = 1
    return {"input_values": values, "attention_mask": mask, "ids": [it["id"] for it in items],
            "padded": any(n != seq for n in lengths)}


def same_batch(a, b):
    assert a["ids"] == b["ids"] and a["padded"] == b["padded"]
    for key in ("input_values", "attention_mask"):
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    if "lengths" in a and "lengths" in b:
        assert torch.equal(a["lengths"], b["lengths"])


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.int32])
@pytest.mark.parametrize("pad", [None, 7, 320])
def test_packed_collate_equals_the_reference(mask_dtype, pad):
    rng = np.random.default_rng(0)
    items = [{"input_values": rng.standard_normal(n).astype(np.float32), "id": f"u{n}"}
             for n in (1001, 17, 999, 1001, 3)]
    items.insert(2, None)
    b = collate(items, pad, mask_dtype)
    same_batch(b, reference_collate(items, pad, mask_dtype))
    assert b["lengths"].dtype == torch.long and b["lengths"].tolist() == b["attention_mask"].sum(1).tolist()
    assert b["input_values"].is_contiguous() and b["attention_mask"].is_contiguous()
    # a round trip through pack/unpack of a copied buffer (what pinning does) gives the same batch
    packed = pack(items, pad, mask_dtype)
    same_batch(unpack(dict(packed, buffer=packed["buffer"].clone())), b)
    assert collate([None])["input_values"].shape == (0, 0)


def test_cropped_batch_has_full_lengths():
    items = [{"input_values": np.arange(n, dtype=np.float32), "id": str(n)} for n in (900, 1000, 1200)]
    b = collate(items, crop_seed=3)
    assert b["lengths"].tolist() == [900] * 3 and not b["padded"] and bool(b["attention_mask"].all())


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Mono/stereo, 8/16/22.05/44.1 kHz, wav/flac, 0.3..1.5 s."""
    root = tmp_path_factory.mktemp("mixed")
    rates = [16000, 8000, 22050, 44100]
    for i in range(14):
        write(root / f"u{i:02d}.{'flac' if i % 2 else 'wav'}", 0.3 + 0.09 * i, sr=rates[i % 4],
              channels=1 + (i % 3 == 0), seed=i)
    return root


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool])
@pytest.mark.parametrize("max_batch_seconds", [None, 2.5])
def test_worker_batches_equal_in_process_batches(mixed_corpus, mask_dtype, max_batch_seconds):
    ds, _ = build_datasets(make_args(train_dir=str(mixed_corpus)), SR)
    kw = dict(batch_size=4, shuffle=True, seed=3, epoch=1, rank=0, world_size=1, pad_to_multiple_of=320,
              max_batch_seconds=max_batch_seconds, mask_dtype=mask_dtype)
    here = list(build_loader(ds, num_workers=0, **kw))
    workers = list(build_loader(ds, num_workers=2, **kw))
    assert len(here) == len(workers) > 1
    for a, b in zip(here, workers):
        same_batch(a, b)
        # and each row is the dataset's item, i.e. the straightforward decode + normalize path
        for row, item_id in enumerate(a["ids"]):
            i = list(ds.ids).index(item_id)
            x = a["input_values"][row, :int(a["lengths"][row])].numpy()
            assert np.array_equal(x, ds[i]["input_values"])
            assert not a["input_values"][row, int(a["lengths"][row]):].any()


def test_load_audio_normalization_unchanged(mixed_corpus):
    """Decode -> mono -> resample -> normalize equals the float64 zero-mean-unit-var of the old path."""
    import soundfile as sf
    import soxr
    for path in sorted(mixed_corpus.iterdir()):
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        x = data.mean(axis=1, dtype=np.float32)
        if sr != SR:
            x = soxr.resample(x, sr, SR, quality="HQ").astype(np.float32)
        ref = (x - x.mean(dtype=np.float64)) / np.sqrt(x.astype(np.float64).var() + 1e-7)
        ours = load_audio(str(path), SR)
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        assert np.array_equal(ours, normalize(x))


def test_step_reads_the_batch_lengths(monkeypatch, corpus_dir):
    from engine import step as step_mod
    from engine.models import build_model, load_config
    from conftest import first_batch

    batch = first_batch(corpus_dir)
    assert batch["lengths"].tolist() == batch["attention_mask"].sum(1).tolist()
    model = build_model(load_config("demo")).eval()

    def prepared(b):
        s = step_mod.PretrainStep(model, step_mod.MaskingSpec(0.5, 5, 0, 20), torch.device("cpu"),
                                  generator=torch.Generator().manual_seed(0))
        return s.prepare(b)

    from_mask = prepared({k: v for k, v in batch.items() if k != "lengths"})
    monkeypatch.setattr(step_mod, "right_padded_lengths", lambda m: pytest.fail("mask searched"))
    from_lengths = prepared(batch)
    for key in ("sample_lengths", "frame_lengths", "mask_time_indices", "sampled_negative_indices"):
        assert torch.equal(from_mask[key], from_lengths[key]), key
    assert from_mask["padded"] == from_lengths["padded"] and from_mask["flops"] == from_lengths["flops"]
