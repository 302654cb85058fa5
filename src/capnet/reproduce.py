"""The paper's tables as data: one YAML per table under configs/tables/, each row a list of configs.

A table file names its settings (dataset x backbone: the paper config of each, e.g.
``voc_lt_vit_b16.yaml``, and the dataset folder under ``--data-root``) and its methods (the
experiment configs added on top, e.g. ``experiments/zeroshot.yaml``), or lists its rows
explicitly; ``common`` configs and overrides go on every row. A row's config is therefore exactly
what ``capnet train --config <setting> --config <method> --set ...`` would run: the protocol
(validation carve-out, epoch selection, refit) is whatever those configs say, nothing here sets it.

Rows run one after another through :func:`capnet.experiment.train_run`, each in ``OUT/<row>``; a
row whose run directory already finished the same config (``metrics.json`` with the same
``config_sha256``) is read back, not rerun; a row that fails is recorded with its error and the
next row runs. ``table.json`` and ``table.md`` put every row beside the published figure it
matches (``configs/tables/published.yaml``: value, source, whether quoted second-hand).
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from capnet.config import ConfigError
from capnet.errors import CapnetError, one_line

log = logging.getLogger(__name__)

METRICS = ("mAP", "head", "medium", "tail")
PUBLISHED_FILE = "published.yaml"


def default_tables_dir() -> Path:
    """configs/tables of the checkout this module runs from."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "configs" / "tables").is_dir():
            return parent / "configs" / "tables"
    raise CapnetError("configs/tables not found: run from a source checkout of capnet (the tables are YAML files there)")


@dataclass(frozen=True)
class Row:
    """One run of a table: its configs (paths), its overrides and the published row it matches."""

    name: str  # "<setting>.<method>": the run directory under OUT
    setting: str
    method: str
    label: str
    configs: List[Path]
    overrides: List[str]
    data_dir: Optional[str]  # dataset folder under --data-root
    backbone: str  # tag --weights is keyed by (rn50, vit_b16)
    published: Optional[str]  # key into published.yaml (with the setting appended)


@dataclass(frozen=True)
class Table:
    """A paper table: title, where it is in the paper, its rows."""

    name: str
    title: str
    paper_table: str
    rows: List[Row]
    path: Path


def _read_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the table file: {one_line(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a table file is a mapping (title, settings, methods or rows)")
    return raw


def _paths(configs_dir: Path, names: Sequence[str], where: str) -> List[Path]:
    out = []
    for name in names or []:
        path = configs_dir / name
        if not path.is_file():
            raise ConfigError(f"{where}: config {name} not found under {configs_dir}")
        out.append(path)
    return out


def load_table(path: Path) -> Table:
    """Read one table file (see the module docstring); every config it names must exist."""
    path = Path(path)
    raw = _read_yaml(path)
    configs_dir = path.resolve().parent.parent  # configs/tables/x.yaml -> configs/
    known = {"title", "paper_table", "common", "settings", "methods", "rows"}
    if set(raw) - known:
        raise ConfigError(f"{path}: unknown key(s) {sorted(set(raw) - known)} (known: {sorted(known)})")
    common = raw.get("common") or {}
    settings = raw.get("settings") or {}
    methods = raw.get("methods") or {}
    spec = raw.get("rows") or [{"setting": s, "method": m} for s in settings for m in methods]
    rows = []
    for item in spec:
        s_name, m_name = item.get("setting"), item.get("method")
        if s_name not in settings:
            raise ConfigError(f"{path}: row {item} names setting {s_name!r}; settings: {sorted(settings)}")
        setting, method = settings[s_name], {**methods.get(m_name, {}), **item}
        where = f"{path} row {s_name}.{m_name}"
        configs = _paths(configs_dir, list(setting.get("configs", [])) + list(common.get("configs", []))
                         + list(method.get("configs", [])), where)
        overrides = [str(o) for o in list(setting.get("set", [])) + list(common.get("set", [])) + list(method.get("set", []))]
        rows.append(Row(f"{s_name}.{m_name}", s_name, m_name, str(method.get("label", m_name)), configs, overrides,
                        setting.get("data_dir"), str(setting.get("backbone", "")), method.get("published")))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two rows share a name ({sorted(n for n in names if names.count(n) > 1)[0]})")
    return Table(path.stem, str(raw.get("title", path.stem)), str(raw.get("paper_table", "")), rows, path)


def list_tables(folder: Optional[Path] = None) -> List[Table]:
    """Every table file in ``folder`` (default: configs/tables), by name."""
    folder = Path(folder) if folder else default_tables_dir()
    return [load_table(p) for p in sorted(folder.glob("*.yaml")) if p.name != PUBLISHED_FILE]


def find_table(name: str, folder: Optional[Path] = None) -> Table:
    """The table called ``name`` (a file name in configs/tables) or at the path ``name``."""
    folder = Path(folder) if folder else default_tables_dir()
    path = Path(name) if name.endswith(".yaml") else folder / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(t.name for t in list_tables(folder))
        raise CapnetError(f"no table {name!r} (tables: {names}; `capnet reproduce --list` describes them)")
    return load_table(path)


def load_published(folder: Optional[Path] = None) -> Dict[str, Dict[str, Any]]:
    """published.yaml's ``rows``: key -> {mAP, head, medium, tail, method, source, second_hand, ...}."""
    folder = Path(folder) if folder else default_tables_dir()
    raw = _read_yaml(folder / PUBLISHED_FILE)
    rows = raw.get("rows") or {}
    for key, entry in rows.items():
        if not isinstance(entry, dict) or "source" not in entry:
            raise ConfigError(f"{folder / PUBLISHED_FILE}: row {key} needs a source (or 'not found')")
    return rows


def _selected(item: str, row: Row) -> Optional[str]:
    """``PATTERN:key=value`` applies to rows whose name matches PATTERN; a plain ``key=value`` to all."""
    key = item.split("=", 1)[0]
    if ":" not in key:
        return item
    pattern, rest = item.split(":", 1)
    return rest if fnmatch.fnmatchcase(row.name, pattern) else None


def row_overrides(row: Row, data_root: Optional[Path], weights: Mapping[str, str], overrides: Sequence[str]) -> List[str]:
    """The row's own overrides, then data.root under ``data_root``, model.weights, then the user's."""
    out = list(row.overrides)
    if data_root is not None and row.data_dir:
        out.append(f"data.root={Path(data_root) / row.data_dir}")
    path = weights.get(row.backbone) or weights.get("*")
    if path:
        out.append(f"model.weights={path}")
    return out + [o for o in (_selected(item, row) for item in overrides) if o is not None]


@dataclass
class RowResult:
    """What one row gave: its metrics (or error) beside the published figure."""

    row: Row
    status: str  # ok | reused | failed
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    seconds: float = 0.0
    error: Optional[str] = None
    recipe: Dict[str, Any] = field(default_factory=dict)
    published: Optional[Dict[str, Any]] = None
    overrides: List[str] = field(default_factory=list)  # every override the row ran with (its own, then the user's)

    def record(self, out: Path) -> Dict[str, Any]:
        r = self.row
        return {"name": r.name, "setting": r.setting, "method": r.method, "label": r.label, "status": self.status,
                "metrics": self.metrics, "seconds": round(self.seconds, 1), "error": self.error,
                "run_dir": str(out / r.name), "configs": [p.name if p.parent.name == "configs" else
                                                          f"{p.parent.name}/{p.name}" for p in r.configs],
                "overrides": list(self.overrides), "recipe": self.recipe, "published_key": r.published,
                "published": self.published}


def _recipe(cfg: Any) -> Dict[str, Any]:
    """What a reader needs to tell rows apart, read from the resolved config (a record, not a setting)."""
    return {"kind": cfg.model.kind, "backbone": cfg.model.backbone, "peft": cfg.model.peft.method,
            "loss": cfg.loss.name, "epochs": cfg.train.epochs, "select": cfg.train.select,
            "val_fraction": cfg.data.val_fraction, "refit": cfg.train.refit, "views": cfg.tte.views}


def _scores(metrics: Mapping[str, Any]) -> Dict[str, Optional[float]]:
    """total / head / medium / tail mAP; a group without classes (NaN) becomes None."""
    out: Dict[str, Optional[float]] = {}
    for k in METRICS:
        v = metrics.get(k)
        out[k] = None if v is None or v != v else float(v)
    return out


def _same_config(run_dir: Path, cfg: Any) -> bool:
    """Whether ``run_dir`` was started with ``cfg`` (its config.yaml hashes alike): only such a run is
    resumed; a row whose config changed since is trained afresh, not failed on the resume check."""
    from capnet.config import ConfigError, config_hash, load_config

    try:
        return config_hash(load_config([str(run_dir / "config.yaml")])) == config_hash(cfg)
    except (OSError, ConfigError):
        return False


def run_row(row: Row, out: Path, overrides: List[str], cache_dir: Optional[Path], resume: bool) -> RowResult:
    """Train and score one row (or read back its finished run); any failure becomes the row's error."""
    from capnet.config import load_config
    from capnet.experiment import finished_run, train_run

    run_dir = out / row.name
    start = time.perf_counter()
    try:
        cfg = load_config([str(p) for p in row.configs], overrides)
        recipe = _recipe(cfg)
        done = finished_run(run_dir, cfg) if resume else None
        if done is not None:
            log.info("%s: finished before in %s, read back", row.name, run_dir)
            return RowResult(row, "reused", _scores(done), 0.0, None, recipe, overrides=overrides)
        log.info("%s: training (%s)", row.name, ", ".join(p.name for p in row.configs))
        metrics = train_run(cfg, run_dir, resume=resume and _same_config(run_dir, cfg), cache_dir=cache_dir)
        return RowResult(row, "ok", _scores(metrics), time.perf_counter() - start, None, recipe, overrides=overrides)
    except Exception as err:  # noqa: BLE001  (one row's failure must not stop the table)
        log.warning("%s failed: %s", row.name, one_line(err), exc_info=not isinstance(err, CapnetError))
        return RowResult(row, "failed", {}, time.perf_counter() - start, one_line(err), overrides=overrides)
    finally:
        _free_accelerator()


def _free_accelerator() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_table(table: Table, out: Path, data_root: Optional[Path] = None, weights: Optional[Mapping[str, str]] = None,
              overrides: Sequence[str] = (), cache_dir: Optional[Path] = None, only: Sequence[str] = (),
              resume: bool = True, published: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Run every row of ``table`` (or those matching a glob in ``only``) and write table.json + table.md."""
    out = Path(out)
    rows = [r for r in table.rows if not only or any(fnmatch.fnmatchcase(r.name, p) for p in only)]
    if not rows:
        raise CapnetError(f"no row of table {table.name} matches {', '.join(only)} (rows: {', '.join(r.name for r in table.rows)})")
    published = load_published(table.path.parent) if published is None else published
    results = []
    for k, row in enumerate(rows, 1):
        log.info("row %d/%d: %s", k, len(rows), row.name)
        result = run_row(row, out, row_overrides(row, data_root, weights or {}, overrides), cache_dir, resume)
        key = f"{row.published}.{row.setting}" if row.published else None
        result.published = published.get(key) if key else None
        if key and result.published is None:
            result.published = {"source": "not found", **{m: None for m in METRICS}}
        results.append(result)
        write_results(table, results, out)  # after every row: an interrupted table keeps what it has
    return {"table": table.name, "rows": [r.record(out) for r in results]}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def render_markdown(table: Table, results: Sequence[RowResult], out: Path) -> str:
    """table.md: one line per row, capnet's mAPs beside the published ones and their source."""
    lines = [f"# {table.title}", ""]
    if table.paper_table:
        lines += [f"Paper: {table.paper_table}.", ""]
    lines += ["Measured: test mAP of each row's run (its run directory under this folder). Published: the",
              "figure the row matches in configs/tables/published.yaml (* quoted second-hand; - none found). A",
              "published figure follows its paper's own protocol (LMPT and LT-GCN report the best test epoch,",
              "docs/protocol.md); the measured rows follow their configs' (CAPNET: the last epoch).", "",
              "| row | method | views | mAP | head | medium | tail | published mAP | head | medium | tail | published source | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        pub = r.published or {}
        star = "*" if pub.get("second_hand") else ""
        status = r.status if r.error is None else f"failed: {r.error}".replace("|", "/")
        measured = [_fmt(r.metrics.get(m)) for m in METRICS]
        shown = [(_fmt(pub.get(m)) + star) if pub.get(m) is not None else "-" for m in METRICS]
        source = str(pub.get("source", "-")).replace("|", "/")
        views = (r.recipe or {}).get("views", "-")
        lines.append(f"| {r.row.name} | {r.row.label} | {views} | " + " | ".join(measured + shown) + f" | {source} | {status} |")
    return "\n".join(lines) + "\n"


def write_results(table: Table, results: Sequence[RowResult], out: Path) -> None:
    """table.json (every field) and table.md, written atomically."""
    from capnet.fileio import atomic_write_bytes, write_json_atomic

    failed = [r.row.name for r in results if r.status == "failed"]
    write_json_atomic(out / "table.json", {"table": table.name, "title": table.title, "paper_table": table.paper_table,
                                           "table_file": str(table.path), "failed": failed,
                                           "rows": [r.record(out) for r in results]})
    atomic_write_bytes(render_markdown(table, results, out).encode(), out / "table.md")
