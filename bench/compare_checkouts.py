"""Two checkouts of the server side by side, against the baseline relay.

    python bench/compare_checkouts.py OLD_DIR [NEW_DIR] [--setup embedded|postgres+redis] [--rounds 12] [--stored]

Benchmark 1's 50-connection round (8 turns each, ephemeral threads unless
``--stored``) on three servers started together: OLD_DIR's and NEW_DIR's
``manage.py serve`` (NEW_DIR defaults to this checkout) and the baseline
relay. Rounds alternate old, baseline, new (then new, baseline, old), so
drift hits all three alike, and every figure is a median of per-round
ratios: old and new each against the baseline round beside it, and new
against old (``bench/run.py`` gives the ratio of medians instead). CPU is
the server process's, per turn, from ``/proc`` (connection setup included,
as the round includes it), and with the machine's PostgreSQL and Redis
processes' added (the rounds run one at a time, so theirs is the round's). Each checkout runs its own ``manage.py``,
migrations included, from its own directory.

For a change to the server's per-turn work: a full ``bench/run.py`` run
takes about ten minutes and measures each version in a different hour, and on
these machines the hour matters more than most changes (make the old
checkout with ``git worktree add /tmp/old REV``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (  # noqa: E402  (bench.run sets Django up)
    ROOT,
    UNPACED,
    Bench,
    CpuSplit,
    ServerProcess,
    daphne_command,
    setup_env,
    turn_round,
)

CONNECTIONS, TURNS_EACH = 50, 8


async def measured_round(server: ServerProcess, ephemeral: bool) -> tuple[float, float, float]:
    """(median turn latency ms, server CPU ms per turn, the same with the database servers') of one round."""
    split = CpuSplit(server)
    latency_ms, _ = await turn_round(server.ws_url, CONNECTIONS, TURNS_EACH, ephemeral=ephemeral)
    cpu = split.per_turn(CONNECTIONS * TURNS_EACH)
    return latency_ms, cpu["server"], cpu["server"] + cpu["database_servers"]


def start_checkout(bench: Bench, name: str, checkout: Path, setup: str) -> ServerProcess:
    """The checkout's own ``manage.py serve``, migrated by its own migrations, unpaced as benchmark 1's."""
    return bench.start(name, project_dir=checkout, PYTHONPATH=str(checkout), **UNPACED, **setup_env(setup))


def median_ratio(tops: list[tuple[float, ...]], bottoms: list[tuple[float, ...]], index: int) -> float:
    return statistics.median(top[index] / bottom[index] for top, bottom in zip(tops, bottoms))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=ROOT)
    parser.add_argument("--setup", default="embedded", choices=("embedded", "postgres+redis"))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--stored", action="store_true", help="stored threads instead of ephemeral ones")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="codex-compare-") as workdir:
        bench = Bench(quick=True, workdir=Path(workdir))
        try:
            servers = {
                "old": start_checkout(bench, "old", args.old.resolve(), args.setup),
                "new": start_checkout(bench, "new", args.new.resolve(), args.setup),
                "baseline": bench.start("baseline", daphne_command("bench.reference_apps:baseline_relay")),
            }
            rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
            for index in range(args.rounds):
                order = ("old", "baseline", "new") if index % 2 == 0 else ("new", "baseline", "old")
                for name in order:
                    ephemeral = name != "baseline" and not args.stored
                    rounds[name].append(asyncio.run(measured_round(servers[name], ephemeral)))
        finally:
            bench.close()
    kind = "stored" if args.stored else "ephemeral"
    print(f"{CONNECTIONS} connections x {TURNS_EACH} turns, {kind} threads, {args.setup}, {args.rounds} rounds")
    print(
        f"{'':16}{'latency ratio':>13}  {'CPU ratio':>9}  {'+ databases':>11}"
        f"  {'latency ms':>11}  {'CPU ms/turn':>11}  {'+ databases':>11}"
    )
    for name in ("old", "new"):
        latency, cpu, with_databases = (statistics.median(r[i] for r in rounds[name]) for i in (0, 1, 2))
        print(
            f"{name} / baseline  {median_ratio(rounds[name], rounds['baseline'], 0):13.3f}"
            f"  {median_ratio(rounds[name], rounds['baseline'], 1):9.3f}"
            f"  {median_ratio(rounds[name], rounds['baseline'], 2):11.3f}"
            f"  {latency:11.1f}  {cpu:11.3f}  {with_databases:11.3f}"
        )
    latency, cpu, with_databases = (statistics.median(r[i] for r in rounds["baseline"]) for i in (0, 1, 2))
    print(f"baseline        {'':13}  {'':9}  {'':11}  {latency:11.1f}  {cpu:11.3f}  {with_databases:11.3f}")
    print(
        f"new / old       {median_ratio(rounds['new'], rounds['old'], 0):13.3f}"
        f"  {median_ratio(rounds['new'], rounds['old'], 1):9.3f}"
        f"  {median_ratio(rounds['new'], rounds['old'], 2):11.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
