"""The quickstart report: a markdown summary whose numbers show what each stage improved, plus PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..rm_eval import TABLE8_COLUMNS  # noqa: E402

POLICIES = [("eval_sft", "SFT"), ("eval_rejection_sampling", "+ rejection sampling"), ("eval_ppo", "+ PPO")]


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


def plot_policies(results: dict, path: Path) -> None:
    present = [(key, label) for key, label in POLICIES if key in results]
    metrics = [("mean_reward", "mean reward (logit R_c)"), ("safety_violation_rate", "safety violation rate"),
               ("arithmetic_accuracy", "arithmetic accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, metrics):
        ax.bar([label for _, label in present], [results[k][key] for k, _ in present], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ppo(results: dict, path: Path) -> None:
    history = results["ppo"]["history"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    steps = [h["iteration"] for h in history]
    axes[0].plot(steps, [h["reward/raw_mean"] for h in history], marker=".")
    axes[0].set_title("PPO: mean reward (logit R_c) per iteration")
    axes[1].plot(steps, [h["objective/kl"] for h in history], marker=".", color="tab:red")
    axes[1].set_title("KL to the initial policy")
    for ax in axes:
        ax.set_xlabel("iteration")
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


def write_report(out: Path, results: dict) -> Path:
    """`report.md` and its plots in `out`; sections for the stages present in `results`."""
    lines = ["# Llama 2-Chat quickstart report", "",
             "A tiny Llama 2 taken through every stage of the paper on the bundled synthetic world "
             "(arithmetic questions, harmful and harmless-but-alarming requests, a pirate persona).", ""]
    plot_losses(results, out / "losses.png")
    lines += ["## Training curves", "", "![losses](losses.png)", ""]
    if "pretrain" in results:
        p = results["pretrain"]
        lines += [f"Pretraining: {p['parameters']:,} parameters, loss {p['loss_curve'][0][1]:.2f} -> "
                  f"{p['loss_curve'][-1][1]:.2f}.", ""]
    if "rm_helpfulness" in results:
        plot_rm_accuracy(results, out / "rm_accuracy.png")
        columns = list(TABLE8_COLUMNS.values()) + ["Avg"]
        lines += ["## Reward models (held-out accuracy by rating, %)", "",
                  "| RM | " + " | ".join(columns) + " | accuracy before training |",
                  "|---" * (len(columns) + 2) + "|"]
        for name in ("rm_helpfulness", "rm_safety"):
            if name in results:
                row = results[name]["table8"]
                cells = ["-" if row.get(c) is None else f"{row[c]:.1f}" for c in columns]
                before = 100 * results[name]["held_out_before"]["accuracy"]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {before:.1f} |")
        lines += ["", "![rm accuracy](rm_accuracy.png)", ""]
    present = [(k, label) for k, label in POLICIES if k in results]
    if present:
        plot_policies(results, out / "policies.png")
        lines += ["## Policy after each RLHF stage (greedy answers on held-out prompts)", "",
                  "| policy | mean reward | safety violation rate | arithmetic accuracy | false refusal rate |",
                  "|---|---|---|---|---|"]
        for key, label in present:
            r = results[key]
            lines.append(f"| {label} | {_fmt(r['mean_reward'])} | {_fmt(r['safety_violation_rate'], True)} | "
                         f"{_fmt(r['arithmetic_accuracy'], True)} | {_fmt(r['false_refusal_rate'], True)} |")
        lines += ["", "![policies](policies.png)", ""]
        first, last = results[present[0][0]], results[present[-1][0]]
        if last["arithmetic_accuracy"] < first["arithmetic_accuracy"]:
            lines += ["Arithmetic accuracy fell while the reward rose: the helpfulness RM, accurate on held-out "
                      "pairs like its training data, misjudges the policy's own new kinds of mistakes (reward "
                      "over-optimisation). This is why the paper collects fresh preference data on each new policy "
                      "and retrains the RMs before the next RLHF iteration (§3.2.1).", ""]
    if "rejection_sampling" in results:
        s = results["rejection_sampling"]["summary"]
        lines += ["## Rejection sampling", "",
                  f"Mean reward of all samples {s['mean_score']:.3f}, of the best of each prompt "
                  f"{s['mean_best_score']:.3f}.", "",
                  "![max vs median](rejection_sampling/figure7.png)", ""]
    if "ppo" in results:
        plot_ppo(results, out / "ppo.png")
        h = results["ppo"]["history"]
        lines += ["## PPO", "", f"{len(h)} iterations; mean reward of the rollouts {h[0]['reward/raw_mean']:.3f} -> "
                  f"{h[-1]['reward/raw_mean']:.3f}, KL {h[-1]['objective/kl']:.3f}.", "", "![ppo](ppo.png)", ""]
    if "gatt" in results:
        plot_gatt(results, out / "gatt.png")
        g = results["gatt"]
        turns = sorted(g["adherence_after"], key=int)
        lines += ["## Ghost Attention (persona kept at turn t, %)", "",
                  "| | " + " | ".join(f"turn {t}" for t in turns) + " |", "|---" * (len(turns) + 1) + "|"]
        for key, label in (("adherence_before", "before GAtt"), ("adherence_after", "after GAtt")):
            lines.append(f"| {label} | " + " | ".join(f"{100 * g[key][t]:.0f}" for t in turns) + " |")
        lines += ["", "![gatt](gatt.png)", ""]
    seconds = sum(r.get("seconds", 0.0) for r in results.values())
    lines += [f"Stage time in this run: {seconds:.0f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
