"""`slimlm report DIR`: re-render the table, Pareto plot and HTML page of a stored sweep (and fits)."""

from __future__ import annotations

from slimlm.cli import print_json


def cmd_report(a) -> int:
    from slimlm.report import load_results, write_report
    from slimlm.sweep import format_table

    page = write_report(a.dir, a.output)
    sweep, fits = load_results(a.dir)
    if a.json:
        print_json({"report": str(page), "png": f"{a.dir}/pareto.png", "fits": len(fits)})
        return 0
    print(format_table(sweep["rows"]))
    for f in fits:
        print(f"\nfit ({f['budget_desc']}): {f['verdict']}\n  {f['row']['recipe']}")
    print(f"\nreport: {page}")
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser("report", help="render a stored sweep (and fits) as a table, Pareto PNG and HTML page")
    s.add_argument("dir", help="a sweep's --out directory")
    s.add_argument("--output", "-o", help="HTML file to write (default: DIR/report.html)")
    s.set_defaults(fn=cmd_report)
