"""Supervised contrastive training for the CLINC150 Transformer (issue 18), against the same Transformer without it.

For each seed, ``configs/clinc150_transformer.yaml`` is trained twice: as shipped ("plain") and with
``train.contrastive_weight`` / ``train.contrastive_temperature`` ("contrastive": Khosla et al. 2020's loss on the
vector the head reads, positives from the batch and a queue of earlier rows). Each bundle is scored by
``benchmarks/clinc150_oos_scores.py`` (max-probability and nearest-neighbour distance to the in-scope training
examples in its own feature space, k = 1 and 10, under the bounded threshold: cross-fitted on val, fitted on val and
applied to dev), beside its own figures without a threshold. Then each variant's seeds join the linear SVM in the
shipped ensemble (``configs/ensemble_clinc150.yaml``: its oos scorer, the SVM weighing as much as all the
Transformers together), evaluated with ``chatforge evaluate --cross-fit 10`` on val and on dev. Nothing is chosen
on these figures: the weight and temperature are given (defaults 0.5 and 0.1, Khosla et al.'s temperature).

    python benchmarks/clinc150_contrastive.py --out runs/clinc150-contrastive [--seeds 0 1 2]

Runs are reused when their folder holds a finished run of the same configuration (refused otherwise). Writes
``clinc150-contrastive.json`` and ``.md`` under ``OUT/results``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import clinc150_oos_scores  # noqa: E402  (a sibling script, not a package)

CONFIGS = {"transformer": ROOT / "configs" / "clinc150_transformer.yaml",
           "svm": ROOT / "configs" / "linear_svm_clinc150.yaml",
           "ensemble": ROOT / "configs" / "ensemble_clinc150.yaml"}
KEPT_SCORES = (("max-probability", "1"), ("nearest neighbour", "k=1"), ("nearest neighbour", "k=10"))


def train(config: Path, run_dir: Path, sets: list[str]) -> Path:
    """``chatforge train CONFIG --run-dir RUN --set ...``, or the finished run already there when its recorded
    configuration is the one asked for."""
    cmd = [sys.executable, "-m", "chatforge.cli", "train", str(config), "--run-dir", str(run_dir),
           *(a for s in sets for a in ("--set", s))]
    if (run_dir / "metrics.json").is_file():
        from chatforge.config import apply_overrides, load_config

        want = _validated(apply_overrides(yaml.safe_load(config.read_text(encoding="utf-8")), sets), config)
        have = load_config(run_dir / "config.yaml").to_dict()
        differ = sorted(k for k in ("seed", "data", "tokenizer", "model", "train", "oos") if want[k] != have[k])
        if differ:
            raise SystemExit(f"{run_dir} holds a run of another configuration ({', '.join(differ)} differ); "
                             "remove it or choose another --out")
        return run_dir
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run_dir


def _validated(tree: dict, config: Path) -> dict:
    from chatforge.config import validate_config

    return validate_config(tree, source=str(config)).to_dict()


def metrics(run_dir: Path) -> dict[str, Any]:
    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"val": [round(100 * m["valid_in_scope_accuracy"], 2), round(100 * m["valid_oos_recall"], 1)],
            "dev": [round(100 * m["dev_in_scope_accuracy"], 2), round(100 * m["dev_oos_recall"], 1)],
            "train_seconds": round(m.get("train_seconds", 0.0), 1)}


def evaluate(bundle: Path, split: str, out: Path, cross_fit: int) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "chatforge.cli", "evaluate", str(bundle), "--split", split,
                    "--cross-fit", str(cross_fit), "--out", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "evaluation.json").read_text(encoding="utf-8"))["metrics"]


def run(out: Path, seeds: list[int], weight: float, temperature: float, extra: list[str]) -> dict[str, Any]:
    variants = {"plain": [], "contrastive": [f"train.contrastive_weight={weight}",
                                            f"train.contrastive_temperature={temperature}"]}
    result: dict[str, Any] = {"what": __doc__.split("\n\n")[0], "seeds": seeds, "contrastive_weight": weight,
                              "contrastive_temperature": temperature, "extra_overrides": extra,
                              "measured_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                              "transformers": {}, "ensembles": {}}
    from chatforge.bench import machine

    result["machine"] = f"{machine.lscpu_model()} (lscpu), {machine.cpus_available()} CPUs"
    result["load_average_before"] = machine.load_average()
    svm = train(CONFIGS["svm"], out / "svm", extra)
    for variant, sets in variants.items():
        runs = []
        for seed in seeds:
            r = train(CONFIGS["transformer"], out / f"transformer-{variant}-s{seed}", [f"seed={seed}", *sets, *extra])
            rows = clinc150_oos_scores.score_rows(r / "bundle")
            result["transformers"][f"{variant}-s{seed}"] = {
                **metrics(r), "bounded_threshold": [x for x in rows if (x["score"], x["setting"]) in KEPT_SCORES]}
            runs.append(r)
        ens = train(CONFIGS["ensemble"], out / f"ensemble-{variant}",
                    [f"model.members=[{','.join(str(p) for p in [svm, *runs])}]",
                     f"model.weights=[{len(runs)}{',1' * len(runs)}]", *extra])
        # val: the scorer is fitted there, so cross-fitted; dev: the shipped bundle (fitted on all of val) as it is
        val = evaluate(ens / "bundle", "valid", ens / "eval-valid", 10)["cross_fitted"]
        dev = evaluate(ens / "bundle", "dev", ens / "eval-dev", 0)
        result["ensembles"][variant] = {"val_cross_fitted": val, "dev": {k: dev[k] for k in
                                                                         ("in_scope_accuracy", "oos_recall")}}
    result["load_average_after"] = machine.load_average()
    result["summary"] = summary(result)
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per variant, means over the seeds (in-scope accuracy, OOS recall)."""
    out = {}
    for variant in ("plain", "contrastive"):
        rows = [v for k, v in result["transformers"].items() if k.startswith(variant + "-")]
        if not rows:
            continue
        mean = {"val": [round(statistics.fmean(r["val"][i] for r in rows), 2) for i in (0, 1)],
                "dev": [round(statistics.fmean(r["dev"][i] for r in rows), 2) for i in (0, 1)]}
        for score, setting in KEPT_SCORES:
            sel = [next(x for x in r["bounded_threshold"] if (x["score"], x["setting"]) == (score, setting))
                   for r in rows]
            mean[f"{score} {setting}"] = {part: [round(statistics.fmean(x[part][i] for x in sel), 2) for i in (0, 1)]
                                          for part in ("val_cross_fitted", "dev")}
        out[variant] = mean
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# CLINC150: supervised contrastive training (weight {result['contrastive_weight']}, temperature "
             f"{result['contrastive_temperature']})", "", f"Machine: {result['machine']}; {result['measured_utc']} UTC.",
             "", "| Transformer | val: in-scope / OOS recall | dev | bounded max-probability: val (cross-fitted) / dev "
             "| bounded 1-NN distance | bounded 10-NN distance |", "|---|---|---|---|---|---|"]
    for name, r in result["transformers"].items():
        b = {(x["score"], x["setting"]): x for x in r["bounded_threshold"]}
        cells = [f"{b[k]['val_cross_fitted'][0]:.2f} / {b[k]['val_cross_fitted'][1]:.1f} ; "
                 f"{b[k]['dev'][0]:.2f} / {b[k]['dev'][1]:.1f}" for k in KEPT_SCORES]
        lines.append(f"| {name} | {r['val'][0]:.2f} / {r['val'][1]:.1f} | {r['dev'][0]:.2f} / {r['dev'][1]:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| ensemble (SVM + the variant's seeds, oos scorer) | val, cross-fitted (worst) | dev |",
              "|---|---|---|"]
    for variant, e in result["ensembles"].items():
        v, d = e["val_cross_fitted"], e["dev"]
        lines.append(f"| {variant} | {100 * v['in_scope_accuracy']:.2f} / {100 * v['oos_recall']:.1f} "
                     f"({100 * v['min_in_scope_accuracy']:.2f} / {100 * v['min_oos_recall']:.1f}) | "
                     f"{100 * d['in_scope_accuracy']:.2f} / {100 * d['oos_recall']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder of the runs; the report goes to OUT/results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--weight", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="an override for every run (e.g. data.path=...), repeatable")
    args = ap.parse_args(argv)
    result = run(args.out.resolve(), args.seeds, args.weight, args.temperature, args.extra)
    from chatforge.fileio import atomic_write_text

    res = args.out / "results"
    res.mkdir(parents=True, exist_ok=True)
    atomic_write_text(res / "clinc150-contrastive.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(res / "clinc150-contrastive.md", markdown(result))
    print(markdown(result))  # noqa: T201  (a script's output)


if __name__ == "__main__":
    main()
