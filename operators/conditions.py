"""What both decision modules share: the plan they return, conditions with honest transition times, timestamps,
durations, events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Want:
    """A condition as a decision wants it; `set_conditions` adds the times."""

    type: str
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the object being reconciled."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Action:
    """One write to the API, as a decision wants it."""

    verb: str  # create, patch or delete
    kind: str
    name: str
    body: Mapping | None = None  # the object to create, or the JSON merge patch


@dataclass
class Plan:
    """What a decision (decide_experiment, decide_run) wants done about its object: operators/reconcile.py's
    `apply` writes the object's whole status, then the actions in their order, then posts the events."""

    actions: list[Action]
    status: dict
    events: list[Event]


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def set_conditions(previous: Sequence[Mapping], wanted: Sequence[Want], now: datetime,
                   generation: int | None) -> list[dict]:
    """The conditions to write: `lastTransitionTime` moves only when a condition's status flips (as in
    metav1.Condition), so a reconcile that changes nothing writes nothing."""
    before = {c.get("type"): c for c in previous}
    result = []
    for want in wanted:
        status = "True" if want.status else "False"
        old = before.get(want.type)
        moved = old is None or old.get("status") != status
        condition = {
            "type": want.type,
            "status": status,
            "reason": want.reason,
            "message": want.message,
            "lastTransitionTime": rfc3339(now) if moved else old.get("lastTransitionTime"),
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        result.append(condition)
    return result


def condition(conditions: Sequence[Mapping] | None, kind: str) -> Mapping | None:
    return next((c for c in conditions or () if c.get("type") == kind), None)


def is_true(conditions: Sequence[Mapping] | None, kind: str) -> bool:
    found = condition(conditions, kind)
    return found is not None and found.get("status") == "True"


def human_duration(seconds: float) -> str:
    """42s, 7m, 1h20m, 2d3h: what `kubectl get` shows for ages, here for times left."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"
