"""``python -m reproduce``: run (or resume) the reproduction, then write its report.

python -m reproduce                          # preset full -> runs/reproduce, docs/results.md
python -m reproduce --preset smoke           # -> runs/reproduce-smoke (its report included)
python -m reproduce --report-only            # the report of whatever has finished
python -m reproduce --list                   # the stages, their commands and which are done
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from reproduce import figures, report
from reproduce.results import collect, training_step
from reproduce.runner import is_done, run_stages
from reproduce.stages import PRESETS, Paths, build_plan, default_paths
from sgexp.checks import check_choice, fail

log = logging.getLogger("reproduce")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="full", help=f"one of {list(PRESETS)} (%(default)s)")
    parser.add_argument("--work-dir", type=Path, help="runs, stage markers and logs (default runs/reproduce)")
    parser.add_argument("--data-dir", type=Path, help="prepared datasets (default data/shards)")
    parser.add_argument("--docs-dir", type=Path, help="results.md and PNGs (default docs/ for the full preset)")
    parser.add_argument("--jobs", type=int, default=2, help="stages run side by side, one core each (%(default)s)")
    parser.add_argument("--tracking-uri", help="track every stage in MLflow (a server: stages write concurrently)")
    parser.add_argument("--inline", action="store_true", help="run every stage in this process, one at a time")
    parser.add_argument("--report-only", action="store_true", help="only write the report of the finished stages")
    parser.add_argument("--list", action="store_true", help="list the stages and their state, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    preset = PRESETS[check_choice("--preset", args.preset, list(PRESETS))]
    base = default_paths(preset)
    work = (args.work_dir or base.work).resolve()
    docs = args.docs_dir or (base.docs if args.work_dir is None else work / "docs")
    paths = Paths(work=work, data=(args.data_dir or base.data).resolve(), docs=docs.resolve())
    stages = build_plan(preset, paths, args.tracking_uri)
    state_dir = paths.work / "stages"
    if args.list:
        for stage in stages:
            state = "done" if is_done(state_dir, stage.name) else "todo"
            if state == "todo" and stage.step is not None:
                state = f"step {training_step(stage.output.parents[1]) or 0}/{stage.step}"
            print(f"{state:<16}{stage.name:<18} {stage.shell()}")
        return {"stages": [s.name for s in stages]}
    check_preset(paths.work, preset.to_dict())
    ran = [] if args.report_only else run_stages(stages, state_dir, paths.work / "logs", args.jobs, args.inline)
    record = collect(preset, paths, stages)
    drawn = figures.write_all(record, paths.docs)
    md = report.write(record, drawn, paths.docs / "results.md", report.invocation_of(argv), paths.work)
    (paths.work / "record.json").write_text(json.dumps(record, indent=2, default=str))
    log.info("report: %s (%d stages pending)", md, len(record["pending"]))
    return {"record": record, "figures": drawn, "report": md, "paths": paths, "ran": ran}


def check_preset(work: Path, preset: dict) -> None:
    """A work directory belongs to one preset: resuming with other numbers would mix two runs."""
    path = work / "preset.json"
    work.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.is_file() else None
    current = json.loads(json.dumps(preset))  # tuples -> lists, as stored
    if stored is not None and stored != current:
        changed = sorted(k for k in current if stored.get(k) != current[k])
        raise fail(
            "--work-dir", str(work), f"holds a run of another preset (differs in {changed}): use another --work-dir"
        )
    path.write_text(json.dumps(current, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except (ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: re-run the same command to resume")
