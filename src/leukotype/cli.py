"""The ``leukotype`` command: use trained models without writing code.

    leukotype predict --model BUNDLE INPUT... --out predictions.csv
    leukotype explain --model BUNDLE INPUT... --out DIR
    leukotype export  --results results --run runs/<task>/<strategy>/<backbone>/<layer>/<fold> --out DIR [--few-shot SET]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from leukotype.errors import LeukotypeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leukotype", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def model_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--model", required=True, help="model bundle folder (results/models/<task>)")
        sub.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or manifests")
        sub.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu, cuda, cuda:N")
        sub.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the bundle's)")
        sub.add_argument("--torch-home", default=None, help="where staged ImageNet weights live ($TORCH_HOME)")
        sub.add_argument("--threads", type=int, default=1, help="CPU threads")
        return sub

    predict = model_command("predict", "predict classes for new images")
    predict.add_argument("--out", required=True, help="output table (.csv, or .tsv)")
    predict.add_argument("--top-k", type=int, default=3, help="classes listed in the top_k column")

    explain = model_command("explain", "write saliency overlays (Grad-CAM) per image")
    explain.add_argument("--out", required=True, help="output folder for <image>_cam.png files")

    export = commands.add_parser("export", help="export one finished run as a model bundle")
    export.add_argument("--results", default="results", help="the workflow's results folder")
    export.add_argument("--run", required=True, help="runs/<task>/<strategy>/<backbone>[@<variant>]/<layer>/<fold>")
    export.add_argument("--out", required=True, help="bundle folder to write")
    export.add_argument("--copy-weights", action="store_true", help="also copy ImageNet weights into the bundle")
    export.add_argument(
        "--few-shot", metavar="SET", default=None,
        help="the run's SVM as refitted with external set SET's labelled cells (its train_per_class)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "predict":
            from leukotype.predict import run_predict

            table = run_predict(
                args.model, args.inputs, args.out, device=args.device, batch_size=args.batch_size,
                top_k=args.top_k, torch_home=args.torch_home, threads=args.threads,
            )
            ok = table["status"] == "ok"
            print(f"{int(ok.sum())} predicted, {int((~ok).sum())} rejected -> {args.out}")
        elif args.command == "explain":
            from leukotype.saliency import run_explain

            written = run_explain(
                args.model, args.inputs, args.out, device=args.device, batch_size=args.batch_size,
                torch_home=args.torch_home, threads=args.threads,
            )
            print(f"{len(written)} overlays -> {args.out}")
        elif args.command == "export":
            from leukotype.config import Run
            from leukotype.export import export_run

            out = export_run(args.results, Run.from_path(args.run), args.out, copy_weights=args.copy_weights, few_shot=args.few_shot)
            print(f"bundle -> {out}")
    except LeukotypeError as error:
        print(f"leukotype {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
