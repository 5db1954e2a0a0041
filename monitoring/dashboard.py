"""The Grafana dashboard, built with grafana-foundation-sdk (Grafana's own typed builders) from
the panel list below. ``python -m forwardflow.monitoring.dashboard`` rewrites the committed JSON
(monitoring/grafana/dashboards/forwardflow.json); ``--check`` only compares, and a test keeps
the two equal.

Every query selects ``run_id=~"$run_id"``: the run selector at the top of the dashboard lists
the runs Prometheus has seen (``forwardflow_run_info``), newest first, and allows several."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh, VariableSort

DASHBOARD_PATH = Path(__file__).parent / "grafana" / "dashboards" / "forwardflow.json"
DASHBOARD_UID = "forwardflow-training"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
PANEL_KINDS = ("timeseries", "stat", "bargauge")
# Series that only a regression task (the adding problem) fills: a classification run leaves their
# panel empty.
REGRESSION_SERIES = ("forwardflow_test_mean_squared_error",)
RUN = '{run_id=~"$run_id"}'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None

    def __post_init__(self):
        if self.kind not in PANEL_KINDS:
            raise ValueError(f"panel {self.title!r}: kind {self.kind!r} is not one of {', '.join(PANEL_KINDS)}")
        if not self.queries:
            raise ValueError(f"panel {self.title!r} has no query")
        if not 1 <= self.width <= 24:
            raise ValueError(f"panel {self.title!r}: width must be 1 to 24 grid columns")


def _rate(metric: str, by: str = "run_id, stage") -> str:
    return f"sum by ({by}) (rate({metric}{RUN}[$__rate_interval]))"


def _range_share(part: str) -> str:
    """One part of a stage's time over the dashboard's range, as a share of all three."""

    def increase(name: str) -> str:
        return f"sum by (run_id, stage) (increase(forwardflow_stage_{name}_seconds_total{RUN}[$__range]))"

    return f"{increase(part)} / ({increase('compute')} + {increase('wait')} + {increase('handoff')})"


def _quantile(q: float) -> str:
    return (
        f"histogram_quantile({q}, sum by (run_id, stage, le) "
        f"(rate(forwardflow_stage_step_seconds_bucket{RUN}[$__rate_interval])))"
    )


ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Throughput and progress",
        (
            PanelSpec(
                "Training samples/s",
                "Training samples per second whose predictions came back to the driver.",
                (Query(f"forwardflow_train_samples_per_second{RUN}", "{{run_id}}"),),
                unit="short",
            ),
            PanelSpec(
                "Throughput per stage",
                "Training samples per second each stage processes. In a healthy "
                "pipeline all stages run at the same rate; the bottleneck sets it.",
                (Query(_rate("forwardflow_stage_samples_total"), "stage {{stage}}"),),
                unit="short",
            ),
            PanelSpec(
                "Progress",
                "Fraction of the run's microbatches completed.",
                (Query(f"forwardflow_progress_ratio{RUN}", "{{run_id}}"),),
                unit="percentunit",
                kind="stat",
                width=8,
                height=4,
                min=0,
                max=1,
            ),
            PanelSpec(
                "Epoch",
                "Epoch of the latest completed microbatch (1-based).",
                (Query(f"forwardflow_epoch{RUN}", "{{run_id}}"),),
                kind="stat",
                width=8,
                height=4,
            ),
            PanelSpec(
                "Time left",
                "Estimated time left: elapsed time x (1 - progress) / progress.",
                (Query(f"forwardflow_eta_seconds{RUN}", "{{run_id}}"),),
                unit="s",
                kind="stat",
                width=8,
                height=4,
            ),
        ),
    ),
    (
        "Bottleneck",
        (
            PanelSpec(
                "Compute / wait / hand-on per stage",
                "Fraction of wall time each stage spends computing, waiting for its input (starved: the "
                "bottleneck is upstream, or the driver does not feed fast enough) and handing its output on.",
                (
                    Query(_rate("forwardflow_stage_compute_seconds_total"), "stage {{stage}} compute"),
                    Query(_rate("forwardflow_stage_wait_seconds_total"), "stage {{stage}} wait"),
                    Query(_rate("forwardflow_stage_handoff_seconds_total"), "stage {{stage}} hand-on"),
                ),
                unit="percentunit",
                min=0,
            ),
            PanelSpec(
                "Compute share per stage (dashboard range)",
                "Share of each stage's time spent computing over the selected time range: the stage "
                "nearest 100% is the bottleneck; low shares mean the stage mostly waits.",
                (Query(_range_share("compute"), "stage {{stage}}", instant=True),),
                unit="percentunit",
                kind="bargauge",
                min=0,
                max=1,
            ),
            PanelSpec(
                "Queued microbatches per stage and in flight",
                "Microbatches handed to each stage that it has not finished (its input queue plus the one "
                "it computes), and all microbatches in flight between the driver's submit and its "
                "collection (at most --window). A queue that stays full sits in front of the bottleneck.",
                (
                    Query(f"forwardflow_stage_queued_microbatches{RUN}", "stage {{stage}} queued"),
                    Query(f"forwardflow_microbatches_in_flight{RUN}", "in flight"),
                ),
                unit="short",
                min=0,
            ),
            PanelSpec(
                "Step time per stage (p50, p95)",
                "Compute time of one training microbatch per stage, from the step-time histogram.",
                (Query(_quantile(0.5), "stage {{stage}} p50"), Query(_quantile(0.95), "stage {{stage}} p95")),
                unit="s",
                min=0,
            ),
        ),
    ),
    (
        "Learning",
        (
            PanelSpec(
                "Local loss per stage",
                "Each stage's own local loss, mean over the training microbatches since the previous collection.",
                (Query(f"forwardflow_stage_loss{RUN}", "stage {{stage}}"),),
            ),
            PanelSpec(
                "Accuracy over time",
                "Test accuracy after each epoch (per predictor), and each stage's "
                "nearest-target accuracy on its training microbatches.",
                (
                    Query(f"forwardflow_test_accuracy_ratio{RUN}", "test {{predictor}}"),
                    Query(f"forwardflow_stage_train_accuracy_ratio{RUN}", "stage {{stage}} train"),
                ),
                unit="percentunit",
                min=0,
                max=1,
            ),
            PanelSpec(
                "Relative update size per stage",
                "Norm of the change of a stage's weights between two "
                "collections over the norm of its weights: a stage that stopped learning drops to 0.",
                (Query(f"forwardflow_stage_update_norm{RUN} / forwardflow_stage_weight_norm{RUN}", "stage {{stage}}"),),
                min=0,
            ),
            PanelSpec(
                "Weight norm and learning rate per stage",
                "L2 norm of each stage's weights, and its optimizer's learning rate.",
                (
                    Query(f"forwardflow_stage_weight_norm{RUN}", "stage {{stage}} weight norm"),
                    Query(f"forwardflow_stage_learning_rate{RUN}", "stage {{stage}} learning rate"),
                ),
            ),
        ),
    ),
    (
        "Sequences",
        (
            PanelSpec(
                "Time step per stage",
                "Sequence data: the time step each stage finished last, against the sequences' length. The "
                "stream carries one time step per microbatch, so stage l works on step t while stage l+1 "
                "works on step t-1: the pipeline fills in time as well as in depth.",
                (
                    Query(f"forwardflow_stage_time_step{RUN}", "stage {{stage}}"),
                    Query(f"max by (run_id) (forwardflow_stage_sequence_length{RUN})", "sequence length"),
                ),
                unit="short",
                min=0,
            ),
            PanelSpec(
                "Updates per second per stage",
                "Optimizer steps per second of each stage: every time step for rules that learn at every step "
                "(Signal Propagation), once per sequence for backpropagation through time, every k1 steps "
                "for truncated BPTT.",
                (Query(_rate("forwardflow_stage_updates_total"), "stage {{stage}}"),),
                unit="short",
                min=0,
            ),
            PanelSpec(
                "Test mean squared error",
                "Regression tasks (the adding problem): the test mean squared error after each epoch, per "
                "predictor. Always predicting the mean target scores 0.167 on the adding problem.",
                (Query(f"forwardflow_test_mean_squared_error{RUN}", "test {{predictor}}"),),
                unit="short",
                min=0,
            ),
        ),
    ),
    (
        "Resources and health",
        (
            PanelSpec(
                "Memory per device",
                "GPU memory allocated by each stage (process RSS for a stage on a CPU), and its peak.",
                (
                    Query(f"forwardflow_stage_memory_bytes{RUN}", "stage {{stage}} on {{device}}"),
                    Query(f"forwardflow_stage_peak_memory_bytes{RUN}", "stage {{stage}} on {{device}} peak"),
                ),
                unit="bytes",
                min=0,
            ),
            PanelSpec(
                "Actor restarts",
                "Stage actors recreated after a lost process or node (--max-restarts); every stage then "
                "went back to the last checkpoint. Ray's own restarts stay off.",
                (Query(f"sum by (run_id) (forwardflow_actor_restarts_total{RUN})", "{{run_id}}"),),
                kind="stat",
                width=6,
            ),
            PanelSpec(
                "Errors",
                "Errors that stopped the run, per kind: non_finite_loss (a local loss became "
                "NaN or inf), or the error's class (RayActorError when a stage's actor died).",
                (Query(f"sum by (run_id, kind) (forwardflow_errors_total{RUN})", "{{kind}}"),),
                kind="stat",
                width=6,
            ),
        ),
    ),
)


def _query(query: Query, ref_id: str) -> prometheus.Dataquery:
    built = prometheus.Dataquery().expr(query.expr).legend_format(query.legend or "__auto").ref_id(ref_id)
    return built.instant() if query.instant else built.range()


def _panel(spec: PanelSpec, panel_id: int):
    kinds: dict[str, Any] = {"timeseries": timeseries.Panel, "stat": stat.Panel, "bargauge": bargauge.Panel}
    builder = kinds[spec.kind]()
    panel = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .span(spec.width)
        .height(spec.height)
    )
    for index, query in enumerate(spec.queries):
        panel = panel.with_target(_query(query, chr(ord("A") + index)))
    if spec.min is not None:
        panel = panel.min(spec.min)
    if spec.max is not None:
        panel = panel.max(spec.max)
    if spec.kind == "timeseries":
        panel = panel.legend(
            VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM).show_legend(True)
        )
    return panel


def build_dashboard() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("forwardflow: layer-parallel training")
        .uid(DASHBOARD_UID)
        .tags(["forwardflow", "training", "ray"])
        .refresh("5s")
        .time("now-30m", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .timezone("browser")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("run_id")
            .label("Run")
            .datasource(DATASOURCE)
            .query("label_values(forwardflow_run_info, run_id)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_DESC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    panel_id = 0
    for title, panels in ROWS:
        panel_id += 1
        board = board.with_row(dashboard.Row(title).id(panel_id))
        for spec in panels:
            panel_id += 1
            board = board.with_panel(_panel(spec, panel_id))
    return board


def dashboard_json() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build_dashboard().build()) + "\n"


def panel_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel of a dashboard's JSON."""
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        if panel.get("type") != "row"
        for target in panel.get("targets", ())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forwardflow.monitoring.dashboard",
        description=f"Write the Grafana dashboard to {DASHBOARD_PATH}.",
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file differs")
    args = parser.parse_args(argv)
    text = dashboard_json()
    if args.check:
        same = DASHBOARD_PATH.is_file() and DASHBOARD_PATH.read_text() == text
        print(f"{DASHBOARD_PATH}: {'up to date' if same else 'differs from monitoring/dashboard.py'}")
        return 0 if same else 1
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(text)
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
