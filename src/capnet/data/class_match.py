"""Match a trained run's classes to a dataset's by name, to evaluate a run on new labelled data.

Names are compared after normalising case, spaces and underscores (``dining_table`` matches
``diningtable``, ``Traffic Light`` matches ``traffic_light``). A class map names the dataset
class for a run class whose name differs (VOC ``motorbike`` is COCO ``motorcycle``). Only the
classes both sides share are scored; the rest are listed, never dropped silently.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from capnet.errors import DataError


def normalise_class_name(name: str) -> str:
    """Lower case without spaces or underscores: the key two class names are compared by."""
    return "".join(name.lower().replace("_", " ").split())


@dataclass(frozen=True)
class ClassMatch:
    """Which run classes are scored against which dataset columns, and what is left out."""

    run_index: List[int]  # run class indices that are scored, in run order
    data_index: List[int]  # the dataset column of each, aligned with run_index
    absent: List[str] = field(default_factory=list)  # run classes the data lacks (not scored)
    unknown: List[str] = field(default_factory=list)  # dataset classes the run does not know (ignored)
    renamed: Dict[str, str] = field(default_factory=dict)  # run name -> dataset name where they differ


def _by_key(names: Sequence[str], where: str) -> Dict[str, int]:
    """normalised name -> index; two names that normalise alike are ambiguous."""
    out: Dict[str, int] = {}
    for i, name in enumerate(names):
        key = normalise_class_name(name)
        if key in out:
            raise DataError(f"{where}: classes '{names[out[key]]}' and '{name}' are the same name after "
                            "normalising case, spaces and underscores")
        out[key] = i
    return out


def _hint(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def match_classes(run_classes: Sequence[str], data_classes: Sequence[str],
                  class_map: Optional[Mapping[str, str]] = None, where: str = "dataset") -> ClassMatch:
    """Pair run classes with dataset classes by normalised name, ``class_map`` (run -> data) first."""
    run_keys = _by_key(run_classes, "the run")
    data_keys = _by_key(data_classes, where)
    mapping: Dict[int, str] = {}
    for run_name, data_name in (class_map or {}).items():
        i = run_keys.get(normalise_class_name(run_name))
        if i is None:
            raise DataError(f"class map {run_name}={data_name}: '{run_name}' is not a class of the run"
                            f"{_hint(run_name, run_classes)}")
        if normalise_class_name(data_name) not in data_keys:
            raise DataError(f"class map {run_name}={data_name}: '{data_name}' is not a class of {where}"
                            f"{_hint(data_name, data_classes)}")
        mapping[i] = data_name
    run_index: List[int] = []
    data_index: List[int] = []
    owner: Dict[int, str] = {}
    for i, name in enumerate(run_classes):
        j = data_keys.get(normalise_class_name(mapping.get(i, name)))
        if j is None:
            continue
        if j in owner:
            raise DataError(f"{where}: run classes '{owner[j]}' and '{name}' both match '{data_classes[j]}'")
        owner[j] = name
        run_index.append(i)
        data_index.append(j)
    if not run_index:
        raise DataError(
            f"{where}: none of the run's {len(run_classes)} classes ({', '.join(run_classes)}) is among the data's "
            f"{len(data_classes)} classes ({', '.join(data_classes)}); map names that differ as run_name=data_name")
    scored = set(run_index)
    return ClassMatch(
        run_index, data_index,
        absent=[c for i, c in enumerate(run_classes) if i not in scored],
        unknown=[c for j, c in enumerate(data_classes) if j not in owner],
        renamed={run_classes[i]: data_classes[j] for i, j in zip(run_index, data_index)
                 if run_classes[i] != data_classes[j]},
    )
