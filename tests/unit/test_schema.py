"""The telemetry contract: every key written is defined once, and docs/telemetry.md shows them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from redline.telemetry import schema as K
from redline.telemetry.metrics import WindowContext, WindowLogger
from redline.telemetry.sampler import Sampler
from redline.telemetry.session import _memory_reader

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_has_a_unit_and_a_meaning() -> None:
    for name, key in K.KEYS.items():
        assert key == name and key.meaning and key.stream in ("metrics", "system", "ranks"), name


def test_a_window_record_holds_only_schema_keys() -> None:
    records: list[dict] = []
    ctx = WindowContext(samples_per_step=8, device=torch.device("cpu"), flops_per_step=10**6,
                        peak_flops=1e12, hardware_flops_per_step=3 * 10**6 // 2)
    memory = _memory_reader(type("D", (), {"is_cuda": False, "kind": "cpu"})(), 2**34, None)
    logger = WindowLogger(2, ctx, records.append, memory)
    logger.start()
    for step in (1, 2):
        logger.record(step, torch.tensor(1.0), torch.tensor(2.0), 4, 1e-3, 0, 8 * step, 0.0,
                      False)
    (record,) = records
    assert set(record) <= set(K.KEYS), set(record) - set(K.KEYS)
    for key in (K.LOSS, K.GRAD_NORM, K.STEP_TIME, K.MEM_RSS, K.MEM_PCT, K.MFU, K.OVERHEAD_PCT):
        assert record[key] is not None, key
    assert record[K.HFU] == pytest.approx(1.5 * record[K.MFU])  # what reran, beside MFU


def test_hfu_is_written_only_where_something_was_recomputed() -> None:
    records: list[dict] = []
    ctx = WindowContext(samples_per_step=8, device=torch.device("cpu"), flops_per_step=10**6,
                        peak_flops=1e12)
    logger = WindowLogger(1, ctx, records.append)
    logger.start()
    logger.record(1, torch.tensor(1.0), torch.tensor(2.0), 4, 1e-3, 0, 8, 0.0, False)
    (record,) = records
    assert record[K.MFU] is not None and K.HFU not in record


def test_hardware_samples_hold_only_schema_keys() -> None:
    samples: list[dict] = []
    device = type("D", (), {"is_cuda": False, "kind": "cpu", "index": None})()
    with Sampler(device, samples.append, every_s=0.05):
        pass
    assert samples and set(samples[-1]) <= {k for k, v in K.KEYS.items()
                                            if v.stream == "system" or k == K.TIME}


def test_the_telemetry_guide_metric_table_is_the_schema() -> None:
    guide = (ROOT / "docs" / "telemetry.md").read_text()
    assert K.markdown_table() in guide, "regenerate it: python -m redline.telemetry.schema"
