"""engine.data: sources, decoding, filters, bad audio, batching, sharding, resume."""
from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from data_helpers import dominant_freq, make_args, write, write_bad
from engine.data import DataError, build_datasets, build_loader, collate
from engine.data.audio import load_audio, normalize

SR = 16000


def ids_of(loader):
    return [tuple(b["ids"]) for b in loader]


def loader(ds, **kw):
    base = dict(batch_size=3, shuffle=True, seed=1, epoch=0, rank=0, world_size=1, num_workers=0,
                pad_to_multiple_of=None)
    base.update(kw)
    return build_loader(ds, **base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 mono 16 kHz files of 0.5..2.4 s in nested folders, mixed formats."""
    root = tmp_path_factory.mktemp("corpus")
    exts = [".wav", ".flac", ".ogg"]
    for i in range(20):
        write(root / f"spk{i % 3}" / f"ch{i % 2}" / f"utt{i:02d}{exts[i % 3]}", 0.5 + 0.1 * i, seed=i)
    (root / "notes.txt").write_text("not audio")
    return root


# ------------------------------------------------------------------ sources
def test_folder_source_lists_recursively_with_header_durations(corpus):
    train, val = build_datasets(make_args(train_dir=str(corpus)), SR)
    assert val is None and len(train) == 20
    assert all(i.endswith((".wav", ".flac", ".ogg")) for i in train.ids)
    expected = sorted(0.5 + 0.1 * i for i in range(20))
    np.testing.assert_allclose(sorted(train.durations), expected, atol=1e-3)
    item = train[0]
    assert item["input_values"].dtype == np.float32 and item["id"] == train.ids[0]
    assert len(item["input_values"]) == round(train.durations[0] * SR)


def test_validation_split_percentage_is_seeded_and_disjoint(corpus):
    a_train, a_val = build_datasets(make_args(train_dir=str(corpus), validation_split_percentage=10), SR)
    b_train, b_val = build_datasets(make_args(train_dir=str(corpus), validation_split_percentage=10), SR)
    c_train, c_val = build_datasets(make_args(train_dir=str(corpus), validation_split_percentage=10,
                                              seed=5), SR)
    assert len(a_val) == 2 and len(a_train) == 18
    assert list(a_val.ids) == list(b_val.ids)
    assert not set(a_val.ids) & set(a_train.ids)
    assert list(a_val.ids) != list(c_val.ids) or list(a_train.ids) != list(c_train.ids)


def test_validation_split_yielding_zero_rows_raises(corpus):
    with pytest.raises(DataError, match="--validation_split_percentage"):
        build_datasets(make_args(train_dir=str(corpus), validation_split_percentage=1), SR)


def test_validation_dir_and_source_errors(corpus, tmp_path):
    val_dir = tmp_path / "val"
    write(val_dir / "v.wav", 1.0)
    train, val = build_datasets(make_args(train_dir=str(corpus), validation_dir=str(val_dir)), SR)
    assert len(train) == 20 and list(val.ids) == [str(val_dir / "v.wav")]
    with pytest.raises(DataError, match="--train_dir"):
        build_datasets(make_args(train_dir=str(tmp_path / "missing")), SR)
    with pytest.raises(DataError, match="exactly one"):
        build_datasets(make_args(train_dir=str(corpus), dataset_name="x"), SR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no audio files"):
        build_datasets(make_args(train_dir=str(tmp_path / "empty")), SR)


def test_manifest_source(tmp_path):
    root = tmp_path / "audio"
    for i in range(4):
        write(root / f"a{i}.flac", 1.0 + i)
    man = tmp_path / "train.tsv"
    man.write_text(f"{root}\n" + "".join(f"a{i}.flac\t{(1 + i) * SR}\n" for i in range(4)))
    train, _ = build_datasets(make_args(train_manifest=str(man), max_duration_in_seconds=3.5), SR)
    assert sorted(train.durations) == [1.0, 2.0, 3.0]
    assert train.skipped["too_long"] == 1
    assert len(train[0]["input_values"]) == int(train.durations[0] * SR)
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{root}\na0.flac\n")
    with pytest.raises(DataError, match="bad.tsv.*line 2"):
        build_datasets(make_args(train_manifest=str(bad)), SR)


def _audio_rows(tmp_path, n=6):
    paths = [write(tmp_path / "src" / f"r{i}.flac", 1.0 + 0.25 * i, sr=[16000, 8000][i % 2], seed=i)
             for i in range(n)]
    return {"audio": [{"bytes": open(p, "rb").read(), "path": os.path.basename(p)} for p in paths],
            "text": [f"t{i}" for i in range(n)]}


def test_datasets_source_parquet_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(_audio_rows(tmp_path)).cast_column("audio", datasets.Audio(decode=False))
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    results = []
    for args in (make_args(dataset_name="parquet", dataset_data_files=[str(tmp_path / "pq" / "*.parquet")],
                           cache_dir=str(tmp_path / "hf")),
                 make_args(dataset_name=str(tmp_path / "pq"), cache_dir=str(tmp_path / "hf")),
                 make_args(dataset_name=str(tmp_path / "saved"))):
        train, _ = build_datasets(args, SR)
        assert len(train) == 6
        np.testing.assert_allclose(sorted(train.durations), [1.0 + 0.25 * i for i in range(6)], atol=1e-3)
        item = train[3]
        assert abs(len(item["input_values"]) - train.durations[3] * SR) <= 2
        results.append(list(train.ids))
    assert results[0][0].startswith("default/train/0:r0.flac")


def test_datasets_several_splits_concatenate(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(_audio_rows(tmp_path))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    args = make_args(dataset_name=str(tmp_path / "dd"), dataset_config_names=["clean", "clean"],
                     dataset_split_names=["train", "test"])
    train, _ = build_datasets(args, SR)
    assert len(train) == 8 and sum(i.startswith("clean/test/") for i in train.ids) == 2
    with pytest.raises(DataError, match="--audio_column_name"):
        build_datasets(make_args(dataset_name=str(tmp_path / "dd"), audio_column_name="speech"), SR)


def test_hub_dataset_offline_fails_naming_flag(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)   # skip the 25 s of retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = make_args(dataset_name="librispeech_asr", dataset_config_names=["clean"],
                     dataset_split_names=["validation"], cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="--dataset_name 'librispeech_asr'"):
        build_datasets(args, SR)


# ------------------------------------------------------------------ decoding
@pytest.mark.parametrize("sr,channels", [(8000, 1), (22050, 1), (44100, 2)])
def test_resampling_to_16k_mono_keeps_length_and_pitch(tmp_path, sr, channels):
    path = write(tmp_path / f"t{sr}.wav", 1.5, sr=sr, freq=1000.0, channels=channels)
    x = load_audio(path, SR)
    assert x.ndim == 1 and x.dtype == np.float32
    assert abs(len(x) - 1.5 * SR) <= 2
    assert abs(dominant_freq(x, SR) - 1000.0) < 5


def test_stereo_is_down_mixed_by_mean(tmp_path):
    left = np.sin(np.arange(SR) * 2 * np.pi * 300 / SR).astype(np.float32)
    path = str(tmp_path / "lr.wav")
    sf.write(path, np.stack([left, -left], 1) * 0.5 + np.stack([left, left], 1) * 0.5, SR, subtype="FLOAT")
    x, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(load_audio(path, SR), normalize(x.mean(1)), atol=1e-6)


def test_normalization_matches_feature_extractor(tmp_path):
    from transformers import Wav2Vec2FeatureExtractor

    path = write(tmp_path / "n.wav", 1.0, subtype="FLOAT")
    x = load_audio(path, SR)
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    raw, _ = sf.read(path, dtype="float32")
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    ref = fe(raw, sampling_rate=SR).input_values[0]
    np.testing.assert_allclose(x, ref, atol=1e-4)


def test_duration_filter_drops_or_crops(corpus):
    args = make_args(train_dir=str(corpus), min_duration_in_seconds=0.75, max_duration_in_seconds=2.0)
    train, _ = build_datasets(args, SR)
    assert len(train) == 13 and train.durations.min() > 0.75 and train.durations.max() <= 2.0
    assert train.skipped == {"too_short": 3, "too_long": 4}
    train.check_skip_fraction()   # filtered items are not damage
    crop, _ = build_datasets(make_args(train_dir=str(corpus), max_duration_in_seconds=1.0,
                                       crop_long_audio=True), SR)
    assert len(crop) == 20 and crop.durations.max() <= 1.0
    longest = int(np.argmax(crop.durations))
    assert len(crop[longest]["input_values"]) == SR


# ------------------------------------------------------------------ bad audio
BAD_KINDS = ["unreadable", "truncated_flac", "truncated_wav", "empty", "nan", "silent"]


def test_bad_files_are_skipped_and_counted(tmp_path):
    for i in range(8):
        write(tmp_path / "d" / f"good{i}.wav", 1.0, seed=i)
    for kind in BAD_KINDS:
        write_bad(tmp_path / "d", kind)
    train, _ = build_datasets(make_args(train_dir=str(tmp_path / "d"), max_skip_fraction=1.0,
                                        skip_report=str(tmp_path / "skips.tsv")), SR)
    # header-level damage is found while indexing, sample-level damage while decoding
    assert train.skipped == {"unreadable": 1, "truncated": 1, "empty": 1}
    seen = [i for b in loader(train, batch_size=2, num_workers=2) for i in b["ids"]]
    assert sorted(seen) == sorted(str(tmp_path / "d" / f"good{i}.wav") for i in range(8))
    assert train.skipped == {"unreadable": 1, "truncated": 2, "empty": 1, "nonfinite": 1, "silent": 1}
    report = (tmp_path / "skips.tsv").read_text().splitlines()
    assert report[0] == "id\treason\tdetail" and len(report) == 1 + len(BAD_KINDS)
    assert any(line.startswith(str(tmp_path / "d" / "nan.wav") + "\tnonfinite") for line in report)
    # a second epoch counts nothing twice
    list(loader(train, batch_size=2, epoch=1))
    assert sum(train.skipped.values()) == len(BAD_KINDS)


def test_all_bad_batch_is_refilled_and_skip_fraction_enforced(tmp_path):
    for i in range(6):
        write(tmp_path / "d" / f"good{i}.wav", 1.0, seed=i)
    write_bad(tmp_path / "d", "nan")
    train, _ = build_datasets(make_args(train_dir=str(tmp_path / "d"), max_skip_fraction=0.5), SR)
    ld = loader(train, batch_size=1, shuffle=False)
    batches = list(ld)
    assert len(batches) == len(ld) == 7 and all(len(b["ids"]) == 1 for b in batches)
    assert ld.refilled == 1 and train.skipped == {"nonfinite": 1}
    strict, _ = build_datasets(make_args(train_dir=str(tmp_path / "d"), max_skip_fraction=0.1), SR)
    with pytest.raises(DataError, match="--max_skip_fraction"):
        list(loader(strict, batch_size=1))


# ------------------------------------------------------------------ batching
def test_collate_pads_right_and_to_multiple():
    items = [{"input_values": np.ones(5, np.float32), "id": "a"}, None,
             {"input_values": np.full(3, 2, np.float32), "id": "b"}]
    b = collate(items, pad_to_multiple_of=4)
    assert b["input_values"].shape == (2, 8) and b["input_values"].dtype == torch.float32
    assert b["attention_mask"].dtype == torch.int64 and b["ids"] == ["a", "b"]
    assert b["attention_mask"].sum(1).tolist() == [5, 3]
    assert b["input_values"][1, 3:].abs().sum() == 0 and b["input_values"][1, :3].eq(2).all()
    small = collate(items, mask_dtype=torch.bool)["attention_mask"]
    assert small.dtype == torch.bool and small.sum(1).tolist() == [5, 3]


def test_loader_batch_shapes_and_mask(corpus):
    train, _ = build_datasets(make_args(train_dir=str(corpus)), SR)
    batches = list(loader(train, batch_size=4, pad_to_multiple_of=320))
    assert len(batches) == 5
    for b in batches:
        lengths = [round(train.durations[list(train.ids).index(i)] * SR) for i in b["ids"]]
        assert b["attention_mask"].sum(1).tolist() == lengths
        assert b["input_values"].shape[1] % 320 == 0


@pytest.mark.parametrize("max_batch_seconds", [None, 3.0])
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_equal_lengths_disjoint_full_coverage(corpus, world_size, max_batch_seconds):
    train, _ = build_datasets(make_args(train_dir=str(corpus)), SR)
    per_rank = [[list(b) for b in loader(train, rank=r, world_size=world_size,
                                          max_batch_seconds=max_batch_seconds)._batches]
                for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1
    flat = [i for p in per_rank for b in p for i in b]
    assert len(flat) == len(set(flat)) == len(train)


def test_shuffle_is_deterministic_per_seed_and_epoch(corpus):
    train, _ = build_datasets(make_args(train_dir=str(corpus)), SR)
    plan = lambda **kw: [tuple(b) for b in loader(train, **kw)._batches]  # noqa: E731
    assert plan(seed=1, epoch=0) == plan(seed=1, epoch=0)
    assert plan(seed=1, epoch=0) != plan(seed=1, epoch=1)
    assert plan(seed=1, epoch=0) != plan(seed=2, epoch=0)
    assert plan(shuffle=False, epoch=0) == plan(shuffle=False, epoch=3)
    assert ids_of(loader(train, seed=1, epoch=2)) == ids_of(loader(train, seed=1, epoch=2))


@pytest.mark.parametrize("max_batch_seconds", [None, 3.0])
def test_start_batch_resumes_exactly(corpus, max_batch_seconds):
    train, _ = build_datasets(make_args(train_dir=str(corpus)), SR)
    kw = dict(seed=3, epoch=4, rank=1, world_size=2, max_batch_seconds=max_batch_seconds)
    full = list(loader(train, **kw))
    resumed_loader = loader(train, start_batch=2, **kw)
    resumed = list(resumed_loader)
    assert len(resumed_loader) == len(full) - 2 == len(resumed)
    assert resumed_loader.batches_per_epoch == len(full)
    for a, b in zip(full[2:], resumed):
        assert a["ids"] == b["ids"] and torch.equal(a["input_values"], b["input_values"])


def test_start_batch_decodes_nothing_it_skips(corpus, monkeypatch):
    train, _ = build_datasets(make_args(train_dir=str(corpus)), SR)
    calls = []
    orig = train.load
    monkeypatch.setattr(train, "load", lambda i: calls.append(i) or orig(i))
    ld = loader(train, batch_size=4, start_batch=4)
    assert len(list(ld)) == 1 and len(calls) == len(ld._batches[0])


def test_crop_to_shortest_removes_padding_deterministically():
    from engine.data.loader import collate
    rng = np.random.default_rng(0)
    items = [{"input_values": rng.standard_normal(n).astype(np.float32), "id": f"u{n}"} for n in (900, 1000, 1200)]
    padded = collate(items)
    assert padded["padded"] and padded["input_values"].shape == (3, 1200)
    a, b = collate(items, crop_seed=7), collate(items, crop_seed=7)
    assert not a["padded"] and a["input_values"].shape == (3, 900) and bool(a["attention_mask"].all())
    assert torch.equal(a["input_values"], b["input_values"])
    assert not torch.equal(a["input_values"], collate(items, crop_seed=8)["input_values"])
    for row, it in zip(a["input_values"].numpy(), items):  # each row is a contiguous slice of its item
        x = it["input_values"]
        starts = [s for s in range(len(x) - 900 + 1) if np.array_equal(x[s:s + 900], row)]
        assert len(starts) == 1
