"""BENCHMARKS.md from bench/results.json: one section per benchmark, each with the command that reproduces it."""

from __future__ import annotations

from typing import Any

ORDER = (
    "quality",
    "peers",
    "service",
    "api",
    "readpath",
    "gpu",
    "targets",
    "dynamic_int8",
    "sensitivity",
    "cnn_repair",
    "zoo",
)


def _cell(value: Any) -> str:
    text = "–" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(met: Any) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}.get(met, str(met))


def render(results: dict[str, Any]) -> str:
    sections = results.get("sections", {})
    env = results.get("environment", {})
    out = [
        "# ModelPress benchmarks",
        "",
        "What compression buys on real models and what the service itself costs, measured in one run next to "
        "calling the libraries directly. Benchmarks print figures; they are not tests (a smoke test, "
        "`tests/test_bench_smoke.py`, runs every section at `--size tiny` so none of them rots).",
        "",
        "Reproduce everything with `make bench` (= `.venv/bin/python -m bench.run`, size `full`); each section "
        "below names the command that reproduces it alone. Raw figures: `bench/results.json`. The GPU section "
        "is `python -m bench.gpu` on a machine with CUDA.",
        "",
    ]
    if env:
        out += [
            "## Environment",
            "",
            table(
                ["", ""],
                [
                    [
                        "CPU",
                        f"{env.get('cpu')} ({env.get('cpu_count')} cores visible; figures use {env.get('threads')} "
                        "thread)",
                    ],
                    ["load average at start", ", ".join(str(v) for v in env.get("load_average_at_start", []))],
                    [
                        "software",
                        f"Python {env.get('python')}, torch {env.get('torch')}, torchao {env.get('torchao')}, "
                        f"torch-pruning {env.get('torch-pruning')}, scikit-learn {env.get('scikit-learn')}",
                    ],
                    ["commit", env.get("git_commit")],
                    [
                        "last run",
                        f"{results.get('generated_at')} (size {results.get('size')}, "
                        f"{results.get('seconds')} s for the sections run)",
                    ],
                ],
            ),
            "",
            "The CPU box is shared with other work, so single timings are noisy; latencies are medians of "
            "interleaved runs and ratios are taken within one run.",
            "",
        ]
    targets = [(sections[k]["title"], t) for k in ORDER if k in sections for t in sections[k].get("targets", [])]
    if targets:
        out += [
            "## Targets",
            "",
            table(
                ["section", "target", "measured", "verdict"],
                [[title.split(". ", 1)[-1], t["target"], t["measured"], _verdict(t["met"])] for title, t in targets],
            ),
            "",
        ]
    for key in ORDER:
        section = sections.get(key)
        if not section:
            continue
        out += [f"## {section['title']}", ""]
        if section.get("intro"):
            out += [section["intro"], ""]
        out += [
            f"Reproduce: `{section['command']}` (this run: size `{section.get('size')}`, "
            f"{section.get('generated_at', '?')}, {section.get('seconds', '?')} s).",
            "",
        ]
        if section.get("skipped"):
            out += [f"**Skipped:** {section['skipped']}", ""]
        for block in section.get("tables", []):
            out += [f"### {block['title']}", ""]
            if block.get("caption"):
                out += [block["caption"], ""]
            out += [table(block["columns"], block["rows"]), ""]
        if section.get("targets"):
            out += [
                "Targets: "
                + "; ".join(f"{t['target']}: {t['measured']} ({_verdict(t['met'])})" for t in section["targets"]),
                "",
            ]
        for note in section.get("notes", []):
            out.append(f"- {note}")
        if section.get("notes"):
            out.append("")
    return "\n".join(out).rstrip() + "\n"
