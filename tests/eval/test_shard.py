"""``accel eval`` under ``accelerate launch`` with two CPU processes: the same images as one process."""
import json
import os
import subprocess
import sys

import torch

from accel.eval.shard import Shard, batches

EVAL = ["-m", "accel.cli", "eval", "--model", "fashion-sd", "--methods", "deepcache=2", "--per-class", "1",
        "--steps", "3", "--batch", "3", "--threads", "1", "--no-fid", "--repeats", "1", "--save-images"]


def test_batches_are_cut_before_they_are_shared_out():
    work = batches(10, 3)
    assert [list(r) for r in work] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    ranks = [Shard(rank=r, world=3).mine(work) for r in range(3)]
    assert ranks == [[0, 3], [1], [2]]  # every batch exactly once, batch i on rank i mod 3
    assert Shard().mine(work) == [0, 1, 2, 3]


def _run(tmp_path, name, launcher):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "TQDM_DISABLE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    out = tmp_path / name
    done = subprocess.run([*launcher, *EVAL, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), torch.load(out / "images.pt")


def test_two_processes_make_the_images_one_process_makes(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "29517"]
    two, two_images = _run(tmp_path, "two", launch)
    one, one_images = _run(tmp_path, "one", [sys.executable])
    assert two["meta"]["world"] == 2 and one["meta"]["world"] == 1
    assert list(two_images) == list(one_images) == ["unpatched", "deepcache=2"]
    for label in one_images:
        assert torch.equal(two_images[label], one_images[label]), label
    # batches of 3 prompts: 0-2 on rank 0, 3-5 on rank 1, 6-8 on rank 0, 9 on rank 1
    assert [p["rank"] for p in two["per_image"]] == [0] * 3 + [1] * 3 + [0] * 3 + [1]
    assert [p["rank"] for p in one["per_image"]] == [0] * 10
    assert [p["seed"] for p in two["per_image"]] == list(range(10))
    # timings come from each process, and the quality was scored once on all ten images
    assert sorted(t["rank"] for t in two["meta"]["timing"]) == [0, 1]
    assert all(t["threads"] == 1 for t in two["meta"]["timing"])
    rows = {r["settings"]: r for r in two["rows"]}
    assert rows["deepcache=2"]["psnr"] == {r["settings"]: r for r in one["rows"]}["deepcache=2"]["psnr"]
    assert 0 < rows["deepcache=2"]["psnr"] < 100  # DeepCache changed the images, and the same way in both runs


def test_tune_runs_on_two_processes_and_only_the_main_one_writes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "TQDM_DISABLE": "1"}
    cache = tmp_path / "cache.json"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", "29518", "-m", "accel.cli", "tune", "--model", "fashion-vit",
                           "--max-accuracy-drop", "100", "--methods", "tome", "--no-compose", "--limit", "64",
                           "--held-out", "32", "--batch", "16", "--repeats", "1", "--threads", "1",
                           "--cache", str(cache), "--out", str(tmp_path / "t")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fastest within") == 1  # the main process reports
    result = json.loads((tmp_path / "t" / "tune.json").read_text())
    stored = json.loads(cache.read_text())
    assert result["label"].startswith("tome=") and len(stored["held-out"]) == 1
    timing = json.loads((tmp_path / "t" / "report.json").read_text())["meta"]["timing"]
    assert sorted(t["rank"] for t in timing) == [0, 1]  # batches of 16 from 32 images: one each
