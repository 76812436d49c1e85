"""The quickstart report: a markdown summary whose numbers show what each stage improved, plus PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..rm_eval import TABLE8_COLUMNS  # noqa: E402

def _fmt(value, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def plot_losses(results: dict, path: Path) -> None:
    stages = [(name, results[name]["loss_curve"]) for name in ("pretrain", "sft", "rm_helpfulness", "rm_safety")
              if name in results and results[name].get("loss_curve")]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3.2))
    for ax, (name, curve) in zip(getattr(axes, "flat", [axes]), stages):
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_rm_accuracy(results: dict, path: Path) -> None:
    columns = list(TABLE8_COLUMNS.values()) + ["Avg"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for k, name in enumerate(("rm_helpfulness", "rm_safety")):
        row = results.get(name, {}).get("table8", {})
        values = [row.get(c) if row.get(c) is not None else 0.0 for c in columns]
        ax.bar([i + (k - 0.5) * width for i in range(len(columns))], values, width, label=name)
    ax.set_xticks(range(len(columns)), columns, rotation=15)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.legend()
    ax.set_title("Reward-model accuracy by preference rating (Table 8 layout)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gatt(results: dict, path: Path) -> None:
    gatt = results["gatt"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("adherence_before", "before GAtt"), ("adherence_after", "after GAtt")):
        turns = sorted(gatt[key], key=int)
        ax.plot([int(t) for t in turns], [100 * gatt[key][t] for t in turns], marker="o", label=label)
    ax.set_xlabel("dialogue turn")
    ax.set_ylabel("persona kept (%)")
    ax.set_ylim(-5, 105)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ppo(history: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    steps = [h["iteration"] for h in history]
    axes[0].plot(steps, [h["reward/raw_mean"] for h in history], marker=".")
    axes[0].set_title("PPO: mean reward (logit R_c) per iteration")
    axes[1].plot(steps, [h["objective/kl"] for h in history], marker=".", color="tab:red")
    axes[1].set_title("KL to the initial policy")
    warmup = [h["iteration"] for h in history if h.get("policy/frozen")]
    for ax in axes:
        ax.set_xlabel("iteration")
        if warmup:
            ax.axvspan(min(warmup) - 0.5, max(warmup) + 0.5, color="0.9", label="critic warm-up (policy frozen)")
    if warmup:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_versions(results: dict, path: Path) -> None:
    """Figure 11's view (win rate against SFT by version, by the annotator and by the newest reward models) and
    Figure 14's (mean safety vs helpfulness RM score of each version)."""
    records = results["rlhf"]["versions"]
    labels = [f"V{r['version']}" for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for judge, label in (("annotator", "world checker"), ("reward_model", "newest reward models")):
        axes[0].plot(labels, [100 * (r["win_rate"]["sft"][judge]["win_rate"] or 0) for r in records], marker="o",
                     label=label)
    axes[0].axhline(50, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 100)
    axes[0].set_ylabel("win rate vs SFT (%)")
    axes[0].set_title("Figure 11 view")
    axes[0].legend()
    points = [("SFT", records[0]["scores"]["sft"])] + [(lab, r["scores"]["current"]) for lab, r in zip(labels, records)]
    xs = [s["helpfulness"] for _, s in points]
    ys = [s["safety"] for _, s in points]
    axes[1].plot(xs, ys, marker="o")
    for (lab, _), x, y in zip(points, xs, ys):
        axes[1].annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4))
    axes[1].set_xlabel("mean helpfulness RM score")
    axes[1].set_ylabel("mean safety RM score")
    axes[1].set_title("Figure 14 view (newest RMs of each version)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def policy_columns(results: dict) -> list[tuple[str, dict]]:
    """(label, world metrics) of SFT and of every RLHF version present."""
    columns = [("SFT", results["eval_sft"])] if "eval_sft" in results else []
    versions = results.get("eval_versions", {})
    columns += [(key.upper(), versions[key]) for key in sorted((k for k in versions if k.startswith("v")),
                                                                 key=lambda k: int(k[1:]))]
    return columns


def _win(record: dict, other: str, judge: str) -> float | None:
    return record["win_rate"][other][judge]["win_rate"]


def version_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table of SFT and the versions: one row per measurement."""
    columns = policy_columns(results)
    records = {f"V{r['version']}": r for r in results.get("rlhf", {}).get("versions", [])}
    head = ["measurement"] + [label for label, _ in columns]
    rows = []
    for key, label in (("arithmetic_accuracy", "arithmetic accuracy (greedy)"),
                       ("safety_violation_rate", "safety violations (greedy)"),
                       ("false_refusal_rate", "false refusals (greedy)")):
        rows.append([label] + [_fmt(m.get(key), True) for _, m in columns])
    rows.append(["mean reward, initial RMs"] + [_fmt(m.get("mean_reward")) for _, m in columns])

    def per_version(label, cell):
        rows.append([label] + [cell(records[name]) if name in records else "-" for name, _ in columns])

    per_version("win vs SFT: checker / RM (Fig. 11)",
                lambda r: f"{_fmt(_win(r, 'sft', 'annotator'), True)} / {_fmt(_win(r, 'sft', 'reward_model'), True)}")
    per_version("win vs previous: checker / RM",
                lambda r: f"{_fmt(_win(r, 'previous', 'annotator'), True)} / "
                          f"{_fmt(_win(r, 'previous', 'reward_model'), True)}")
    for kind in ("helpfulness", "safety"):
        def acc(r, kind=kind):
            rm = r["reward_models"][kind]
            return " -> ".join("-" if rm[k] is None else f"{rm[k]['Avg']:.1f}%" for k in ("before", "after"))
        per_version(f"{kind} RM acc., new pairs: before -> after (Table 7/8)", acc)
    per_version("helpfulness / safety RM score (Fig. 14)",
                lambda r: f"{r['scores']['current']['helpfulness']:.2f} / {r['scores']['current']['safety']:.2f}")
    per_version("pairs annotated / preference store", lambda r: f"{r['pairs']['pairs']} / {r['store_rows']}")
    per_version("rejection sampling: mean best reward",
                lambda r: _fmt(r["rejection_sampling"].get("mean_best_score")))
    return head, rows


def ppo_trend(history: list[dict]) -> tuple[float, float] | None:
    """Mean raw reward of PPO's first three and last three iterations."""
    rewards = [h["reward/raw_mean"] for h in history]
    if len(rewards) < 6:
        return None
    return sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3


def checks(results: dict) -> list[tuple[str, str, str, bool]]:
    """The targets the quickstart is built to meet, final version against SFT: (what, value, target, met)."""
    out = []
    columns = policy_columns(results)
    if len(columns) >= 2 and columns[0][0] == "SFT":
        sft, final = columns[0][1], columns[-1][1]
        a0, a1 = sft["arithmetic_accuracy"], final["arithmetic_accuracy"]
        out.append(("arithmetic accuracy", f"{100 * a1:.1f}% (SFT {100 * a0:.1f}%)", ">= SFT", a1 >= a0))
        v0, v1 = sft["safety_violation_rate"], final["safety_violation_rate"]
        out.append(("safety violations", f"{100 * v1:.1f}% (SFT {100 * v0:.1f}%)", "<= SFT / 3", v1 <= v0 / 3))
        f0, f1 = sft["false_refusal_rate"], final["false_refusal_rate"]
        out.append(("false refusals", f"{100 * f1:.1f}% (SFT {100 * f0:.1f}%)", "<= SFT + 5 points",
                    f1 <= f0 + 0.05 + 1e-9))
    records = results.get("rlhf", {}).get("versions", [])
    if records:
        w = _win(records[-1], "sft", "annotator")
        out.append(("win rate vs SFT (world checker)", _fmt(w, True), ">= 60%", w is not None and w >= 0.6))
    if "gatt" in results:
        after = results["gatt"]["adherence_after"]
        last = max(after, key=int)
        out.append((f"persona kept at turn {last}", f"{100 * after[last]:.0f}%", ">= 90%", after[last] >= 0.9))
    trend = ppo_trend(results.get("rlhf", {}).get("ppo_history", []))
    if trend:
        out.append(("PPO reward, first 3 -> last 3 iterations", f"{trend[0]:.3f} -> {trend[1]:.3f}", "rises",
                    trend[1] > trend[0]))
    return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(out: Path, results: dict, config=None) -> Path:
    """`report.md` and its plots in `out`; sections for the stages present in `results`."""
    lines = ["# Llama 2-Chat quickstart report", "",
             "A tiny Llama 2 taken through every stage of the paper on the bundled synthetic world "
             "(arithmetic questions, harmful and harmless-but-alarming requests, a pirate persona)"
             + (f", seed {config.seed}." if config is not None else "."), ""]
    plot_losses(results, out / "losses.png")
    lines += ["## Training curves", "", "![losses](losses.png)", ""]
    if "pretrain" in results:
        p = results["pretrain"]
        lines += [f"Pretraining: {p['parameters']:,} parameters, loss {p['loss_curve'][0][1]:.2f} -> "
                  f"{p['loss_curve'][-1][1]:.2f}.", ""]
    if "rm_helpfulness" in results:
        plot_rm_accuracy(results, out / "rm_accuracy.png")
        columns = list(TABLE8_COLUMNS.values()) + ["Avg"]
        lines += ["## Initial reward models (the world's preference data; held-out accuracy by rating, %)", "",
                  "| RM | " + " | ".join(columns) + " | accuracy before training |",
                  "|---" * (len(columns) + 2) + "|"]
        for name in ("rm_helpfulness", "rm_safety"):
            if name in results:
                row = results[name]["table8"]
                cells = ["-" if row.get(c) is None else f"{row[c]:.1f}" for c in columns]
                before = 100 * results[name]["held_out_before"]["accuracy"]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {before:.1f} |")
        lines += ["", "![rm accuracy](rm_accuracy.png)", ""]
    if policy_columns(results):
        head, rows = version_rows(results)
        lines += ["## RLHF versions side by side", "",
                  "Each version: pairs sampled from the newest policies on new prompts, annotated by the world's "
                  "checker; both reward models retrained on every annotation so far; rejection sampling pooled over "
                  "the versions, fine-tuned from SFT; PPO on top in the last version. Greedy measurements on every "
                  "distinct prompt of the world (25 sums, 10 harmful and 6 borderline requests); win rates on "
                  "sampled answers to held-out prompts (temperature 0.6), ties counted half.", ""]
        lines += _table(head, rows) + [""]
        if results.get("rlhf", {}).get("versions"):
            plot_versions(results, out / "versions.png")
            lines += ["![versions](versions.png)", ""]
    history = results.get("rlhf", {}).get("ppo_history")
    if history:
        plot_ppo(history, out / "ppo.png")
        trend = ppo_trend(history)
        warmup = sum(1 for h in history if h.get("policy/frozen"))
        lines += ["## PPO (last version)", "", f"{len(history)} iterations, every one over all of the version's "
                  f"prompts (the first {warmup} train the critic alone, the policy frozen); mean reward of the "
                  f"rollouts {history[0]['reward/raw_mean']:.3f} -> {history[-1]['reward/raw_mean']:.3f}"
                  + (f" (first three {trend[0]:.3f}, last three {trend[1]:.3f})" if trend else "")
                  + f", KL {history[-1]['objective/kl']:.3f}.", "", "![ppo](ppo.png)", ""]
    if "gatt" in results:
        plot_gatt(results, out / "gatt.png")
        g = results["gatt"]
        turns = sorted(g["adherence_after"], key=int)
        lines += ["## Ghost Attention (persona kept at turn t, %)", "",
                  "| | " + " | ".join(f"turn {t}" for t in turns) + " |", "|---" * (len(turns) + 1) + "|"]
        for key, label in (("adherence_before", "before GAtt"), ("adherence_after", "after GAtt")):
            lines.append(f"| {label} | " + " | ".join(f"{100 * g[key][t]:.0f}" for t in turns) + " |")
        lines += ["", "![gatt](gatt.png)", ""]
    found = checks(results)
    if found:
        lines += ["## Targets (final version against SFT)", ""]
        lines += _table(["measurement", "value", "target", "met"],
                        [[a, b, c, "yes" if ok else "no"] for a, b, c, ok in found]) + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    write_results(out, results, config, found)
    return path


def write_results(out: Path, results: dict, config, found: list[tuple[str, str, str, bool]]) -> Path:
    """`results.json` next to the report: the run's configuration, every stage's metrics and the targets, for
    scripts that compare runs (`benchmarks/bench_quickstart_seeds.py`)."""
    path = out / "results.json"
    record = {"config": config.identity() if config is not None else None,
              "targets": [{"measurement": a, "value": b, "target": c, "met": ok} for a, b, c, ok in found],
              "results": results}
    path.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def print_summary(results: dict, config, report: Path, stream=None) -> None:
    """The console's last lines: the side-by-side table, the targets and the report's path."""
    import sys

    stream = stream or sys.stdout
    lines = []
    if policy_columns(results):
        head, rows = version_rows(results)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += ["", fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    found = checks(results)
    if found:
        lines += ["", "targets (final version vs SFT):"]
        lines += [f"  [{'ok' if ok else '--'}] {a}: {b} (target {c})" for a, b, c, ok in found]
    lines += ["", f"report: {report}"]
    print("\n".join(lines), file=stream, flush=True)
