"""Make a ``compare.py`` DAPI run the bundled ``haste-isl-dapi`` model, with a card that tells the truth.

Copies ``<runs>/DAPI/<model>`` into ``src/napari_pathfm/data/models/haste-isl-dapi.*`` (weights
re-saved, so the card's sha256 is theirs) and writes into the card what a user needs to judge it
(``pathfm models --checkpoints`` shows it): training data, budget (CPU-minutes and the steps they
bought) and command, the held-out numbers beside the plain U-Net's from the same run, licence and
intended use. With ``--flips`` the card says ``flips: true``: ``pathfm translate`` and the Translate
dock then average each tile over its four flips by default, as the numbers were measured.

    .venv/bin/python benchmarks/translate_isl/bundle.py --runs runs/translate_compare30 \\
        --results benchmarks/translate_isl/results_30min.json --minutes 30 --flips
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGET = REPO / "src" / "napari_pathfm" / "data" / "models" / "haste-isl-dapi.safetensors"


def describe(r: dict) -> str:
    """One model's row of a results file in words."""
    pct = {k: f"{100 * r[k + '_rel']:+.0f}%" for k in ("count", "area", "intensity", "texture")}
    return (
        f"MAE/median {r['mae_over_median']:.3f}, PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, "
        f"{r['nuclei_pred']} nuclei vs {r['nuclei_real']} in the real stain ({pct['count']}), nuclei area "
        f"{pct['area']}, intensity {pct['intensity']}, texture {pct['texture']}"
    )


def evaluation(results: dict, model: str, minutes: float, flips: bool, command: str) -> dict:
    """The card's ``evaluation`` section: the bundled model and the U-Net, as the card runs them and the other way."""
    rows = results["targets"]["DAPI"]
    on, off = (f"{model}+flips", model) if flips else (model, f"{model}+flips")
    base_on, base_off = ("unet+flips", "unet") if flips else ("unet", "unet+flips")
    how = "with flip averaging (the card's default)" if flips else "without flip averaging"
    summary = (
        f"ISL rows 768:1024, never seen in training and not used to pick weights (pathfm evaluate-translation), "
        f"{how}: {describe(rows[on])}. Plain L1 U-Net (1.9 M parameters), same data and {minutes:g} CPU-minutes, "
        f"same run, scored the same way: {describe(rows[base_on])}."
    )
    if off in rows and base_off in rows:
        summary += f" The other way: this model {describe(rows[off])}; the U-Net {describe(rows[base_off])}."
    summary += " One well, one seed: not cross-validated."
    return {"summary": summary, "command": command, "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="compare.py --runs folder")
    ap.add_argument("--results", required=True, help="compare.py results .json (with --flips rows for --flips)")
    ap.add_argument("--model", default="lupi")
    ap.add_argument("--minutes", type=float, required=True, help="the CPU budget the run had")
    ap.add_argument("--flips", action="store_true", help="the card asks for flip averaging by default")
    args = ap.parse_args()

    from napari_pathfm.models import load_checkpoint, save_checkpoint
    from napari_pathfm.training.recipes import load_recipe

    run = Path(args.runs) / "DAPI" / args.model
    module, card = load_checkpoint(run / "model.safetensors")
    results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    old = json.loads(TARGET.with_suffix(".json").read_text(encoding="utf-8"))
    steps = results["targets"]["DAPI"][args.model]["training"]["steps"]
    command = (
        f".venv/bin/python benchmarks/translate_isl/compare.py --targets DAPI --models {args.model},unet "
        f"--minutes {args.minutes:g}{' --flips' if args.flips else ''} --runs {args.runs}"
    )
    here = str(card["recipe"]["data"]["stacks"])  # this machine's path, expanded when the run started
    card["recipe"]["data"]["stacks"] = "${PATHFM_SHARED_DATA}/isl-blue-sample"
    card["training_data"] = card["training_data"].replace(here, card["recipe"]["data"]["stacks"])
    recipe = load_recipe(REPO / "training" / "translate" / "isl_dapi_lupi_cpu.yaml")
    if {k: v for k, v in recipe.config.items() if k != "description"} != {
        k: v for k, v in load_recipe(run / "recipe.yaml").config.items() if k != "description"
    }:
        print("note: the run's recipe differs from training/translate/isl_dapi_lupi_cpu.yaml beyond its text")
    card["description"] = card["recipe"]["description"] = recipe.get("description")
    card |= {
        "data_license": old["data_license"],
        "licence": old["licence"],
        "intended_use": old["intended_use"],
        "command": f"OMP_NUM_THREADS=1 {command} (trains it beside the baseline; or pathfm train "
        f"training/translate/isl_dapi_lupi_cpu.yaml --set trainer.step_budget={steps} for the same steps)",
        "training_time": {
            "cpu_budget_minutes": args.minutes,
            "steps": steps,
            "epochs": card.get("epochs"),
            "machine": "2 CPU cores, one thread per training process, two trainings at a time",
        },
        "flips": bool(args.flips),
        "evaluation": evaluation(results, args.model, args.minutes, args.flips, command),
    }
    save_checkpoint(module, TARGET, card)
    print(json.dumps(card["evaluation"]["summary"]))


if __name__ == "__main__":
    main()
