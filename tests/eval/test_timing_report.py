import json

import pytest
import torch

from accel.eval.bench import device_sync, logit_cosine, top1_agreement
from accel.eval.report import (BENCH_COLUMNS, device_section, format_table, machine_description, replace_section,
                               run_meta)
from accel.eval.timing import time_interleaved


class FakeClock:
    """Each variant 'takes' a scripted time; the clock advances when a variant runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaving_rotates_order_and_reports_medians():
    clock, order = FakeClock(), []
    durations = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 10.0, 30.0, 20.0])}

    def variant(name):
        def run():
            order.append(name)
            clock.now += next(durations[name])

        return run

    timings = time_interleaved({"a": variant("a"), "b": variant("b")}, repeats=3, warmup=1,
                               items_per_call=4, clock=clock)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated rounds
    assert timings["a"].seconds == [1.0, 2.0, 3.0] and timings["b"].median_s == 20.0
    assert timings["a"].items_per_s == 2.0
    assert timings["a"].speedup_over(timings["b"]) == 10.0
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": variant("a")}, repeats=0)


def test_sync_brackets_every_timed_call():
    """An asynchronous device is waited for before the clock starts and before it stops, so the
    queued work of a call counts in its own time and not in the next variant's."""
    clock, events = FakeClock(), []
    queued = {"a": 5.0, "b": 1.0}  # work a call leaves queued, done only at the next sync

    def variant(name):
        def run():
            events.append(name)
            clock.pending = queued[name]
        return run

    def sync():
        events.append("sync")
        clock.now += getattr(clock, "pending", 0.0)
        clock.pending = 0.0

    timings = time_interleaved({"a": variant("a"), "b": variant("b")}, repeats=2, warmup=0, clock=clock, sync=sync)
    assert events == ["sync", "a", "sync", "sync", "b", "sync", "sync", "b", "sync", "sync", "a", "sync"]
    assert timings["a"].seconds == [5.0, 5.0] and timings["b"].seconds == [1.0, 1.0]
    unsynced = time_interleaved({"a": variant("a"), "b": variant("b")}, repeats=1, warmup=0, clock=clock)
    assert unsynced["a"].seconds == [0.0]  # without sync the queued work is not seen


def test_device_sync_and_machine_description_on_the_cpu():
    assert device_sync("cpu") is None and device_sync(torch.device("cpu")) is None
    text = machine_description("numpy")
    assert "CPU" in text and f"{torch.get_num_threads()} threads" in text and "numpy" in text
    meta = run_meta("python x.py", 3, dtype="float16")
    assert meta["dtype"] == "float16" and meta["weights"] == "seeded random (seed 3)" and "CPU" in meta["machine"]
    assert device_section("bench_vit", False) == "bench_vit" and device_section("bench_vit", True) == "bench_vit_cuda"


def test_agreement_metrics_on_known_numbers():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    out = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [4.0, 3.0]])
    assert top1_agreement(out, ref) == 0.5  # rows 0 and 2 agree (ties pick the first index)
    assert logit_cosine(out, ref) == pytest.approx((1.0 + 0.0 + 1.0 + 24 / 25) / 4)


def test_tables_and_section_replacement(tmp_path):
    row = dict(model="m", batch=2, method="tome", settings="r=8", baseline_items_s=10.0, items_s=15.0,
               speedup=1.5, top1_agreement=1.0, logit_cosine=0.99)
    md = format_table([row], BENCH_COLUMNS)
    assert md.splitlines()[2] == "| m | 2 | tome | r=8 | 10.00 | 15.00 | 1.50 | 1.000 | 0.9900 |"
    text = format_table([row], BENCH_COLUMNS, style="text").splitlines()
    assert text[0].startswith("model") and text[2].endswith("0.9900")
    with pytest.raises(ValueError, match="style"):
        format_table([row], BENCH_COLUMNS, style="html")
    doc = tmp_path / "b.md"
    doc.write_text("# Title\n\nkept\n")
    replace_section(doc, "x", "one")
    replace_section(doc, "x", "two")
    assert doc.read_text() == "# Title\n\nkept\n\n<!-- x:start -->\ntwo\n<!-- x:end -->\n"
    json.dumps(row)
