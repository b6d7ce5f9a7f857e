"""The advisor (make advise, #15): deterministic rules over the committed measurements, each piece of
advice with the file and row it rests on. Change the numbers and the advice changes; nothing here is
typed in besides the rules and the SLA classes.

    python -m loadtest.advise                      # the newest committed results of each kind
    python -m loadtest.advise --sweep F --quality F --compare F --plan F --profile F
"""

import argparse
import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# latency p99 each class accepts for a 64-token answer; batch work takes the most throughput
SLA_P99_S = {"interactive": 5.0, "standard": 30.0, "batch": None}
PPL_BUDGET_PCT = 2.0      # the quality goal: the fastest mode within this much of the baseline's perplexity
AIM = 1.3                 # #10: ours at least 1.3x the best peer


def newest(pattern: str, holding: str = "") -> Path | None:
    """The last by name (they begin with their time) of the files matching, holding this text."""
    found = [f for f in sorted(ROOT.glob(pattern)) if holding in f.read_text()]
    return found[-1] if found else None


def where(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def batch_size(path: Path) -> list[str]:
    """Per SLA class, the sweep's configuration with the most requests/s whose p99 meets it."""
    rows = read_csv(path)
    out = []
    for name, p99 in SLA_P99_S.items():
        ok = [(i, r) for i, r in enumerate(rows, start=2) if p99 is None or float(r["latency_p99_ms"]) <= p99 * 1000]
        if not ok:
            best = min(enumerate(rows, start=2), key=lambda ir: float(ir[1]["latency_p99_ms"]))
            out.append(f"{name} (p99 <= {p99} s): no configuration meets it; the lowest p99 is "
                       f"{float(best[1]['latency_p99_ms']) / 1000:.1f} s ({best[1]['config']}) "
                       f"[{where(path)}, line {best[0]}]")
            continue
        i, r = max(ok, key=lambda ir: float(ir[1]["requests_per_s"]))
        out.append(f"{name} ({f'p99 <= {p99} s' if p99 else 'no p99 limit'}): batch size {r['batch_size']} "
                   f"({r['config']}: {float(r['requests_per_s']):.2f} req/s, p99 {float(r['latency_p99_ms']) / 1000:.1f} s, "
                   f"${float(r['usd_per_1k_requests']):.4f} per 1,000 requests) [{where(path)}, line {i}]")
    return out


def quantization(path: Path) -> list[str]:
    """The mode for a latency, a cost (memory) and a quality goal."""
    report = json.loads(path.read_text())
    modes = {m: v for m, v in report.items() if isinstance(v, dict) and "tokens_s_128" in v}
    src = where(path)
    fastest = max(modes, key=lambda m: modes[m]["tokens_s_128"])
    smallest = min(modes, key=lambda m: modes[m]["mem_gb_128"])
    within = [m for m in modes if abs(modes[m].get("ppl_degradation_pct", 0.0)) <= PPL_BUDGET_PCT]
    quality = max(within, key=lambda m: modes[m]["tokens_s_128"]) if within else report["baseline_mode"]
    return [f"latency: {fastest} ({modes[fastest]['tokens_s_128']:.1f} tok/s at 128 tokens) [{src}, {fastest}.tokens_s_128]",
            f"cost (memory): {smallest} ({modes[smallest]['mem_gb_128']:.2f} GB peak) [{src}, {smallest}.mem_gb_128]",
            f"quality (perplexity within {PPL_BUDGET_PCT} % of {report['baseline_mode']}): {quality} "
            f"({modes[quality]['tokens_s_128']:.1f} tok/s, {modes[quality].get('ppl_degradation_pct', 0.0):+.2f} %) "
            f"[{src}, {quality}.ppl_degradation_pct]"]


def replicas(path: Path) -> list[str]:
    plan = json.loads(path.read_text())
    s = plan["sizing"]
    out = [f"{s['target_rps']} req/s at p99 <= {s['p99_target_s']} s: {n} replicas with {routing} routing "
           f"[{where(path)}, sizing.replicas.{routing}]" for routing, n in s["replicas"].items()]
    worst = max(plan["rows"], key=lambda r: r["refused"] / max(r["requests"], 1))
    if worst["refused"]:
        out.append(f"the HPA refused {worst['refused']} of {worst['requests']} requests on the {worst['trace']} trace "
                   f"({worst['routing']}): start pods sooner or keep more [{where(path)}, rows: {worst['trace']}]")
    return out


def next_optimization(compare: Path, profile: Path) -> list[str]:
    """Where ours trails its aim against the best peer, and the profile's largest part there."""
    points = read_csv(compare)
    out = []
    for users in sorted({int(p["users"]) for p in points}):
        for mode in ("plain", "stream"):
            here = {p["system"]: (i, float(p["output_tokens_per_s"])) for i, p in enumerate(points, start=2)
                    if int(p["users"]) == users and p["mode"] == mode and p["output_tokens_per_s"]}
            peers = {s: v for s, v in here.items() if not s.startswith("ours")}   # not ours-no-spec and the like
            if "ours" not in here or not peers:
                continue
            peer = max(peers, key=lambda s: peers[s][1])
            ratio = here["ours"][1] / peers[peer][1]
            if ratio < AIM:
                out.append(f"{users} users {mode}: ours {here['ours'][1]:.1f} tok/s is {ratio:.2f}x {peer} "
                           f"(aim {AIM}x) [{where(compare)}, lines {here['ours'][0]} and {peers[peer][0]}]")
    rows = json.loads(profile.read_text())["rows"]
    parts = [k for k in rows[0] if k.endswith("_ms") and k != "step_ms"]
    decode = [(i, r) for i, r in enumerate(rows) if r["phase"] == "decode" and not r.get("compiled")]
    i, r = max(decode, key=lambda ir: (ir[1]["batch"], ir[1]["mode"] == "w4"))
    part = max(parts, key=lambda k: r[k])
    out.append(f"the decode step at {r['batch']} sequences ({r['mode']}, eager) spends most in {part[:-3]} "
               f"({r[part]:.1f} of {r['step_ms']:.1f} ms) [{where(profile)}, rows[{i}]]")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", type=Path, default=newest("loadtest/results/*-full/results.csv"))
    p.add_argument("--quality", type=Path, default=ROOT / "benchmarks/results/quality/metrics/final_report.json")
    p.add_argument("--compare", type=Path, default=newest("compare/results/2*/points.csv", "\nvllm,"))
    p.add_argument("--plan", type=Path, default=newest("loadtest/results/plan-*/plan.json"))
    p.add_argument("--profile", type=Path, default=ROOT / "benchmarks/results/profile-xeon-amx/profile.json")
    args = p.parse_args()
    sections = (("Batch size per SLA class (the sweep)", batch_size, (args.sweep,)),
                ("Quantization mode per goal (the benchmark)", quantization, (args.quality,)),
                ("Replicas (the capacity plan)", replicas, (args.plan,)),
                ("Next optimization (the comparison and the profile)", next_optimization, (args.compare, args.profile)))
    for title, rule, paths in sections:
        print(f"## {title}")
        missing = [str(x) for x in paths if x is None or not Path(x).exists()]
        if missing:
            print(f"- no committed results ({', '.join(missing) or 'none found'}): nothing to advise")
            continue
        for line in rule(*paths):
            print(f"- {line}")


if __name__ == "__main__":
    main()
