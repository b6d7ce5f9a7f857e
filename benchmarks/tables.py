"""Results tables, written one way by every tool: aligned text for the terminal, Markdown for
summaries, CSV for files. A column is (key, heading, format): a format string or a function of
the value; a missing, None or empty value shows as "-"."""

import csv
import json
import shlex
import sys
from pathlib import Path


def cell(value, fmt) -> str:
    if value is None or value == "":
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def format_table(rows: list[dict], columns: tuple, markdown: bool = False) -> str:
    header = [heading for _, heading, _ in columns]
    body = [[cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body])


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    """One line per row; the columns are every key in the order first seen unless given."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns or list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def write_report(out: Path, name: str, report: dict, module: str, text: str, detail: str = "") -> None:
    """report as out/name.json, and out/name.md: a line with the machine (report["machine"], from
    describe()) and the command as it was run (python -m module and this process's arguments), then
    text (the tables)."""
    m = report["machine"]
    command = shlex.join(["python", "-m", module, *sys.argv[1:]])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(f"Measured on {m['cpu']}, {m['num_cores']} cores, torch {m['torch']}, git "
                                    f"{m['git_sha']}, {m['date']}; command: {command}{detail}\n\n{text}\n")
