"""When a schedule fires: a cron expression read in a time zone, or a fixed interval.

A tick is an instant, in whole epoch seconds. Two ways to name them:

- `cron`: a five-field expression (or @hourly, @daily, @weekly, @monthly, @yearly)
  read as wall-clock times in `timezone`. Around daylight-saving changes each
  wall-clock time the expression names fires once:
  * a time that does not exist (spring forward, e.g. 02:30 in Europe/Paris on the
    last Sunday of March) fires as if the clock had not jumped yet, which is the
    same instant as one hour later on the new clock (02:30 -> 03:30 CEST = 01:30 UTC);
  * a time that happens twice (fall back, 02:30 on the last Sunday of October)
    fires once, at its first occurrence (02:30 CEST = 00:30 UTC).
  Two wall-clock times that land on one instant fire once.
- `every`: multiples of a whole number of seconds since 1970-01-01 00:00 UTC, so
  `every=15m` fires at :00, :15, :30 and :45 whatever the time zone (which only
  changes how logical dates are written).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from keel.errors import ScheduleError

CRON_HELP = (
    "Use five fields (minute hour day-of-month month day-of-week), e.g. '0 3 * * *' "
    "for 03:00 every day or '*/15 * * * *', or one of @hourly @daily @weekly @monthly @yearly"
)
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Wall-clock times and instants differ by at most a day-light saving shift; searching
# this far around an instant finds every wall-clock time that could land near it.
_MARGIN = timedelta(hours=3)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_EVERY = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`, or a ScheduleError that suggests close names."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        pass
    from zoneinfo import available_timezones

    close = difflib.get_close_matches(str(name), sorted(available_timezones()), n=3)
    hint = "Use an IANA time zone name such as UTC, Europe/Paris or America/New_York"
    if close:
        hint += f"; did you mean {', '.join(close)}?"
    raise ScheduleError(f"unknown time zone {name!r}", hint=hint)


def parse_every(value: str | float | timedelta) -> int:
    """An interval as whole seconds: 90, '90s', '15m', '1h30m', '2d', '1w', a timedelta."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _EVERY.findall(text)
            if not parts or _EVERY.sub("", text).strip():
                raise ScheduleError(
                    f"bad interval {value!r}",
                    hint="Write e.g. 30s, 15m, 1h30m, 2d or 1w (or a number of seconds)",
                ) from None
            seconds = sum(float(n) * _UNITS[unit] for n, unit in parts)
    else:
        raise ScheduleError(f"bad interval {value!r}", hint="Give e.g. '15m' or a timedelta")
    if not math.isfinite(seconds) or seconds < 1 or seconds != int(seconds):
        raise ScheduleError(
            f"interval {value!r} must be a whole number of seconds, at least 1",
            hint="Write e.g. 1s, 15m or 1h",
        )
    return int(seconds)


def describe_every(seconds: float) -> str:
    left, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


def parse_instant(
    value: datetime | str | float, tz: ZoneInfo, what: str = "time", *, end: bool = False
) -> float:
    """Epoch seconds of an aware datetime, an ISO 8601 string or a number; a naive
    datetime or string is read in `tz`. With `end`, a date alone ('2024-01-31') means
    the last second of that day, so that the day is included."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if end and _DATE_ONLY.fullmatch(text):
            following = datetime.fromisoformat(text) + timedelta(days=1)
            return following.replace(tzinfo=tz).timestamp() - 1
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ScheduleError(
                f"{what} {value!r} is not an ISO 8601 date or time",
                hint="Write e.g. 2024-01-31, 2024-01-31T03:00 or 2024-01-31T03:00:00+01:00",
            ) from None
    if not isinstance(value, datetime):
        raise ScheduleError(f"{what} must be a datetime or an ISO 8601 string, got {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return value.timestamp()


@dataclass(frozen=True)
class Cadence:
    cron: str | None
    every: int | None
    timezone: str = "UTC"

    @classmethod
    def parse(
        cls, *, cron: str | None, every: str | float | timedelta | None, timezone: str = "UTC"
    ) -> Cadence:
        """Check a cadence as a user gave it; raises ScheduleError naming what is wrong."""
        if (cron is None) == (every is None):
            raise ScheduleError(
                "a schedule needs exactly one of cron and every",
                hint="e.g. cron='0 3 * * *' (with a timezone) or every='15m'",
            )
        zone(timezone)
        if every is not None:
            return cls(cron=None, every=parse_every(every), timezone=timezone)
        assert cron is not None
        made = cls(cron=_check_cron(cron), every=None, timezone=timezone)
        try:
            made.next_after(datetime.now().timestamp())
        except Exception as exc:
            if not type(exc).__module__.startswith("croniter"):
                raise
            # croniter found no such date (e.g. the 30th of February)
            raise ScheduleError(
                f"cron expression {cron!r} never fires: {exc}",
                hint="Check its day-of-month and month fields name a date that exists",
            ) from None
        return made

    @cached_property
    def tz(self) -> ZoneInfo:
        return zone(self.timezone)

    def describe(self) -> str:
        if self.every is not None:
            return f"every {describe_every(self.every)}"
        return f"cron {self.cron} ({self.timezone})"

    def local_iso(self, instant: float) -> str:
        """How a logical date is written: ISO 8601 in the cadence's time zone."""
        return datetime.fromtimestamp(instant, self.tz).isoformat()

    # -- ticks ------------------------------------------------------------------
    def next_after(self, instant: float) -> float:
        """The first tick strictly after `instant`."""
        return next(self._forward(instant))

    def first_at_or_after(self, instant: float) -> float:
        return self.next_after(math.ceil(instant) - 1)

    def between(self, start: float, end: float, limit: int | None = None) -> list[float]:
        """Ticks t with start <= t <= end, in order (at most `limit` of them)."""
        out: list[float] = []
        for t in self._forward(math.ceil(start) - 1):
            if t > end or (limit is not None and len(out) >= limit):
                break
            out.append(t)
        return out

    def last_at_or_before(self, instant: float) -> float:
        """The latest tick at or before `instant`."""
        if self.every is not None:
            return float(math.floor(instant / self.every) * self.every)
        it = self._croniter(self._naive(instant) + _MARGIN)
        floor = self._naive(instant) - _MARGIN
        best: float | None = None
        while True:
            wall = it.get_prev(datetime)
            t = self._instant(wall)
            if t <= instant and (best is None or t > best):
                best = t
            if wall < floor and best is not None:
                return best

    def _forward(self, after: float) -> Iterator[float]:
        """Ticks strictly after `after`, strictly increasing."""
        if self.every is not None:
            k = math.floor(after / self.every) + 1
            while True:
                yield float(k * self.every)
                k += 1
        it = self._croniter(self._naive(after) - _MARGIN)
        last = after
        while True:
            t = self._instant(it.get_next(datetime))
            if t > last:  # skips instants already passed, and a second wall time on one
                last = t
                yield t

    def _croniter(self, start: datetime) -> Any:
        from croniter import croniter  # type: ignore[import-untyped]

        return croniter(self.cron, start)

    def _naive(self, instant: float) -> datetime:
        return datetime.fromtimestamp(instant, self.tz).replace(tzinfo=None)

    def _instant(self, wall: datetime) -> float:
        # fold=0: a repeated wall time is its first occurrence, a skipped one is read
        # with the offset from before the jump (PEP 495).
        return wall.replace(tzinfo=self.tz, fold=0).timestamp()


def _check_cron(expr: str) -> str:
    if not isinstance(expr, str) or not expr.strip():
        raise ScheduleError(f"bad cron expression {expr!r}: it is empty", hint=CRON_HELP)
    text = " ".join(expr.split())
    text = _ALIASES.get(text.lower(), text)
    if text.startswith("@"):
        raise ScheduleError(f"bad cron expression {expr!r}: unknown alias", hint=CRON_HELP)
    fields = text.split(" ")
    if len(fields) != 5:
        raise ScheduleError(
            f"bad cron expression {expr!r}: it has {len(fields)} field"
            f"{'s' if len(fields) != 1 else ''}, keel reads exactly 5",
            hint=CRON_HELP,
        )
    from croniter import croniter  # type: ignore[import-untyped]

    try:
        croniter(text, datetime(2000, 1, 1))
    except Exception as exc:  # croniter's errors are ValueError/KeyError subclasses
        reason = str(exc).replace(f"[{text}] ", "").strip() or type(exc).__name__
        raise ScheduleError(f"bad cron expression {expr!r}: {reason}", hint=CRON_HELP) from None
    return text
