import json

import pytest
import torch

from accel.eval.bench import device_sync, logit_cosine, top1_agreement
from accel.eval.report import (BENCH_COLUMNS, device_section, format_table, machine_description, replace_section,
                               run_meta)
from accel.eval.progress import duration
from accel.eval.timing import busy_warning, cpu_per_wall, time_interleaved


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


def scripted(clock, cpu, seconds, cpu_share, warmup_cpu_share=0.0):
    """Variants that each take ``seconds`` of wall time and ``cpu_share`` CPU seconds per wall
    second (``warmup_cpu_share`` for their first call, the warm-up)."""
    calls = {}

    def variant(name):
        def run():
            share = warmup_cpu_share if calls.setdefault(name, 0) == 0 else cpu_share
            calls[name] += 1
            clock.now += seconds
            cpu.now += share * seconds
        return run

    return {"a": variant("a"), "b": variant("b")}


@pytest.mark.parametrize("cpu_share, warned", [(1.98, False), (1.75, False), (1.6, True), (1.3, True), (0.9, True)])
def test_cpu_time_is_read_beside_wall_time_and_a_busy_machine_is_flagged(cpu_share, warned):
    """A process given fewer cores than its threads uses less CPU time per wall second: below 0.85
    of the thread count the readings come with a warning. Warm-up calls do not count."""
    clock, cpu = FakeClock(), FakeClock()
    timings = time_interleaved(scripted(clock, cpu, 2.0, cpu_share, warmup_cpu_share=0.1), repeats=3, warmup=1,
                               clock=clock, cpu_clock=cpu)
    assert timings["a"].cpu_seconds == pytest.approx([2 * cpu_share] * 3)
    used = cpu_per_wall(timings)
    assert used == pytest.approx(cpu_share)
    warning = busy_warning(used, threads=2)
    assert (warning is not None) == warned
    if warned:
        assert f"CPU used {cpu_share:.1f} of 2 threads" in warning and "unreliable" in warning
    assert busy_warning(None, threads=2) is None  # no reading, no claim


def test_progress_bar_goes_to_stderr_and_the_estimate_comes_from_the_warm_up(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    clock, cpu, said = FakeClock(), FakeClock(), []
    time_interleaved(scripted(clock, cpu, 3.0, 2.0), repeats=4, warmup=1, clock=clock, cpu_clock=cpu,
                     progress="toy", log=said.append)
    assert said == ["toy: 2 settings x 4 rounds, about 25 s"]  # warm-up round 6 s, times 4 rounds
    captured = capsys.readouterr()
    assert captured.out == "" and "toy" in captured.err
    time_interleaved(scripted(clock, cpu, 3.0, 2.0), repeats=1, clock=clock, cpu_clock=cpu)
    assert capsys.readouterr().err == ""  # no label, no bar (library callers print their own)
    assert [duration(s) for s in (0.3, 12, 89, 100, 200)] == ["5 s", "10 s", "90 s", "2 minutes", "3 minutes"]


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
