"""engine.data at scale: index cache, resumable probing, budget batching, every bad kind, flags."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest

import engine.data.build as build_mod
import engine.data.probing as probing
from data_helpers import make_args, write, write_bad
from engine.data import DataError, add_data_args, build_datasets, build_loader
from engine.data.batching import balance, padding_fraction, plan_epoch

SR = 16000


def folder(tmp_path, n=6, name="d"):
    for i in range(n):
        write(tmp_path / name / f"s{i % 2}" / f"u{i}.flac", 1.0 + 0.2 * i, seed=i)
    return str(tmp_path / name)


def forbid_probing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("probed although the index is cached")
    monkeypatch.setattr(probing, "_probe_chunk", boom)
    monkeypatch.setattr(probing, "_probe_rows", boom)


# ------------------------------------------------------------------ index cache
def test_cache_is_reused_and_filters_apply_without_reprobing(tmp_path, monkeypatch):
    root = folder(tmp_path)
    args = make_args(train_dir=root, cache_dir=str(tmp_path / "cache"), preprocessing_only=True)
    first, _ = build_datasets(args, SR)
    files = os.listdir(tmp_path / "cache" / "w2v_data_index")
    assert len(files) == 1 and files[0].startswith("dir-") and files[0].endswith(".npz")
    forbid_probing(monkeypatch)
    again, _ = build_datasets(make_args(train_dir=root, cache_dir=str(tmp_path / "cache")), SR)
    assert list(again.ids) == list(first.ids)
    np.testing.assert_array_equal(again.durations, first.durations)
    short, val = build_datasets(make_args(train_dir=root, cache_dir=str(tmp_path / "cache"),
                                          max_duration_in_seconds=1.5, validation_split_percentage=50), SR)
    assert len(short) + len(val) == 3 and short.skipped["too_long"] == 3


def test_stale_folder_cache_is_refused_then_rebuilt_with_overwrite(tmp_path):
    root = folder(tmp_path)
    cache = str(tmp_path / "cache")
    build_datasets(make_args(train_dir=root, cache_dir=cache), SR)
    write(tmp_path / "d" / "s1" / "new.wav", 1.0)
    with pytest.raises(DataError, match="--train_dir.*changed.*--overwrite_cache"):
        build_datasets(make_args(train_dir=root, cache_dir=cache), SR)
    train, _ = build_datasets(make_args(train_dir=root, cache_dir=cache, overwrite_cache=True), SR)
    assert len(train) == 7
    train, _ = build_datasets(make_args(train_dir=root, cache_dir=cache), SR)
    assert len(train) == 7


def test_preprocessing_only_needs_a_cache_dir(tmp_path):
    with pytest.raises(DataError, match="--preprocessing_only.*--cache_dir"):
        build_datasets(make_args(train_dir=folder(tmp_path), preprocessing_only=True), SR)


def test_only_rank0_writes_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    build_datasets(make_args(train_dir=folder(tmp_path), cache_dir=str(tmp_path / "c")), SR)
    assert not (tmp_path / "c").exists()


def test_interrupted_probe_resumes_from_checkpoint(tmp_path, monkeypatch):
    root = folder(tmp_path, n=10)
    args = make_args(train_dir=root, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(probing, "CHUNK", 2)
    real = probing._probe_chunk
    calls = []

    def flaky(chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(probing, "_probe_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(args, SR)
    partial = [f for f in os.listdir(tmp_path / "cache" / "w2v_data_index") if "partial" in f]
    assert len(partial) == 1
    calls.clear()
    monkeypatch.setattr(probing, "_probe_chunk", lambda c: calls.append(len(c)) or real(c))
    train, _ = build_datasets(args, SR)
    assert len(train) == 10 and sum(calls) == 6          # 4 were probed before the interrupt
    assert os.listdir(tmp_path / "cache" / "w2v_data_index") == [partial[0].replace(".partial", "")]


def _saved_hf(tmp_path, n=8, bad_rows=()):
    import datasets

    rows = []
    for i in range(n):
        p = write(tmp_path / "src" / f"r{i}.flac", 1.0 + 0.1 * i, seed=i)
        data = open(p, "rb").read()
        rows.append({"bytes": b"junk" if i in bad_rows else data, "path": f"r{i}.flac"})
    ds = datasets.Dataset.from_dict({"audio": rows}).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "hf"))
    return str(tmp_path / "hf")


def test_datasets_index_cached_by_fingerprint_and_parallel_probe(tmp_path, monkeypatch):
    name = _saved_hf(tmp_path, bad_rows=(3,))
    monkeypatch.setattr(probing, "CHUNK", 3)
    kw = dict(dataset_name=name, cache_dir=str(tmp_path / "cache"), max_skip_fraction=0.5)
    serial, _ = build_datasets(make_args(**kw), SR)
    parallel, _ = build_datasets(make_args(preprocessing_num_workers=2, overwrite_cache=True, **kw), SR)
    assert list(serial.ids) == list(parallel.ids) and len(serial) == 7
    assert serial.skipped == parallel.skipped == {"unreadable": 1}
    forbid_probing(monkeypatch)
    cached, _ = build_datasets(make_args(**kw), SR)
    assert list(cached.ids) == list(serial.ids) and cached.skipped == {"unreadable": 1}
    assert cached[0]["input_values"].shape[0] == SR


def test_parallel_folder_probe_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(probing, "CHUNK", 2)
    root = folder(tmp_path, n=9)
    write_bad(tmp_path / "d", "unreadable")
    a, _ = build_datasets(make_args(train_dir=root, max_skip_fraction=0.5), SR)
    b, _ = build_datasets(make_args(train_dir=root, max_skip_fraction=0.5, preprocessing_num_workers=2), SR)
    assert list(a.ids) == list(b.ids) and a.skipped == b.skipped == {"unreadable": 1}


# ------------------------------------------------------------------ budget batching
def lognormal(n, seed=0):
    return np.clip(np.random.default_rng(seed).lognormal(np.log(12.5), 0.35, n), 2, 20)


def test_budget_batches_respect_budget_and_pad_little():
    dur = lognormal(5000)
    plan = plan_epoch(dur, batch_size=8, max_batch_seconds=200.0, shuffle=True, seed=0, epoch=0,
                      world_size=1)
    assert all(len(b) * dur[b].max() <= 200.0 for b in plan)
    assert sorted(np.concatenate(plan).tolist()) == list(range(5000))
    assert padding_fraction(plan, dur) < 0.05
    fixed = plan_epoch(dur, batch_size=8, max_batch_seconds=None, shuffle=True, seed=0, epoch=0,
                       world_size=1)
    assert padding_fraction(fixed, dur) > 0.15     # what the seed's fixed batches waste


def test_budget_plan_is_deterministic_and_varies_by_epoch():
    dur = lognormal(3000)
    kw = dict(batch_size=8, max_batch_seconds=120.0, shuffle=True, world_size=4, bucket_chunk=500)
    a = plan_epoch(dur, seed=1, epoch=0, **kw)
    assert [b.tolist() for b in a] == [b.tolist() for b in plan_epoch(dur, seed=1, epoch=0, **kw)]
    b = plan_epoch(dur, seed=1, epoch=1, **kw)
    assert {tuple(sorted(x)) for x in a} != {tuple(sorted(x)) for x in b}   # composition changes
    assert len(a) % 4 == 0 and len(b) % 4 == 0


def test_item_over_budget_is_a_batch_of_one_and_balance_falls_back_to_dropping():
    dur = np.array([1.0, 1.0, 50.0])
    plan = plan_epoch(dur, batch_size=8, max_batch_seconds=10.0, shuffle=False, seed=0, epoch=0, world_size=1)
    assert [b.tolist() for b in plan] == [[0, 1], [2]]
    singles = [np.array([i]) for i in range(5)]
    assert len(balance(singles, 2)) == 4
    assert [len(b) for b in balance([np.arange(8), np.arange(3)], 3)] == [4, 4, 3]


def test_budget_loader_ranks_resume(tmp_path):
    train, _ = build_datasets(make_args(train_dir=folder(tmp_path, n=12)), SR)
    kw = dict(batch_size=99, shuffle=True, seed=0, epoch=2, world_size=2, num_workers=0,
              pad_to_multiple_of=None, max_batch_seconds=4.0)
    runs = [list(build_loader(train, rank=r, **kw)) for r in range(2)]
    assert len(runs[0]) == len(runs[1])
    seen = [i for run in runs for b in run for i in b["ids"]]
    assert sorted(seen) == sorted(train.ids)
    for run in runs:
        for b in run:
            assert b["input_values"].shape[0] * b["input_values"].shape[1] <= 4.0 * SR + 1 or len(b["ids"]) == 1
    resumed = list(build_loader(train, rank=1, start_batch=1, **kw))
    assert [b["ids"] for b in resumed] == [b["ids"] for b in runs[1][1:]]


# ------------------------------------------------------------------ bad audio, each kind
@pytest.mark.parametrize("kind,reason", [("unreadable", "unreadable"), ("truncated_flac", "truncated"),
                                         ("truncated_wav", "truncated"), ("empty", "empty"),
                                         ("nan", "nonfinite"), ("silent", "silent")])
def test_each_bad_kind_is_skipped_counted_and_reported(tmp_path, kind, reason):
    root = folder(tmp_path, n=5)
    bad = write_bad(tmp_path / "d", kind)
    report = tmp_path / "report.tsv"
    train, _ = build_datasets(make_args(train_dir=root, max_skip_fraction=0.3, skip_report=str(report)), SR)
    batches = list(build_loader(train, batch_size=2, shuffle=True, seed=0, epoch=0, rank=0, world_size=1,
                                num_workers=0, pad_to_multiple_of=None))
    assert sum(len(b["ids"]) for b in batches) == 5
    assert train.skipped == {reason: 1} and train.skipped_items == [(bad, reason)]
    assert report.read_text().splitlines()[1].startswith(f"{bad}\t{reason}\t")


@pytest.mark.parametrize("sr,channels", [(8000, 1), (44100, 2)])
def test_wrong_rate_and_multichannel_are_fixed_not_skipped(tmp_path, sr, channels):
    write(tmp_path / "d" / "x.wav", 2.0, sr=sr, channels=channels)
    train, _ = build_datasets(make_args(train_dir=str(tmp_path / "d")), SR)
    (b,) = list(build_loader(train, batch_size=1, shuffle=False, seed=0, epoch=0, rank=0, world_size=1,
                             num_workers=0, pad_to_multiple_of=None))
    assert b["input_values"].shape == (1, 2 * SR) and not train.skipped


def test_too_long_is_reported_but_not_damage(tmp_path):
    root = folder(tmp_path, n=4)
    write(tmp_path / "d" / "long.wav", 30.0, sr=8000)
    train, _ = build_datasets(make_args(train_dir=root, max_duration_in_seconds=20.0, max_skip_fraction=0.0,
                                        skip_report=str(tmp_path / "r.tsv")), SR)
    assert train.skipped == {"too_long": 1} and len(train) == 4
    assert "long.wav\ttoo_long\t30.00 s" in (tmp_path / "r.tsv").read_text()


def test_manifest_entry_missing_on_disk_is_skipped_at_decode(tmp_path):
    root = folder(tmp_path, n=3)
    man = tmp_path / "m.tsv"
    man.write_text(f"{root}\ns0/u0.flac\t16000\ngone.flac\t16000\ns0/u2.flac\t22400\n")
    train, _ = build_datasets(make_args(train_manifest=str(man), max_skip_fraction=0.5), SR)
    assert train[1] is None and train.skipped == {"unreadable": 1}
    assert train[0]["input_values"].shape == (SR,)


def test_skip_fraction_enforced_at_build_time(tmp_path):
    root = folder(tmp_path, n=3)
    write_bad(tmp_path / "d", "unreadable")
    write_bad(tmp_path / "d", "empty")
    with pytest.raises(DataError, match=r"40\.0% .*--max_skip_fraction 0.05"):
        build_datasets(make_args(train_dir=root), SR)


def test_skip_report_per_rank_and_split(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    args = make_args(skip_report=str(tmp_path / "skips.tsv"))
    assert build_mod._report_path(args, "train") == str(tmp_path / "skips.rank2.tsv")
    assert build_mod._report_path(args, "validation") == str(tmp_path / "skips.validation.rank2.tsv")


# ------------------------------------------------------------------ flags, bench
def test_add_data_args_defaults_and_help():
    p = add_data_args(argparse.ArgumentParser())
    a = p.parse_args([])
    assert a.dataloader_num_workers == 4 and a.max_skip_fraction == 0.05 and a.max_batch_seconds is None
    assert a.train_dir is a.train_manifest is a.validation_dir is a.validation_manifest is None
    assert all(action.help for action in p._actions if action.dest != "help")
    a = p.parse_args(["--max_batch_seconds", "150", "--crop_long_audio", "--train_manifest", "t.tsv"])
    assert a.max_batch_seconds == 150.0 and a.crop_long_audio and a.train_manifest == "t.tsv"


def test_bench_runs_small(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_data", os.path.join(os.path.dirname(__file__), "..", "bench", "data.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--corpus", str(tmp_path / "c"), "--num_files", "12", "--workers", "0", "--seconds", "0.3"])
    out = capsys.readouterr().out
    assert "budget" in out and "audio-s/s" in out and "padding" in out


def test_skip_rate_is_enforced_per_rank_shard(tmp_path, monkeypatch):
    """4 of 40 files are damaged (10%): each rank decodes a quarter, so the split-wide lower bound
    (damaged seen here / 40) stays at or below 5%; the rank's own decode rate must catch it."""
    import engine.data.dataset as dataset_mod

    for i in range(36):
        write(tmp_path / "d" / f"g{i:02d}.wav", 0.3, seed=i)
    for i in range(4):
        write_bad(tmp_path / "d" / f"b{i}", "nan")
    args = make_args(train_dir=str(tmp_path / "d"), max_skip_fraction=0.05)

    def run_all_ranks():
        raised = []
        for rank in range(4):
            train, _ = build_datasets(args, SR)
            try:
                list(build_loader(train, batch_size=2, shuffle=True, seed=0, epoch=0, rank=rank, world_size=4,
                                  num_workers=0, pad_to_multiple_of=None))
                raised.append(False)
            except DataError as exc:
                assert "--max_skip_fraction" in str(exc)
                raised.append(True)
        return raised

    assert not any(run_all_ranks())     # with too large a sample threshold nothing is caught
    monkeypatch.setattr(dataset_mod, "MIN_DECODE_SAMPLE", 8)
    assert any(run_all_ranks())
