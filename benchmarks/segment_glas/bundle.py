"""Make the final ``pathsam2/glas_cpu`` run the bundled default segmentation model, with a card that tells the truth.

Copies ``<run>/model.safetensors`` + ``model.json`` to
``src/napari_pathfm/data/models/pathsam2-glas-small.*`` and writes into the card what a user needs to
judge it (``pathfm models --checkpoints`` shows it): the training data, budget and command, the
cross-validated metrics with 95% intervals from ``cv_results.json`` (written by ``cv.py``) beside
the plain U-Net's from the same run, the licence and the intended use. With ``--objects``
(``objects_select.py``'s report on the same fold models, ``cv_objects.json``) the headline numbers of
both models are the cross-selected ones (object settings chosen without the scored fold); with
``--headline shipped`` they are both models' scores at the settings their recipes ship (what
``pathfm segment`` does), and the cross-selected ones stand beside them.

With ``--prompts RUN`` (a ``pathsam2/glas_cpu_prompts`` run started from ``--run``'s model) the bundled
weights are that run's: the same class masks (its training froze them) plus the click/box path; the
card then also says how that path was trained and, with ``--prompt-eval`` (``prompt_eval.py --json``),
how well it finds held-out glands beside picking them from automatic masks.

    .venv/bin/python benchmarks/segment_glas/bundle.py [--run runs/pathsam2_glas_cpu_final]
        [--objects benchmarks/segment_glas/cv_objects.json [--headline shipped --objects-origin TEXT]]
        [--prompts runs/pathsam2_glas_cpu_prompts --prompt-eval runs/prompt/eval.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGET = REPO / "src" / "napari_pathfm" / "data" / "models" / "pathsam2-glas-small"
NAMES = {"dice": "Dice", "object_f1": "object F1", "object_dice": "object Dice", "object_hausdorff": "object Hausdorff"}


def _line(cv: dict) -> str:
    parts = []
    for key, label in NAMES.items():
        s = cv[key]
        digits = 0 if key == "object_hausdorff" else 3
        parts.append(f"{label} {s['mean']:.{digits}f} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]")
    return ", ".join(parts)


def evaluation(
    report: dict, objects: dict | None = None, headline: str = "cross-selected", origin: str | None = None
) -> dict:
    """The card's ``evaluation`` section from a ``cv.py`` report.

    With ``objects`` (an ``objects_select.py`` report on the same fold models) the headline numbers are
    its cross-selected estimate for both models: fold k scored with the object setting that did best
    on the other folds, so no fold's number comes from a choice made on that fold. The recipes must
    ship the setting best over all folds (the one ``cv.py`` scored), which is reported beside it.
    ``headline="shipped"`` swaps the two: the headline is each model at its recipe's settings (for a
    recipe whose settings were fixed before its fold models were trained, the estimate without choice);
    ``origin`` then says where this model's settings came from, in the card's words."""
    ours, unet = report["models"]["pathsam2"], report["models"]["unet"]
    cv_ours, cv_unet = ours["default"]["cv"], unet["default"]["cv"]
    how = "The object settings were chosen on fold 0's images with an earlier model."
    command = ".venv/bin/python benchmarks/segment_glas/cv.py"
    if objects is not None:
        for m in ("pathsam2", "unet"):
            best, used = objects["models"][m]["best"], report["inference"][m]["objects"]
            if best != used:
                raise SystemExit(
                    f"{m}: cv.py scored the objects {used}, objects_select found {best} best: "
                    "put that into the recipe and run cv.py --score-only again"
                )
        crossed = [objects["models"][m]["cross_selected"]["cv"] for m in ("pathsam2", "unet")]
        best = objects["models"]["pathsam2"]["best"]
        if headline == "cross-selected":
            cv_ours, cv_unet = crossed
            how = (
                "Object settings (split_um x min_area_um2 grid, objects_select.py) chosen the same way for both "
                "models: fold k is scored with the setting best (mean of object F1 and object Dice) on the other "
                f"folds; the recipe ships the setting best on all folds ({best}), "
                "whose scores are under cv_shipped_objects (slightly optimistic)."
            )
        else:
            if not origin:
                raise SystemExit(
                    "--headline shipped needs --objects-origin: where the recipe's object settings came from"
                )
            how = (
                f"Each model scored at the object settings its recipe ships (this model: {best}, {origin} "
                "and best on these folds too; the U-Net: its own best on its folds). "
                "Under cv_cross_selected_objects: fold k scored with the setting best (mean of object F1 and "
                "object Dice) on the other folds of a split_um x min_area_um2 grid (objects_select.py)."
            )
        command += (
            f" && .venv/bin/python benchmarks/segment_glas/objects_select.py --runs {objects.get('runs', 'runs/segment_cv')}"
            " --out benchmarks/segment_glas/cv_objects"
        )
    k = cv_ours["dice"]["n"]
    summary = (
        f"{k}-fold cross-validation on the 85 GlaS training images, scored as `pathfm segment` writes it "
        f"(objects on, 0.62 µm/px; mean [95% t-interval] over folds; Hausdorff in px): {_line(cv_ours)}. "
        f"Plain ResNet18 U-Net, same data and CPU budget, same run: {_line(cv_unet)}."
    )
    out = {
        "summary": summary,
        "method": (
            f"{k} folds by image number (train_<i> in fold i mod {k}; GlaS names carry no patient ids); each fold "
            "trained with this model's recipe on the other folds, last weights, nothing held out for selection; "
            "held-out images segmented by segment_slide, then objects (napari_pathfm.instances). " + how
        ),
        "command": command,
        "cv": cv_ours,
        "cv_class_map_without_objects": ours["raw"]["cv"],
        "pooled": ours["default"]["pooled"],
        "baseline": {
            "model": "resnet_unet (ResNet18 encoder, random init), recipe pathsam2/glas_unet_baseline",
            "cv": cv_unet,
            "pooled": unet["default"]["pooled"],
        },
        "training_steps": {m: [t["steps"] for t in r["training"]] for m, r in report["models"].items()},
    }
    if objects is not None and headline == "cross-selected":
        out["cv_shipped_objects"] = ours["default"]["cv"]
        out["baseline"]["cv_shipped_objects"] = unet["default"]["cv"]
    elif objects is not None:
        out["cv_cross_selected_objects"], out["baseline"]["cv_cross_selected_objects"] = crossed
    return out


def _prompt_card(run: Path, base: dict, evaluation_json: str | None) -> tuple[Path, dict]:
    """The weights of the prompt run and what its card adds to the base model's (see the module docstring)."""
    prompt = json.loads((run / "model.json").read_text(encoding="utf-8"))
    if prompt.get("init_checkpoint", {}).get("sha256") != base.get("sha256"):
        raise SystemExit(f"{run} was not trained from the base model's weights (init_checkpoint sha256 differs)")
    done = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"done"' in x][-1]
    budget = prompt["recipe"]["trainer"]["cpu_budget_minutes"]
    extra = {k: prompt[k] for k in ("config", "sha256", "num_parameters", "created", "package_version")}
    extra["prompt_training"] = {
        "recipe_file": "training/pathsam2/glas_cpu_prompts.yaml",
        "command": "pathfm train pathsam2/glas_cpu_prompts --set data.init_checkpoint=runs/pathsam2_glas_cpu/model",
        "what": (
            "Only the click/box path (prompt encoder with dense click/box maps, a one-mask prompt decoder started "
            "as a copy of the class decoder) trained, on one prompt per crop simulated from the 85 GlaS masks; "
            "everything else frozen, so the class masks and the metrics under 'evaluation' are unchanged."
        ),
        "training_time": (
            f"{done['step']} steps (trainer.step_budget: what {budget} CPU-minutes bought the evaluated fold-0 prompt run)"
            if prompt["recipe"]["trainer"].get("step_budget")
            else f"{budget} CPU-minutes, {done['step']} steps"
        )
        + f" of {prompt['recipe']['trainer']['batch_size']} crops, one thread",
        "base_sha256": base.get("sha256"),
    }
    if evaluation_json:
        report = json.loads(Path(evaluation_json).read_text(encoding="utf-8"))
        command = report.get("command", "benchmarks/segment_glas/prompt_eval.py")  # as it was run
        extra["prompt_evaluation"] = {**report, "command": f".venv/bin/python {command}"}
    return run / "model.safetensors", extra


def _recipe() -> dict:
    """The bundled model's recipe file as it is now (its card names it as ``recipe_file``)."""
    import yaml

    return yaml.safe_load((REPO / "training" / "pathsam2" / "glas_cpu.yaml").read_text(encoding="utf-8"))


def _ship_objects(card: dict, best: dict, recipe: dict) -> None:
    """Give the card the object settings chosen on the folds (``best``), which the recipe must hold too.

    They only turn the class map into objects (``pathfm segment``), so a final run trained before the
    recipe took them ships them without training again."""
    if {k: recipe["objects"].get(k) for k in best} != best:
        raise SystemExit(f"put the chosen object settings {best} into training/pathsam2/glas_cpu.yaml first")
    card["objects"] = {**card.get("objects", {}), **best}
    card["recipe"]["objects"] = {**card["recipe"].get("objects", {}), **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "pathsam2_glas_cpu_final"))
    ap.add_argument("--cv", default=str(HERE / "cv_results.json"), help="cv.py's report on the fold models")
    ap.add_argument("--objects", default=None, help="objects_select.py's report on the same fold models")
    ap.add_argument(
        "--headline",
        choices=("cross-selected", "shipped"),
        default="cross-selected",
        help="with --objects: the card's headline numbers (see evaluation())",
    )
    ap.add_argument(
        "--objects-origin",
        default=None,
        help="with --headline shipped: where the recipe's object settings came from, for the card "
        "(e.g. 'kept from the previous bundled model's folds')",
    )
    ap.add_argument("--prompts", default=None, help="the glas_cpu_prompts run on --run's model")
    ap.add_argument("--prompt-eval", default=None, help="prompt_eval.py's JSON report")
    args = ap.parse_args()
    run = Path(args.run)
    card = json.loads((run / "model.json").read_text(encoding="utf-8"))
    weights = run / "model.safetensors"
    if args.prompts:
        weights, extra = _prompt_card(Path(args.prompts), card, args.prompt_eval)
        card.update(extra)
    report = json.loads(Path(args.cv).read_text(encoding="utf-8"))
    objects = json.loads(Path(args.objects).read_text(encoding="utf-8")) if args.objects else None
    recipe = _recipe()
    if objects is not None:
        _ship_objects(card, objects["models"]["pathsam2"]["best"], recipe)
    done = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"done"' in x][-1]
    budget = card["recipe"]["trainer"]["cpu_budget_minutes"]
    mpp, batch, tile = card["recipe"]["data"]["input_mpp"], card["recipe"]["trainer"]["batch_size"], card["tile_size"]
    border = card["recipe"].get("loss", {}).get("border_weight")  # the U-Net paper's border weights, if used
    card.pop("held_out_evaluation", None)  # an earlier model's 17-image hold-out
    if card["recipe"]["trainer"].get("step_budget") == recipe["trainer"].get("step_budget"):
        card["recipe"]["description"] = recipe["description"]  # a run made with --set keeps the old words
    card.update(
        {
            "weights_file": TARGET.name + ".safetensors",
            "recipe_file": "training/pathsam2/glas_cpu.yaml",  # not this machine's absolute path
            "description": (
                "Small Path-SAM2 for gland vs background in H&E (colon): random-init SAM2-style Hiera micro trunk "
                "(no SAM2 weights), no UNI branch, KAN class prompts and heads, SAM-style decoder of width 128, "
                f"{tile} px tiles at {mpp:g} µm/px"
                + (f", border-weighted loss (w0 {border:g})" if border else "")
                + f". Trained from scratch on the 85 GlaS training images for {done['step']} steps "
                f"({budget} CPU-minutes). The default model of `pathfm segment` and the Segment widget; one object per gland."
            ),
            "command": "pathfm train pathsam2/glas_cpu",
            "training_data": (
                "GlaS (MICCAI 2015 gland segmentation; Sirinukunwattana et al., Medical Image Analysis 2017) "
                f"training part, all 85 images at {mpp:g} µm/px (GlaS's own 0.62 µm/px"
                + (")" if mpp == 0.62 else f" resampled to {mpp:g})")
                + "; binary gland masks."
            ),
            "training_time": (
                f"{done['step']} steps (trainer.step_budget: what {budget} CPU-minutes of the training process "
                "bought in the cross-validation run)"
                if card["recipe"]["trainer"].get("step_budget")
                else f"{budget} CPU-minutes of the training process (trainer.cpu_budget_minutes): {done['step']} steps"
            )
            + f" of {batch} random {tile} px crops, {card.get('epochs')} epochs, one thread",
            "intended_use": (
                "Research and demonstration: gland / background in H&E of colon at about 0.5–1.3 µm/px, and a "
                "starting point to fine-tune on your own slides with painted corrections. Not for diagnosis; "
                "on other tissue it marks gland-like epithelium."
            ),
            "licence": "GlaS: research use only, no commercial use. These weights inherit that restriction.",
            "evaluation": evaluation(report, objects, args.headline, args.objects_origin),
        }
    )
    for suffix in (".safetensors", ".json"):
        tmp = TARGET.with_name(TARGET.name + suffix + ".tmp")
        if suffix == ".json":
            tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(weights, tmp)
        tmp.replace(TARGET.with_name(TARGET.name + suffix))
    print(card["evaluation"]["summary"])


if __name__ == "__main__":
    main()
