"""The dashboard's last day: counters become increases per quarter hour, the store's size
its level, and both are drawn as SVG with nothing but numbers and our own text."""

from __future__ import annotations

from xml.etree import ElementTree

from lamina.manager.history import (
    BUCKET,
    DAY,
    History,
    Sample,
    bar_chart,
    charts,
    increases,
    levels,
)

END = 1_000_000_000.0


def test_increases_and_levels_by_quarter_hour() -> None:
    day = [
        Sample(END - DAY - 60, 0, 0, 100),  # older than a day: the base of the next increase
        Sample(END - DAY + 30, 5, 1000, 100),
        Sample(END - 2 * BUCKET + 10, 7, 1000, 150),
        Sample(END - BUCKET + 10, 7, 5000, 160),
        Sample(END, 8, 5000, 170),  # now: in the last quarter hour
    ]
    boots = increases(day, "boots", END)
    assert len(boots) == 96
    assert boots[0] == 5 and boots[94] == 2 and boots[95] == 1 and sum(boots) == 8
    served = increases(day, "read_bytes", END)
    assert served[0] == 1000 and served[95] == 4000 and sum(served) == 5000
    store = levels(day, "store_bytes", END)
    assert store[0] == 100 and store[94] == 150 and store[95] == 170 and store[1] is None


def test_history_keeps_a_sample_a_minute_and_charts_parse() -> None:
    history = History()
    history.add(Sample(END - 120, 1, 10, 1 << 20))
    history.add(Sample(END - 100, 2, 20, 1 << 20))  # 20 s later: not kept
    history.add(Sample(END - 50, 3, 30, 2 << 20))
    assert [s.boots for s in history.samples] == [1, 3]
    svgs = charts(history, Sample(END, 4, 40, 3 << 20))
    assert len(svgs) == 3
    for svg in svgs:
        root = ElementTree.fromstring(str(svg))
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "Boots per quarter hour: 4" in str(svgs[0])
    bars = ElementTree.fromstring(str(bar_chart([0, 2, 1], "x", "<3>"))).findall(
        "{http://www.w3.org/2000/svg}rect"
    )
    assert [float(b.get("height", 0)) for b in bars[1:]] == [92.0, 46.0]
    assert "&lt;3&gt;" in str(bar_chart([1], "x", "<3>"))
