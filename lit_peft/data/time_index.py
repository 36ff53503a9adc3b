"""Time axes of forecasting data: TimesFM's frequency index, MASE's season length, calendar
features (GluonTS' time features), the inferred frequency of a time column, and the row bounds of
the time splits. Pure functions of timestamps and pandas aliases, shared by the data modules."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from lit_peft.errors import ConfigError

DAY_NS = 86_400 * 10**9


def timesfm_freq(freq: Union[str, int]) -> int:
    """TimesFM's frequency index for a pandas frequency alias: 0 (high) for periods under 6 days
    (seconds to daily, business days), 1 (medium) up to 85 days (weekly, monthly), 2 (low) beyond
    (quarterly, yearly); an int in {0, 1, 2} is taken as the index itself."""
    if isinstance(freq, (int, np.integer)) and not isinstance(freq, bool):
        if freq not in (0, 1, 2):
            raise ConfigError(f"a TimesFM frequency index is 0, 1 or 2, got {freq}")
        return int(freq)
    import pandas as pd

    try:
        offset = pd.tseries.frequencies.to_offset(str(freq))
    except ValueError as err:
        raise ConfigError(f"unknown frequency '{freq}'; give a pandas alias such as h, 15min, D, W, MS, QS, YS "
                          "or the TimesFM index 0, 1 or 2") from err
    days = period_days(offset)
    return 0 if days < 6 else 1 if days < 85 else 2


def period_days(offset: "Any") -> float:
    """The mean period of a pandas offset in days, whatever its anchor (a month averages 30.4)."""
    import pandas as pd

    start = pd.Timestamp("2001-01-01")
    return (((start + 10 * offset) - (start + offset)) / 9) / pd.Timedelta(days=1)


def seasonality(alias: str) -> int:
    """The season length of a pandas frequency alias, MASE's seasonal naive lag: steps per day below a
    day (24 hourly, 96 at 15 minutes), 7 daily, 5 business-daily, 52 weekly, 12 monthly, 4 quarterly,
    1 yearly or anything else."""
    import pandas as pd

    offset = pd.tseries.frequencies.to_offset(str(alias))
    days = period_days(offset)
    if offset.name.startswith("B") or offset.name.startswith("C"):
        return 5
    if days < 1:
        return max(1, round(1 / days))
    for period, season in ((1, 7), (7, 52), (30.4, 12), (91.3, 4)):
        if abs(days - period) / period < 0.1:
            return season
    return 1


#: calendar features of a timestamp, each scaled to [-0.5, 0.5] (GluonTS' time features)
CALENDAR = {
    "minute_of_hour": lambda t: t.minute / 59.0 - 0.5,
    "hour_of_day": lambda t: t.hour / 23.0 - 0.5,
    "day_of_week": lambda t: t.dayofweek / 6.0 - 0.5,
    "day_of_month": lambda t: (t.day - 1) / 30.0 - 0.5,
    "day_of_year": lambda t: (t.dayofyear - 1) / 365.0 - 0.5,
    "week_of_year": lambda t: (t.isocalendar().week.to_numpy(dtype=np.float64) - 1) / 52.0 - 0.5,
    "month_of_year": lambda t: (t.month - 1) / 11.0 - 0.5,
}


def calendar_features(times_ns: np.ndarray, names: Sequence[str]) -> torch.Tensor:
    """(time, features) of the named ``CALENDAR`` features of int64-nanosecond timestamps."""
    import pandas as pd

    stamps = pd.DatetimeIndex(pd.to_datetime(times_ns))
    return torch.tensor(np.stack([np.asarray(CALENDAR[n](stamps), dtype=np.float64) for n in names], axis=1)
                        if names else np.zeros((len(times_ns), 0))).float()


def infer_freq(times: "Any") -> Optional[str]:
    """The pandas alias of a time index (the most common step where ``pd.infer_freq`` gives up)."""
    import pandas as pd

    head = pd.DatetimeIndex(times[: min(len(times), 2000)])
    alias = pd.infer_freq(head) if len(head) >= 3 else None
    if alias is None and len(head) >= 2:
        steps = pd.Series(head[1:] - head[:-1]).mode()
        alias = pd.tseries.frequencies.to_offset(steps.iloc[0]).freqstr if len(steps) else None
    return alias


def split_bounds(times_ns: np.ndarray, rule: str, ratios: Sequence[float], months: Sequence[int]) -> tuple[int, int, int]:
    """Row indices (b1, b2, b3): train is [0, b1), validation [b1, b2), test [b2, b3)."""
    n = len(times_ns)
    if rule == "ratio":
        if len(ratios) != 3 or any(r <= 0 for r in ratios) or sum(ratios) > 1 + 1e-9:
            raise ConfigError(f"split_ratios must be three positive fractions summing to at most 1, got {list(ratios)}")
        b1 = int(n * ratios[0])
        b2 = b1 + int(n * ratios[1])
        b3 = n if abs(sum(ratios) - 1) < 1e-9 else b2 + int(n * ratios[2])
        return b1, b2, b3
    if rule == "months":
        if len(months) != 3 or any(m <= 0 for m in months):
            raise ConfigError(f"split_months must be three positive month counts, got {list(months)}")
        ends = np.cumsum(months) * 30 * DAY_NS + times_ns[0]
        b1, b2, b3 = (int(np.searchsorted(times_ns, end, side="left")) for end in ends)
        return b1, b2, b3
    raise ConfigError(f"unknown split '{rule}'; use 'ratio' (60/20/20 by default) or 'months' (ETT's 12/4/4)")
